-- Failed-authentication counts shared by every node (issue 16 item 5): the gateway's lockout
-- counts each failure here as well as in its own memory, so guesses spread over several nodes
-- still lock the login (and the network) on all of them. Clients that have not authenticated
-- cause these writes, so the table is bounded by construction (crates/mailgate-store/src/lockout.rs):
-- one row per key (an upsert); a key is a short string the gateway makes (a hash of the login
-- and the client network, or the network), never a login in clear and never a secret; a row
-- that is not locked is forgotten `forget_after` after its last failure or lock (swept when room
-- is needed); at most `max_rows` rows, beyond which a new key is not written and the gateway
-- fails closed for its network. The rate of writes is bounded by the gateway (docs/security.md).
CREATE TABLE auth_failures (
    key             TEXT   PRIMARY KEY,
    failures        BIGINT NOT NULL,
    last_ms         BIGINT NOT NULL,
    locked_until_ms BIGINT
);
