-- Mailgate's schema on PostgreSQL: every table the SQLite store has (migrations/sqlite/), in
-- PostgreSQL's dialect, for several gateway nodes sharing one database (issue 16).
--
-- Design decisions that hold for every table:
-- * Times are BIGINT Unix milliseconds (`*_ms`), as the store traits speak them and as SQLite
--   keeps them: no time zone conversion anywhere, and the same numbers in both backends. The two
--   columns in seconds say so in their name (`at_secs`, `created_at_secs`).
-- * States are TEXT with a CHECK listing the one stored spelling of each value
--   (`mailgate_store::states`): a node that writes a misspelt state fails loudly instead of
--   storing a row no node can read back.
-- * Sequences are identity columns (`GENERATED ALWAYS AS IDENTITY`): unique across nodes
--   without coordination; only the order within one table matters (audit, usage, attempts).
-- * Bytes the store does not interpret (message bodies, decision traces) are BYTEA; TOAST
--   compresses and stores large ones out of line.
-- * Migrations run at start under an advisory lock (`postgres/mod.rs`), so two nodes starting
--   at once do not both apply one; a database with a migration this binary does not know is
--   refused (`StoreError::SchemaTooNew`).

-- ---------------------------------------------------------------------------------------------
-- The directory: one row per object, its body the JSON the directory file spells (kept as TEXT,
-- byte for byte: JSONB would reorder keys, and a stored object must read back as written). Every
-- node loads the whole directory into memory; the generation tells nodes to reload.
CREATE TABLE directory_objects (
    kind          TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    body          TEXT   NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    -- The order objects were first stored in (a snapshot lists them in it, as SQLite's rowid
    -- does), kept when an object is replaced.
    seq           BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (kind, id)
);

-- Counters with one row each. `directory_generation` increases by one with every committed
-- change; a commit reads it `FOR UPDATE` (the row lock serialises writers: optimistic
-- concurrency checked under the lock, so of two concurrent commits on one generation exactly one
-- wins and the other gets `Conflict`). A snapshot reads it and the objects in one REPEATABLE READ
-- transaction, so it is one generation whole.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('directory_generation', 0);

-- Who changed what in the directory, and when (never secrets: no body). Newest first is
-- `ORDER BY seq DESC`.
CREATE TABLE directory_audit (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_secs    BIGINT NOT NULL,
    actor      TEXT   NOT NULL,
    action     TEXT   NOT NULL CHECK (action IN ('create', 'update', 'delete')),
    kind       TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    generation BIGINT NOT NULL
);

-- Tokens for the admin API: only their SHA-256 (hex) is kept.
CREATE TABLE admin_tokens (
    name            TEXT PRIMARY KEY,
    token_sha256    TEXT   NOT NULL UNIQUE,
    created_at_secs BIGINT NOT NULL
);

-- ---------------------------------------------------------------------------------------------
-- Decisions: every refusal's trace and a sample of the allowed ones, found by decision id. The
-- largest table by far, so it is partitioned by day on `at_ms` (RANGE partitions, one per UTC
-- day, named `decisions_dYYYYMMDD`):
-- * Retention drops whole partitions: a day partition entirely older than the retention cutoff
--   in which no remaining message names a decision is dropped with `DROP TABLE` (no row-by-row
--   DELETE, no VACUUM storm, no bloat); a partition still named by a queued message is emptied
--   row by row of the decisions no message names, and dropped once it is empty.
-- * Partitions are created ahead by `mailgate_decision_partitions(now_ms, days_ahead)` (below):
--   at every start (under the migration lock) and by the daily retention job, for today and the
--   next days, so an insert never waits on DDL and never needs a partition that does not exist.
--   Creating a partition locks the parent briefly; ahead of time, nobody writes that day yet.
-- * `decisions_default` catches a decision whose day has no partition (a clock far off, a node
--   that was down for longer than the days created ahead, tests at time 0): an insert never
--   fails for want of a partition. Retention deletes from it row by row; it stays small.
-- The primary key must contain the partition key, so it is (id, at_ms): ids are unique by
-- construction (time-ordered, random suffix), and a lookup by id alone probes each partition's
-- index (a few dozen probes at a month's retention).
CREATE TABLE decisions (
    id        TEXT   NOT NULL,
    at_ms     BIGINT NOT NULL,
    door      TEXT   NOT NULL,
    principal TEXT   NOT NULL,
    verdict   TEXT   NOT NULL
        CHECK (verdict IN ('allowed', 'held', 'denied', 'pending', 'not_checked')),
    code      TEXT,
    -- The decision and its trace as JSON text, byte for byte as the gateway wrote it.
    body      BYTEA  NOT NULL,
    PRIMARY KEY (id, at_ms)
) PARTITION BY RANGE (at_ms);
-- Recent refusals (`mailgate support-bundle`) and retention walk decisions by time.
CREATE INDEX decisions_by_time ON decisions (at_ms);
CREATE TABLE decisions_default PARTITION OF decisions DEFAULT;

-- Creates the day partitions of `decisions` for the UTC day holding `now_ms` and the
-- `days_ahead` days after it, when missing. A day whose rows already sit in the default
-- partition (it was written before its partition existed) is left there: creating its partition
-- would fail, and the rows are found and purged in the default partition all the same.
CREATE FUNCTION mailgate_decision_partitions(now_ms BIGINT, days_ahead INTEGER)
RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    day_ms  CONSTANT BIGINT := 86400000;
    first   BIGINT := (now_ms / day_ms) * day_ms;
    lo      BIGINT;
    name    TEXT;
    created INTEGER := 0;
BEGIN
    IF now_ms < 0 THEN
        RETURN 0;
    END IF;
    FOR i IN 0..days_ahead LOOP
        lo := first + i * day_ms;
        name := 'decisions_d' || to_char(to_timestamp(lo / 1000) AT TIME ZONE 'UTC', 'YYYYMMDD');
        IF to_regclass(name) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF decisions FOR VALUES FROM (%s) TO (%s)',
                               name, lo, lo + day_ms);
                created := created + 1;
            EXCEPTION WHEN check_violation OR duplicate_table THEN
                -- Rows of that day are in the default partition already, or another node
                -- created it a moment ago: nothing to do.
                NULL;
            END;
        END IF;
    END LOOP;
    RETURN created;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Accepted sends per principal for the rolling 24 h limits (pruned after a day), and the GCRA
