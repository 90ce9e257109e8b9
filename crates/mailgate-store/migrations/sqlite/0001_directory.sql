-- The directory: one row per object (user, key, domain, ...), its body the JSON the directory file
-- spells. The whole directory is small enough to load into memory on every node; a generation
-- counter tells running servers when to reload it.
CREATE TABLE directory_objects (
    kind       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('directory_generation', 0);

-- Who changed what in the directory, and when (never secrets).
CREATE TABLE directory_audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    generation INTEGER NOT NULL
);

-- Tokens for the admin API: only their SHA-256 is kept.
CREATE TABLE admin_tokens (
    name         TEXT PRIMARY KEY,
    token_sha256 TEXT    NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL
);
