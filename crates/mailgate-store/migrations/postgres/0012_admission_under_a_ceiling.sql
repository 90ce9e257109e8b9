-- Admission under a ceiling (issue 16, the benchmark's floor; crates/mailgate-store/src/postgres/
-- accept.rs, docs/performance.md run 9).
--
-- Before: a batch was recorded only if no admission of its principals had come in since the node
-- read their numbers (a version, 0009_optimistic_admission.sql). Two nodes admitting the same
-- principal therefore found each other's admission in nearly every batch: a usage read, a record
-- that missed, another read, a record (in bench/postgres.sh's two-node rows, 639 reads for 647
-- records).
--
-- Now, for a batch that no limit holds, the node asks the engine for the batch's ceiling: per
-- principal, the largest numbers (messages and recipients in the day's window, sends in flight,
-- rate schedule) at which every one of its sends is admitted with no limit exceeded
-- (`mailgate_core::engine::ceiling`). `mailgate_admit_within` takes the principals' locks, reads
-- their numbers, and records the batch if every principal's are at or below its ceiling: the
-- same outcome the engine would reach on those numbers, since every limit's check is monotone
-- (fewer sends or an earlier schedule never exceed a limit more). Admissions by other nodes in
-- between no longer matter, only whether the batch still fits. The numbers it read are returned
-- either way, so a batch that no longer fits is re-checked on them without another read.
--
-- The rate schedule of a batch recorded this way is moved from whatever the function finds:
-- `max(tat + add, floor)` (`mailgate_core::engine::TatShift`: what the sends do one by one, in a
-- form that composes). The comparison and that one `GREATEST` are all the arithmetic here; the
-- limits' rules stay in the engine.

-- The recording both ways share (moved out of mailgate_admit, otherwise unchanged but for the
-- rate schedule, now moved by (`tat_add`, `tat_floor`) per principal of `tat_who`; mailgate_admit
-- passes add 0 and the schedule it computed as floor, which is what it did before).
CREATE FUNCTION mailgate_record_admitted(
    principals TEXT[], who TEXT[], at_ms BIGINT[], recipients BIGINT[], holder TEXT[],
    until_ms BIGINT[], tat_who TEXT[], tat_add BIGINT[], tat_floor BIGINT[], cutoff_ms BIGINT,
    now_ms BIGINT)
RETURNS TABLE (admitted_ord BIGINT, slot_id BIGINT) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
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
         shift AS MATERIALIZED (
             SELECT x.principal, x.add_ms, x.floor_ms
             FROM unnest(tat_who, tat_add, tat_floor) AS x(principal, add_ms, floor_ms)),
         rate AS (INSERT INTO rate_state AS rs (principal, tat_ms)
                  SELECT s.principal, s.floor_ms FROM shift s
                  ON CONFLICT (principal) DO UPDATE
                      SET tat_ms = GREATEST(
                          rs.tat_ms + (SELECT s.add_ms FROM shift s WHERE s.principal = rs.principal),
                          excluded.tat_ms)),
         gone AS (DELETE FROM usage_log l WHERE l.principal = ANY(principals) AND l.at_ms <= cutoff_ms),
         ended AS (DELETE FROM send_slots s WHERE s.principal = ANY(principals) AND s.until_ms <= now_ms),
         slots AS (INSERT INTO send_slots (principal, holder, until_ms, usage_seq)
                   SELECT r.principal, r.holder, r.until_ms, r.seq FROM rows r
                   RETURNING id, usage_seq)
    SELECT r.ord, s.id FROM rows r JOIN slots s ON s.usage_seq = r.seq;
END;
$$;

