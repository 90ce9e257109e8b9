-- Limits exact across nodes (issue 16 item 3). Every node admits a send in one transaction that
-- locks the principal (`pg_advisory_xact_lock` on a hash of its counter key), reads its live
-- usage (this index: the last 24 h of `usage_log` for one principal, the `rate_state` row, the
-- unexpired `send_slots`), lets the engine's own arithmetic re-check the decision
-- (`mailgate_core::engine::counters::recheck`) and records the charge. A refused admission
-- writes nothing.
CREATE INDEX usage_log_by_principal ON usage_log (principal, at_ms);

-- A concurrent-send slot: taken by the admission, freed when the message is stored (or its
-- store write failed: then the usage row it names is refunded). A node that dies holding one
-- leaks nothing: a slot counts only until `until_ms`, and the node's next start deletes its
-- slots (`holder` is `<node>/<run>`).
CREATE TABLE send_slots (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    principal TEXT   NOT NULL,
    holder    TEXT   NOT NULL,
    until_ms  BIGINT NOT NULL,
    usage_seq BIGINT
);
CREATE INDEX send_slots_by_principal ON send_slots (principal, until_ms);
