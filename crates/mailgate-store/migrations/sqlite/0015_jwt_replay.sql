-- JWT-bearer assertions already exchanged at the token endpoint (RFC 7523 §3 item 7, RFC 8725):
-- one row per assertion, keyed by `iss` + `jti` when the assertion has a `jti`, else by the
-- SHA-256 of the assertion itself (google-auth and googleapis mint a fresh assertion per token
-- request, with `iat`/`exp` and no `jti`). A row lives until the assertion's `exp` (plus the clock
-- leeway): after that the assertion is refused as expired anyway. Rows are written only after the
-- assertion's signature verified, so only holders of a registered key can write here; expired
-- rows are pruned as new ones are inserted.
CREATE TABLE jwt_replay (
    assertion_key TEXT    PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX jwt_replay_by_expiry ON jwt_replay (expires_at_ms);