-- What both admission functions do first (it was mailgate_admit's own opening in 0009): refuse
-- to run under another isolation than READ COMMITTED (each statement after the locks must see the
-- commits of the lock's previous holder), commit without waiting for the WAL flush (the message's
-- durable commit flushes the WAL past it; counters.rs says why), and take the principals' locks
-- in one fixed order, so two nodes' batches never wait for each other in a cycle. The setting and
-- the locks are the transaction's, so they last after this returns.
CREATE FUNCTION mailgate_admission_locks(lock_class INTEGER, principals TEXT[], caller TEXT)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% needs READ COMMITTED, not %',
            caller, current_setting('transaction_isolation');
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(lock_class, k.h)
    FROM (SELECT DISTINCT hashtext(p) AS h FROM unnest(principals) AS p ORDER BY 1) k;
END;
$$;

-- As in 0009 (same arguments, same answer), opening with mailgate_admission_locks and recording
-- through mailgate_record_admitted (a migration restates what it replaces).
CREATE OR REPLACE FUNCTION mailgate_admit(
    lock_class INTEGER, principals TEXT[], versions BIGINT[],
    who TEXT[], at_ms BIGINT[], recipients BIGINT[], holder TEXT[], until_ms BIGINT[],
    tat_who TEXT[], tat_ms BIGINT[], cutoff_ms BIGINT, now_ms BIGINT)
RETURNS TABLE (admitted_ord BIGINT, slot_id BIGINT) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    PERFORM mailgate_admission_locks(lock_class, principals, 'mailgate_admit');
    IF EXISTS (SELECT 1 FROM unnest(principals, versions) AS x(p, seen)
               LEFT JOIN admission_versions v ON v.principal = x.p
               WHERE COALESCE(v.version, 0) <> x.seen) THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT a.admitted_ord, a.slot_id
    FROM mailgate_record_admitted(principals, who, at_ms, recipients, holder, until_ms, tat_who,
                                  array_fill(0::BIGINT, ARRAY[cardinality(tat_who)]), tat_ms,
                                  cutoff_ms, now_ms) a;
END;
$$;

-- mailgate_usage_of as one SQL statement (it was PL/pgSQL, 0011), so that the planner inlines it
-- into mailgate_admit_within's read under the locks instead of calling it (a function call per
-- batch cost as much as the read: pg_stat_statements with `track = all`, bench/postgres.sh).
-- Without a SET clause, which would prevent inlining; called on its own it is now rare (a batch
-- that did not fit its ceiling, or that a hold limit holds), so its plan there matters little.
CREATE OR REPLACE FUNCTION mailgate_usage_of(principals TEXT[], cutoff_ms BIGINT, now_ms BIGINT)
RETURNS TABLE (principal TEXT, tat BIGINT, n BIGINT, r BIGINT, oldest BIGINT, in_flight BIGINT,
               version BIGINT)
LANGUAGE sql STABLE AS $$
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
        FROM usage_log l WHERE l.principal = p.principal AND l.at_ms <= cutoff_ms) x
$$;

-- Records a batch if each of `principals` (sorted, distinct) has, under its lock, numbers at or
-- below its ceiling (`ceil_*`, same order; a rate schedule never set counts as 0). Returns first
-- one row per principal with the numbers it read (`admitted_ord` NULL; the columns of
-- mailgate_usage_of), then, if it recorded, one row per recorded send (`admitted_ord`,
-- `slot_id`; the rest NULL). The other arguments are mailgate_record_admitted's.
CREATE FUNCTION mailgate_admit_within(
    lock_class INTEGER, principals TEXT[],
    ceil_tat BIGINT[], ceil_n BIGINT[], ceil_r BIGINT[], ceil_in_flight BIGINT[],
    who TEXT[], at_ms BIGINT[], recipients BIGINT[], holder TEXT[], until_ms BIGINT[],
    tat_who TEXT[], tat_add BIGINT[], tat_floor BIGINT[], cutoff_ms BIGINT, now_ms BIGINT)
RETURNS TABLE (admitted_ord BIGINT, slot_id BIGINT, principal TEXT, tat BIGINT, n BIGINT,
               r BIGINT, oldest BIGINT, in_flight BIGINT, version BIGINT)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    s_p TEXT[];
    s_tat BIGINT[];
    s_n BIGINT[];
    s_r BIGINT[];
    s_oldest BIGINT[];
    s_f BIGINT[];
    s_v BIGINT[];
BEGIN
    PERFORM mailgate_admission_locks(lock_class, principals, 'mailgate_admit_within');
    -- Read after the locks (a statement of its own: READ COMMITTED takes its snapshot now).
    SELECT array_agg(u.principal), array_agg(u.tat), array_agg(u.n), array_agg(u.r),
           array_agg(u.oldest), array_agg(u.in_flight), array_agg(u.version)
      INTO s_p, s_tat, s_n, s_r, s_oldest, s_f, s_v
      FROM mailgate_usage_of(principals, cutoff_ms, now_ms) u;
    RETURN QUERY
    SELECT NULL::BIGINT, NULL::BIGINT, x.*
    FROM unnest(s_p, s_tat, s_n, s_r, s_oldest, s_f, s_v) AS x;
    IF EXISTS (SELECT 1
               FROM unnest(s_p, s_tat, s_n, s_r, s_f) AS x(p, tat, n, r, f)
               JOIN unnest(principals, ceil_tat, ceil_n, ceil_r, ceil_in_flight)
                    AS c(p, tat, n, r, f) ON c.p = x.p
               WHERE COALESCE(x.tat, 0) > c.tat OR x.n > c.n OR x.r > c.r OR x.f > c.f) THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT a.admitted_ord, a.slot_id, NULL::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT,
           NULL::BIGINT, NULL::BIGINT, NULL::BIGINT
    FROM mailgate_record_admitted(principals, who, at_ms, recipients, holder, until_ms, tat_who,
                                  tat_add, tat_floor, cutoff_ms, now_ms) a;
END;
$$;
