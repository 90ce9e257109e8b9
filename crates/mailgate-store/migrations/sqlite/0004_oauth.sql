-- OAuth 2.0 tokens issued by Mailgate's authorization server: access tokens, refresh tokens and
-- authorization codes. Only the SHA-256 of each token is kept, so a stolen database yields no
-- usable token, and revocation is a row update that takes effect at once.
CREATE TABLE oauth_tokens (
    token_sha256  TEXT    PRIMARY KEY,
    kind          TEXT    NOT NULL,              -- access | refresh | code
    grant_body    TEXT    NOT NULL,              -- JSON: who, for which client, with what
    scopes        TEXT    NOT NULL,              -- space-delimited
    family        TEXT    NOT NULL,              -- refresh-token family (rotation, reuse detection)
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    revoked       INTEGER NOT NULL DEFAULT 0,
    used          INTEGER NOT NULL DEFAULT 0     -- codes and rotated refresh tokens
);
CREATE INDEX oauth_tokens_by_family ON oauth_tokens (family);
