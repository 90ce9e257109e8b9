-- Every decision's trace, found by its decision_id (refusals always, allowed ones sampled).
CREATE TABLE decisions (
    id        TEXT    PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    door      TEXT    NOT NULL,
    principal TEXT    NOT NULL,
    verdict   TEXT    NOT NULL,
    code      TEXT,
    body      TEXT    NOT NULL
);
CREATE INDEX decisions_by_principal ON decisions (principal, at_ms);

-- Accepted sends, per principal, for the rolling 24 h limits (pruned after a day), and the
-- GCRA state of the rate limit: counters survive restarts by replaying these at start.
CREATE TABLE usage_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    principal  TEXT    NOT NULL,
    at_ms      INTEGER NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX usage_log_by_time ON usage_log (at_ms);

CREATE TABLE rate_state (
    principal TEXT PRIMARY KEY,
    tat_ms    INTEGER NOT NULL
);
