-- The gateway processes serving from this store, and the directory generation each has in force
-- (issue 13: a change made with the CLI is live on every running server when the CLI returns).
-- A server writes its row when it loads a new generation and every few seconds otherwise, and
-- deletes it when it stops; a writer waits until every live node shows its new generation.
-- `host` and `pid` tell a node that died without deleting its row (same host, no such process).
CREATE TABLE nodes (
    id            TEXT    PRIMARY KEY,
    host          TEXT    NOT NULL,
    pid           INTEGER NOT NULL,
    generation    INTEGER NOT NULL,
    seen_ms       INTEGER NOT NULL,
    interval_ms   INTEGER NOT NULL
) WITHOUT ROWID;
