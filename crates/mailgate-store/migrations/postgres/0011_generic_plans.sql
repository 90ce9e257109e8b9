-- Admission's statements planned once per connection, not at every call (issue 16, the
-- benchmark's floor; docs/performance.md, run 7). With PostgreSQL's default `plan_cache_mode`
-- (auto), a prepared statement whose custom plan looks cheaper than its generic one is planned
-- again at every execution. The admission's two statements were: the batch's usage read (the
-- generic plan assumes an array of ten principals, the custom one sees one) and the record inside
-- `mailgate_admit` (a CTE of six parts). In bench/postgres.sh's two-node Gmail row that planning
-- took 0.4 ms per usage read and 0.16 ms per record: more server CPU than their execution.
--
-- Both now run with `plan_cache_mode = force_generic_plan`, set on the functions only: their
-- statements are index lookups and UNNEST inserts on one principal's rows, whose best plan does
-- not depend on the values. Not on the connections: there a generic plan of a lookup in the
-- partitioned `decisions` would lock every day partition (PostgreSQL 15 locks a cached generic
-- plan's partitions before pruning them), and a lookup would then wait for a retention DROP.

ALTER FUNCTION mailgate_admit(INTEGER, TEXT[], BIGINT[], TEXT[], BIGINT[], BIGINT[], TEXT[],
                              BIGINT[], TEXT[], BIGINT[], BIGINT, BIGINT)
    SET plan_cache_mode = force_generic_plan;

-- The usage and admission version of each of `principals` (crates/mailgate-store/src/postgres/
-- accept.rs, `read_many`): rows used within the last day up to `cutoff_ms` are not counted, slots
-- count until their `until_ms` passes `now_ms`. A STABLE function: it reads with the snapshot of
-- the statement that calls it (READ COMMITTED: taken after the caller's locks, if any).
CREATE FUNCTION mailgate_usage_of(principals TEXT[], cutoff_ms BIGINT, now_ms BIGINT)
RETURNS TABLE (principal TEXT, tat BIGINT, n BIGINT, r BIGINT, oldest BIGINT, in_flight BIGINT,
               version BIGINT)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT p.principal,
           (SELECT rs.tat_ms FROM rate_state rs WHERE rs.principal = p.principal),
           COALESCE(t.messages, 0) - x.n,
           (COALESCE(t.recipients, 0) - x.r)::BIGINT,
           (SELECT min(l.at_ms) FROM usage_log l
             WHERE l.principal = p.principal AND l.at_ms > cutoff_ms),
           (SELECT count(*) FROM send_slots s
             WHERE s.principal = p.principal AND s.until_ms > now_ms),
           COALESCE((SELECT v.version FROM admission_versions v
                      WHERE v.principal = p.principal), 0)
    FROM unnest(principals) AS p(principal)
    LEFT JOIN usage_totals t ON t.principal = p.principal
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, COALESCE(sum(l.recipients), 0) AS r
        FROM usage_log l WHERE l.principal = p.principal AND l.at_ms <= cutoff_ms) x;
END;
$$;
