-- A send admitted and its message stored in ONE transaction (issue 16, the benchmark's floor;
-- crates/mailgate-store/src/postgres/accept.rs, docs/performance.md run 10).
--
-- Before: every send took two steps, each a batch of its own writer and a round trip of its own:
-- the admission (mailgate_admit_within, committed without waiting for the WAL flush), then the
-- message (decisions, message, body, recipients, the slot freed; committed durably). A send
-- waited for two batches to gather and two statements to run, and each admission left a
-- concurrent-send slot that the message's statement deleted a moment later.
--
-- Now a batch of sends whose messages are at hand, that no limit holds and that fits under its
-- ceiling is admitted and stored by one call of mailgate_admit_and_store: the admission exactly
-- as mailgate_admit_within does it (the principals' locks, their numbers read under them, the
-- batch recorded only if each principal's are at or below its ceiling), then, in the same
-- transaction, the messages written by mailgate_store_messages, and the commit durable. The
-- locks are held until that commit, so another node's admission of the same principals waits
-- for it and then reads numbers that include these sends; no other node ever sees them as sends
-- in flight (their slots are taken and freed inside the transaction). A batch that does not fit
-- records and writes nothing (only the numbers read are returned): the node then admits its sends
-- the two-step way, which re-checks each in arrival order. A message that cannot be written
-- (a duplicate id) rolls the whole call back, admission included: nothing is charged.
--
-- Concurrent sends: the sends of a batch at once are in flight inside a transaction no other
-- node can see, so while it runs every other admission of its principals waits for its locks.
-- That is a commit's wait (a few ms), and the batch itself never holds more sends than the
-- concurrency limit leaves. But when the store stalls (a lock on the messages, a commit that
-- does not return), those waiting sends would pile up unseen instead of being refused as the
-- limit says. So the call waits at most 100 ms for any lock (`lock_timeout`, its transaction
-- only): past that it fails as a whole and its sends take the two steps, whose slots every
-- node sees (tests/it/limits.rs, a_concurrency_limit_of_two_holds_across_nodes).

-- The message statement of accept.rs's store_batch, moved here unchanged so that both ways run
-- the same statement; it now returns every message written (`lease_epoch` NULL for one not
-- handed off), so a caller can tell a batch written from one not.
CREATE FUNCTION mailgate_store_messages(
    ids TEXT[], decision_ids TEXT[], at_ms BIGINT[], doors TEXT[], principals TEXT[],
    env_from TEXT[], rcpts TEXT[], sizes BIGINT[], states TEXT[], holds BIGINT[], raws BYTEA[],
    d_ids TEXT[], d_at_ms BIGINT[], d_doors TEXT[], d_principals TEXT[], d_verdicts TEXT[],
    d_codes TEXT[], d_bodies BYTEA[], slots BIGINT[], owner TEXT, lease_ms BIGINT,
    handed BOOLEAN[])
RETURNS TABLE (message_id TEXT, lease_epoch BIGINT) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH d AS (
             INSERT INTO decisions (id, at_ms, door, principal, verdict, code, body)
             SELECT * FROM UNNEST(d_ids, d_at_ms, d_doors, d_principals, d_verdicts, d_codes,
                                  d_bodies)
             ON CONFLICT DO NOTHING),
         m AS (
             INSERT INTO messages (id, decision_id, accepted_at_ms, door, principal, envelope_from,
                                   recipients, size, state, hold_until_ms, lease_owner,
                                   lease_until_ms, lease_epoch, updated_at_ms)
             SELECT t.id, t.decision_id, t.at, t.door, t.principal, t.env_from,
                    ARRAY(SELECT jsonb_array_elements_text(t.rcpt::jsonb)), t.size, t.state,
                    t.hold,
                    CASE WHEN t.handed THEN owner END, CASE WHEN t.handed THEN t.at + lease_ms END,
                    CASE WHEN t.handed THEN nextval('message_lease_epoch') END,
                    CASE WHEN t.handed THEN t.at END
             FROM unnest(ids, decision_ids, at_ms, doors, principals, env_from, rcpts, sizes,
                         states, holds, handed)
                  AS t(id, decision_id, at, door, principal, env_from, rcpt, size, state, hold,
                       handed)
             RETURNING id, lease_epoch, recipients, accepted_at_ms),
         b AS (
             INSERT INTO message_bodies (message_id, raw)
             SELECT b.id, b.raw FROM unnest(ids, raws) AS b(id, raw)
             WHERE b.id IN (SELECT m.id FROM m)),
         -- A message handed off is leased already: its recipient rows are made now, as its
         -- first lease would (queue.rs, lease_due).
         r AS (
             INSERT INTO message_recipients (message_id, recipient, position, state,
                                             updated_at_ms)
             SELECT m.id, x.recipient, x.position::integer, 'pending', m.accepted_at_ms
             FROM m, unnest(m.recipients) WITH ORDINALITY AS x(recipient, position)
             WHERE m.lease_epoch IS NOT NULL
             ON CONFLICT (message_id, recipient) DO NOTHING),
         s AS (
             DELETE FROM send_slots WHERE id = ANY(slots))
    SELECT m.id, m.lease_epoch FROM m;
END;
$$;

-- mailgate_admit_within's arguments (the admission), then mailgate_store_messages' but the
-- slots (the messages; the slots are the ones this admission takes). Returns first one row per
-- principal with the numbers read under the locks (`message_id` NULL; the columns of
-- mailgate_usage_of), then, if the batch fitted, one row per message written (`principal` and
-- the numbers NULL).
CREATE FUNCTION mailgate_admit_and_store(
    lock_class INTEGER, lock_principals TEXT[],
    ceil_tat BIGINT[], ceil_n BIGINT[], ceil_r BIGINT[], ceil_in_flight BIGINT[],
    who TEXT[], who_at_ms BIGINT[], recipients BIGINT[], holder TEXT[], until_ms BIGINT[],
    tat_who TEXT[], tat_add BIGINT[], tat_floor BIGINT[], cutoff_ms BIGINT, now_ms BIGINT,
    ids TEXT[], decision_ids TEXT[], at_ms BIGINT[], doors TEXT[], principals TEXT[],
    env_from TEXT[], rcpts TEXT[], sizes BIGINT[], states TEXT[], holds BIGINT[], raws BYTEA[],
    d_ids TEXT[], d_at_ms BIGINT[], d_doors TEXT[], d_principals TEXT[], d_verdicts TEXT[],
    d_codes TEXT[], d_bodies BYTEA[], owner TEXT, lease_ms BIGINT, handed BOOLEAN[])
RETURNS TABLE (principal TEXT, tat BIGINT, n BIGINT, r BIGINT, oldest BIGINT, in_flight BIGINT,
               version BIGINT, message_id TEXT, lease_epoch BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    -- The commit's durability as the session has it: the admission's locks turn it off for the
    -- transaction (0012), the messages need it back.
    durable TEXT := current_setting('synchronous_commit');
    taken BIGINT[];
    s_p TEXT[];
    s_tat BIGINT[];
    s_n BIGINT[];
    s_r BIGINT[];
    s_oldest BIGINT[];
    s_f BIGINT[];
    s_v BIGINT[];
BEGIN
    -- Never wait long for a lock: a batch whose principal another transaction holds for more
    -- than this (another batch of it stalled in its commit, say) or whose messages wait on a
    -- lock fails as a whole, and its sends take the two steps, where sends in flight are seen
    -- by every node and a concurrency limit refuses what exceeds it.
    PERFORM set_config('lock_timeout', '100ms', true);
    SELECT array_agg(a.slot_id) FILTER (WHERE a.admitted_ord IS NOT NULL),
           array_agg(a.principal) FILTER (WHERE a.admitted_ord IS NULL),
           array_agg(a.tat) FILTER (WHERE a.admitted_ord IS NULL),
           array_agg(a.n) FILTER (WHERE a.admitted_ord IS NULL),
           array_agg(a.r) FILTER (WHERE a.admitted_ord IS NULL),
           array_agg(a.oldest) FILTER (WHERE a.admitted_ord IS NULL),
           array_agg(a.in_flight) FILTER (WHERE a.admitted_ord IS NULL),
           array_agg(a.version) FILTER (WHERE a.admitted_ord IS NULL)
      INTO taken, s_p, s_tat, s_n, s_r, s_oldest, s_f, s_v
      FROM mailgate_admit_within(lock_class, lock_principals, ceil_tat, ceil_n, ceil_r,
                                 ceil_in_flight, who, who_at_ms, recipients, holder, until_ms,
                                 tat_who, tat_add, tat_floor, cutoff_ms, now_ms) a;
    RETURN QUERY
    SELECT x.*, NULL::TEXT, NULL::BIGINT
    FROM unnest(s_p, s_tat, s_n, s_r, s_oldest, s_f, s_v) AS x;
    IF taken IS NULL THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', durable, true);
    RETURN QUERY
    SELECT NULL::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT,
           NULL::BIGINT, s.message_id, s.lease_epoch
    FROM mailgate_store_messages(ids, decision_ids, at_ms, doors, principals, env_from, rcpts,
                                 sizes, states, holds, raws, d_ids, d_at_ms, d_doors,
                                 d_principals, d_verdicts, d_codes, d_bodies, taken, owner,
                                 lease_ms, handed) s;
END;
$$;