-- state of the rate limit per principal. Replayed into each node's counters at start today;
-- issue 16's exact admission across nodes charges these (or successors) atomically instead.
CREATE TABLE usage_log (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    principal  TEXT   NOT NULL,
    at_ms      BIGINT NOT NULL,
    recipients BIGINT NOT NULL
);
CREATE INDEX usage_log_by_time ON usage_log (at_ms);

-- One row per principal; the theoretical arrival time only moves forward
-- (`ON CONFLICT DO UPDATE SET tat_ms = GREATEST(...)`).
CREATE TABLE rate_state (
    principal TEXT PRIMARY KEY,
    tat_ms    BIGINT NOT NULL
);

-- ---------------------------------------------------------------------------------------------
-- The delivery queue, shared by every node: any node delivers any message.
--
-- Leases: a node takes due messages with
--   UPDATE messages SET lease_owner = $node, lease_until_ms = $until,
--                       lease_epoch = nextval('message_lease_epoch')
--   WHERE id IN (SELECT id FROM messages WHERE <due> ORDER BY <due time> LIMIT $n
--                FOR UPDATE SKIP LOCKED)
--   RETURNING ...
-- SKIP LOCKED: two nodes leasing at once never wait for each other and never take the same
-- row; no row lock is held once the lease is committed (never while talking to a smarthost).
--
-- Fencing: every lease takes a new `lease_epoch` from one sequence (unique across nodes and
-- restarts). Every write-back (an attempt's outcome, a capture) is one UPDATE conditioned on the
-- lease it holds (`WHERE id = $id AND lease_owner = $node AND lease_epoch = $epoch`): a node
-- paused past its lease, whose message another node leased since, changes zero rows and records
-- nothing; the write-back's other rows (recipients, history, a DSN) are written only after that
-- UPDATE matched, in the same transaction.
CREATE SEQUENCE message_lease_epoch AS BIGINT;

-- Accepted messages. The row is committed (with `synchronous_commit = on`) before any door
-- answers "accepted". The body lives apart (`message_bodies`): every lease and write-back
-- rewrites this row, and PostgreSQL writes a new row version each time; a small row keeps that
-- cheap.
CREATE TABLE messages (
    id              TEXT    PRIMARY KEY,
    decision_id     TEXT    NOT NULL,
    accepted_at_ms  BIGINT  NOT NULL,
    door            TEXT    NOT NULL,
    principal       TEXT    NOT NULL,
    envelope_from   TEXT    NOT NULL,
    -- The envelope's recipients in order (an array: no JSON to parse on every lease).
    recipients      TEXT[]  NOT NULL,
    size            BIGINT  NOT NULL,
    state           TEXT    NOT NULL
        CHECK (state IN ('held', 'queued', 'deferred', 'delivered', 'failed', 'captured')),
    hold_until_ms   BIGINT,
    next_attempt_ms BIGINT,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until_ms  BIGINT,
    lease_epoch     BIGINT,
    updated_at_ms   BIGINT,
    done_at_ms      BIGINT
);
-- Leasing looks only at messages not final; a partial index keeps the finished ones (most rows,
-- until retention) out of it. Ordered by when each becomes due.
CREATE INDEX messages_due ON messages (COALESCE(next_attempt_ms, accepted_at_ms), id)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX messages_held ON messages (hold_until_ms) WHERE state = 'held';
-- Listings (`mailgate queue`, captured mail) are newest first within a state.
CREATE INDEX messages_by_state ON messages (state, accepted_at_ms);
-- Retention keeps a decision while a message still names it.
CREATE INDEX messages_by_decision ON messages (decision_id);
-- Retention finds finished messages by when they finished.
CREATE INDEX messages_finished ON messages (COALESCE(done_at_ms, accepted_at_ms))
    WHERE state IN ('delivered', 'failed', 'captured');

-- Message bodies, written once at acceptance in the same transaction as the message. The
-- foreign keys below cascade: deleting a message (retention, `mailgate queue delete`) removes
-- its body, recipients and history in one statement, and nothing can outlive its message.
CREATE TABLE message_bodies (
    message_id TEXT  PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    raw        BYTEA NOT NULL
);

-- One row per recipient, made on the first lease (acceptance stays one small row plus the
-- body). `position` keeps the envelope's order (SQLite reads it from rowid).
CREATE TABLE message_recipients (
    message_id    TEXT    NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient     TEXT    NOT NULL,
    position      INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'deferred', 'delivered', 'failed')),
    attempts      BIGINT  NOT NULL DEFAULT 0,
    code          TEXT,             -- upstream.* reason code of the last outcome
    reply         TEXT,             -- the upstream's last reply, verbatim
    smarthost     TEXT,
    updated_at_ms BIGINT,
    PRIMARY KEY (message_id, recipient)
);

