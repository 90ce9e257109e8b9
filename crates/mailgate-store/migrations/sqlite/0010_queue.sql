-- The delivery queue (issue 5). Accepted messages (0003) gain delivery columns; every recipient
-- gets its own state row (created when the message is first leased); every attempt per recipient
-- is kept so a message's status shows each deferral's reason.
--
-- Leases: a worker takes due messages by writing lease_owner and lease_until_ms in one
-- BEGIN IMMEDIATE transaction; a message whose lease has expired (crashed worker) is due again.
ALTER TABLE messages ADD COLUMN next_attempt_ms INTEGER;
ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN lease_owner TEXT;
ALTER TABLE messages ADD COLUMN lease_until_ms INTEGER;
ALTER TABLE messages ADD COLUMN updated_at_ms INTEGER;
ALTER TABLE messages ADD COLUMN done_at_ms INTEGER;
CREATE INDEX messages_due ON messages (state, next_attempt_ms);

CREATE TABLE message_recipients (
    message_id    TEXT    NOT NULL,
    recipient     TEXT    NOT NULL,
    state         TEXT    NOT NULL, -- pending | deferred | delivered | failed
    attempts      INTEGER NOT NULL DEFAULT 0,
    code          TEXT,             -- upstream.* reason code of the last outcome
    reply         TEXT,             -- the upstream's last reply, verbatim
    smarthost     TEXT,
    updated_at_ms INTEGER,
    PRIMARY KEY (message_id, recipient)
);

CREATE TABLE delivery_attempts (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT    NOT NULL,
    at_ms           INTEGER NOT NULL,
    smarthost       TEXT,
    recipient       TEXT    NOT NULL,
    outcome         TEXT    NOT NULL, -- delivered | deferred | failed
    code            TEXT,
    reply           TEXT,
    next_attempt_ms INTEGER
);
CREATE INDEX delivery_attempts_by_message ON delivery_attempts (message_id, seq);
