-- Accepted messages. A row is written (WAL, synchronous=FULL) before any door answers
-- "accepted"; the delivery worker takes them from here.
CREATE TABLE messages (
    id             TEXT    PRIMARY KEY,
    decision_id    TEXT    NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    door           TEXT    NOT NULL,
    principal      TEXT    NOT NULL,
    envelope_from  TEXT    NOT NULL,
    recipients     TEXT    NOT NULL,
    size           INTEGER NOT NULL,
    raw            BLOB    NOT NULL,
    state          TEXT    NOT NULL,
    hold_until_ms  INTEGER
);
CREATE INDEX messages_by_state ON messages (state, accepted_at_ms);