-- Every attempt for every recipient, oldest first by `seq`.
CREATE TABLE delivery_attempts (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      TEXT   NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    at_ms           BIGINT NOT NULL,
    smarthost       TEXT,
    recipient       TEXT   NOT NULL,
    outcome         TEXT   NOT NULL CHECK (outcome IN ('pending', 'deferred', 'delivered', 'failed')),
    code            TEXT,
    reply           TEXT,
    next_attempt_ms BIGINT
);
CREATE INDEX delivery_attempts_by_message ON delivery_attempts (message_id, seq);

-- ---------------------------------------------------------------------------------------------
-- Faults injected by `mailgate simulate`: the principal's (lower-cased) sends fail with `code`
-- until `until_ms`. In the shared database, so every node sees them at its next reload.
CREATE TABLE simulated_faults (
    principal     TEXT   PRIMARY KEY,
    code          TEXT   NOT NULL,
    until_ms      BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    actor         TEXT   NOT NULL
);

-- OAuth 2.0 tokens issued by Mailgate's authorization server: access tokens, refresh tokens and
-- authorization codes, by SHA-256 only (a stolen database yields no usable token). Single use
-- and revocation are conditional UPDATEs (`SET used = true WHERE ... AND NOT used`): atomic on
-- every node, so a code or refresh token is used at most once even when two nodes race.
CREATE TABLE oauth_tokens (
    token_sha256  TEXT    PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('access', 'refresh', 'code')),
    -- Who, for which client, with what (`mailgate_gateway::Grant`). JSONB: read back as a JSON
    -- value (compared by content, not by spelling).
    grant_body    JSONB   NOT NULL,
    scopes        TEXT[]  NOT NULL,
    family        TEXT    NOT NULL,  -- refresh-token family (rotation, reuse detection)
    created_at_ms BIGINT  NOT NULL,
    expires_at_ms BIGINT  NOT NULL,
    revoked       BOOLEAN NOT NULL DEFAULT false,
    used          BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX oauth_tokens_by_family ON oauth_tokens (family);

-- JWT-bearer assertions already exchanged at the token endpoint (RFC 7523 §3 item 7): one row
-- per assertion until its `exp`; a live row makes a second exchange a replay, on every node.
-- Expired rows are pruned a bounded number at a time as new ones are inserted.
CREATE TABLE jwt_replay (
    assertion_key TEXT   PRIMARY KEY,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX jwt_replay_by_expiry ON jwt_replay (expires_at_ms);

-- The gateway processes serving from this database and the directory generation each has in
-- force: a writer waits until every live node shows its new generation. With several machines,
-- `host` tells a row of this machine (whose `pid` can be checked) from one of another (which
-- only `seen_ms` ages out).
CREATE TABLE nodes (
    id          TEXT   PRIMARY KEY,
    host        TEXT   NOT NULL,
    pid         BIGINT NOT NULL,
    generation  BIGINT NOT NULL,
    seen_ms     BIGINT NOT NULL,
    interval_ms BIGINT NOT NULL
);
