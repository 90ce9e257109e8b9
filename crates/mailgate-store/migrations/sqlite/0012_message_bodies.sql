-- Message bodies apart from the queue row. Every state change (lease, attempt, capture) rewrites
-- the `messages` row; with the raw message (often tens of KB) in it, each delivery wrote the body
-- to the log three times. Now the body is written once, at acceptance, in the same transaction.
CREATE TABLE message_bodies (
    message_id TEXT PRIMARY KEY,
    raw        BLOB NOT NULL
);
INSERT INTO message_bodies (message_id, raw) SELECT id, raw FROM messages;
ALTER TABLE messages DROP COLUMN raw;
