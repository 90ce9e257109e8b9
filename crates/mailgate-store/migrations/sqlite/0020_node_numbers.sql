-- Message-id node numbers (issue 16 item 5): the same table as PostgreSQL's (see
-- migrations/postgres/0007_node_numbers.sql). One node serves an SQLite file, so it leases
-- number 0 (unless an earlier node id's lease is still running); leased the same way so the
-- contract is one for both stores.
CREATE TABLE node_numbers (
    number   INTEGER PRIMARY KEY CHECK (number BETWEEN 0 AND 63),
    holder   TEXT    UNIQUE,
    until_ms INTEGER NOT NULL DEFAULT 0
);
WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < 63)
INSERT INTO node_numbers (number) SELECT x FROM n;
