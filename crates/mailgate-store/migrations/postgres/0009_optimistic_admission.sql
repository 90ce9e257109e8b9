-- Admission without holding a principal's lock across the network (issue 16, the benchmark's
-- floor; crates/mailgate-store/src/postgres/accept.rs).
--
-- Before: BEGIN, lock the batch's principals, read their usage, record the admitted sends,
-- COMMIT: five round trips, the locks held over three of them, and under load on two nodes
-- sharing a principal the lock wait was the largest item in pg_stat_statements.
--
-- Now: the node reads the usage (one statement, no lock), re-checks its batch with the engine's
-- arithmetic, and calls `mailgate_admit` (one statement, its own implicit transaction): the
-- function takes the same locks, checks that no admission of these principals happened since the
-- read (each principal's `admission_versions.version`, moved by every admission), and only then
-- records the sends. A version that moved records nothing (the function returns no rows): the
-- node reads again and re-checks; after a few such tries it admits with the locks held over its
-- read (the same function, in its own transaction), which always ends.
--
-- Why a version is enough: only an admission adds to a principal's usage or moves its rate
-- schedule. What may change between the read and the record without an admission only lowers
-- the numbers (a slot released, a send refunded, a row leaving the day's window), so a batch
-- re-checked on the read is within every limit at the record as well.
CREATE TABLE admission_versions (
    principal TEXT   PRIMARY KEY,
    version   BIGINT NOT NULL
);

-- Records the admitted sends of a batch when no admission of `principals` (sorted, distinct)
-- happened since their versions were read as `versions`; returns each recorded send's position in
-- the arrays (1-based) and its concurrent-send slot, or no rows when a version moved. The arrays
-- `who`, `at_ms`, `recipients`, `holder`, `until_ms` describe one admitted send each; `tat_who`
-- and `tat_ms` the rate schedules to move forward; rows of `principals` older than `cutoff_ms`
-- and slots past `now_ms` are deleted on the way (bounded by each principal's own limits).
CREATE FUNCTION mailgate_admit(
    lock_class INTEGER, principals TEXT[], versions BIGINT[],
    who TEXT[], at_ms BIGINT[], recipients BIGINT[], holder TEXT[], until_ms BIGINT[],
    tat_who TEXT[], tat_ms BIGINT[], cutoff_ms BIGINT, now_ms BIGINT)
RETURNS TABLE (admitted_ord BIGINT, slot_id BIGINT) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    -- Each statement below must see the commits of the lock's previous holder.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mailgate_admit needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    -- The message's durable commit flushes the WAL past this one (counters.rs says why).
    PERFORM set_config('synchronous_commit', 'off', true);
    -- In one fixed order, so two nodes' batches never wait for each other in a cycle.
    PERFORM pg_advisory_xact_lock(lock_class, k.h)
    FROM (SELECT DISTINCT hashtext(p) AS h FROM unnest(principals) AS p ORDER BY 1) k;
    IF EXISTS (SELECT 1 FROM unnest(principals, versions) AS x(p, seen)
               LEFT JOIN admission_versions v ON v.principal = x.p
               WHERE COALESCE(v.version, 0) <> x.seen) THEN
        RETURN;
    END IF;
    INSERT INTO admission_versions AS v (principal, version)
    SELECT p, 1 FROM unnest(principals) AS p ORDER BY p
    ON CONFLICT (principal) DO UPDATE SET version = v.version + 1;
    RETURN QUERY
    WITH rows AS MATERIALIZED (
             SELECT nextval(pg_get_serial_sequence('usage_log', 'seq')) AS seq, t.*
             FROM unnest(who, at_ms, recipients, holder, until_ms)
                  WITH ORDINALITY AS t(principal, at_ms, recipients, holder, until_ms, ord)),
         used AS (INSERT INTO usage_log (seq, principal, at_ms, recipients) OVERRIDING SYSTEM VALUE
                  SELECT r.seq, r.principal, r.at_ms, r.recipients FROM rows r),
         rate AS (INSERT INTO rate_state AS rs (principal, tat_ms)
                  SELECT x.principal, max(x.tat) FROM unnest(tat_who, tat_ms) AS x(principal, tat)
                  GROUP BY x.principal
                  ON CONFLICT (principal) DO UPDATE
                      SET tat_ms = GREATEST(rs.tat_ms, excluded.tat_ms)),
         gone AS (DELETE FROM usage_log l WHERE l.principal = ANY(principals) AND l.at_ms <= cutoff_ms),
         ended AS (DELETE FROM send_slots s WHERE s.principal = ANY(principals) AND s.until_ms <= now_ms),
         slots AS (INSERT INTO send_slots (principal, holder, until_ms, usage_seq)
                   SELECT r.principal, r.holder, r.until_ms, r.seq FROM rows r
                   RETURNING id, usage_seq)
    SELECT r.ord, s.id FROM rows r JOIN slots s ON s.usage_seq = r.seq;
END;
$$;
