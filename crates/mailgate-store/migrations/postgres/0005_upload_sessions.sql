-- Gmail resumable-upload sessions shared by every node (issue 16 item 5): the POST that opens
-- one and the PUT that finishes it may reach different nodes. No body is kept (the PUT carries
-- the whole message to the node that receives it). Bounded per principal and in all by the
-- opener (crates/mailgate-store/src/uploads.rs), under a transaction-scoped advisory lock so two
-- nodes never both take a principal's last place; expired rows are deleted by the next open.
CREATE TABLE upload_sessions (
    id         TEXT   PRIMARY KEY,
    owner      TEXT   NOT NULL,
    user_id    TEXT   NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX upload_sessions_by_owner ON upload_sessions (owner, expires_ms);
CREATE INDEX upload_sessions_by_expiry ON upload_sessions (expires_ms);
