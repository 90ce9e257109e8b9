-- Failed-authentication counts (issue 16 item 5): the same table as PostgreSQL's (see
-- migrations/postgres/0004_auth_failures.sql), so the lockout reads one shared count whatever
-- the backend. One row per key, forgotten when quiet, at most `max_rows` rows.
CREATE TABLE auth_failures (
    key             TEXT    PRIMARY KEY,
    failures        INTEGER NOT NULL,
    last_ms         INTEGER NOT NULL,
    locked_until_ms INTEGER
) WITHOUT ROWID;
