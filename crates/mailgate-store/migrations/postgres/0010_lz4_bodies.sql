-- Message bodies and decision traces compressed with LZ4 instead of PostgreSQL's default pglz
-- (issue 16, the benchmark's floor; docs/performance.md). Both columns are over the 2 KB at which
-- PostgreSQL compresses a value, and every acceptance writes one of each: pglz spent about 44 us
-- of the server's CPU per 10 KB body, LZ4 about 4 us (5,000 inserts each, measured on this
-- project's machines). The SQLite store compresses decisions with LZ4 in the process for the same
-- reason (crates/mailgate-store/src/sqlite/packed.rs).
--
-- Rows already written keep their pglz values (both read back the same); a server built without
-- LZ4 support keeps pglz (the change is skipped with a notice, nothing else depends on it).
-- `decisions` is partitioned by day: its existing partitions are changed one by one, the ones made
-- later (mailgate_decision_partitions) take the parent's setting.
DO $$
DECLARE
    part REGCLASS;
BEGIN
    ALTER TABLE message_bodies ALTER COLUMN raw SET COMPRESSION lz4;
    ALTER TABLE decisions ALTER COLUMN body SET COMPRESSION lz4;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'decisions'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN body SET COMPRESSION lz4', part);
    END LOOP;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'LZ4 not available on this server: bodies and decisions stay pglz (%)', SQLERRM;
END;
$$;
