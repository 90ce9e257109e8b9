-- Every B-tree page an accepted message touches is one more 4 KB frame written to the log before
-- the client hears "accepted" (docs/performance.md, "SMTP acceptance"). This drops what no query
-- needs:
--
-- * No query looks decisions up by principal.
DROP INDEX decisions_by_principal;
-- * The lease filters on state and sorts by COALESCE(next_attempt_ms, accepted_at_ms), which no
--   index orders; messages_by_state (state, accepted_at_ms) serves the state filter as well.
DROP INDEX messages_due;
-- * The rate state is one small row per principal, updated with every send: WITHOUT ROWID keeps
--   it in one B-tree instead of a table plus its primary-key index.
CREATE TABLE rate_state_new (
    principal TEXT PRIMARY KEY,
    tat_ms    INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO rate_state_new (principal, tat_ms) SELECT principal, tat_ms FROM rate_state;
DROP TABLE rate_state;
ALTER TABLE rate_state_new RENAME TO rate_state;
-- * AUTOINCREMENT writes sqlite_sequence with every insert; a plain INTEGER PRIMARY KEY still
--   grows with each send (old rows are the ones pruned).
CREATE TABLE usage_log_new (
    seq        INTEGER PRIMARY KEY,
    principal  TEXT    NOT NULL,
    at_ms      INTEGER NOT NULL,
    recipients INTEGER NOT NULL
);
INSERT INTO usage_log_new (seq, principal, at_ms, recipients)
    SELECT seq, principal, at_ms, recipients FROM usage_log;
DROP TABLE usage_log;
ALTER TABLE usage_log_new RENAME TO usage_log;
CREATE INDEX usage_log_by_time ON usage_log (at_ms);
