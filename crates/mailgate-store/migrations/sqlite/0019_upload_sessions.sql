-- Gmail resumable-upload sessions (issue 16 item 5): the same table as PostgreSQL's (see
-- migrations/postgres/0005_upload_sessions.sql). No body is kept; bounded by the opener.
CREATE TABLE upload_sessions (
    id         TEXT    PRIMARY KEY,
    owner      TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX upload_sessions_by_owner ON upload_sessions (owner, expires_ms);
CREATE INDEX upload_sessions_by_expiry ON upload_sessions (expires_ms);
