-- Message-id node numbers (issue 16 item 5): a message id is 48 bits of Unix ms, 6 bits of node
-- number and a 10-bit counter (crates/mailgate-store/src/store.rs, `message_id`), so two nodes on
-- this database never make the same id. Each running node leases one of the 64 numbers when it
-- joins and renews its deadline with its heartbeat; a number whose holder's deadline passed is
-- free again, and a node started again with the same `[node] id` (the holder) takes its own
-- number back. Leases take an advisory lock of their own (crates/mailgate-store/src/postgres/
-- node_numbers.rs), so two nodes never take one free number. The 64 rows exist from the start
-- (holder NULL: never leased); a holder holds at most one number.
CREATE TABLE node_numbers (
    number   SMALLINT PRIMARY KEY CHECK (number BETWEEN 0 AND 63),
    holder   TEXT     UNIQUE,
    until_ms BIGINT   NOT NULL DEFAULT 0
);
INSERT INTO node_numbers (number) SELECT generate_series(0, 63);
