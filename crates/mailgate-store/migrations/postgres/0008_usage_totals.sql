-- Running totals of `usage_log` per principal (issue 16, found by bench/postgres.sh's
-- pg_stat_statements): an admission used to count a principal's whole day of usage rows
-- (`count(*)`, `sum(recipients)` over the last 24 h) while holding the principal's lock, so its
-- cost grew with the day's volume (0.5-1 ms at 2,000-4,000 rows; a principal allowed 100,000 a
-- day would have paid about 20 ms a send, and every node waits for it).
--
-- `usage_totals` holds, for each principal, the number of its rows in `usage_log` and the sum of
-- their recipients, kept by the triggers below on every insert and delete, whoever makes them
-- (admission, refund, retention, the counters' replay). The day's usage is then the totals less
-- the rows that have left the window but are not deleted yet (an index range over
-- `usage_log_by_principal` holding only those, usually none: each admission deletes its
-- principals' expired rows), and the oldest row in the window is one index probe. Exact: the
-- totals and the rows change in the same transaction, so a statement sees both or neither.
--
-- Row locks: each trigger updates its principals' totals in principal order, so two statements
-- touching several principals (an admission batch, a retention pass) never wait for each other in
-- a cycle. An admission holds its principals' advisory locks already, so the row lock adds no
-- wait between admissions.
CREATE TABLE usage_totals (
    principal  TEXT   PRIMARY KEY,
    messages   BIGINT NOT NULL,
    recipients BIGINT NOT NULL
);

INSERT INTO usage_totals (principal, messages, recipients)
SELECT principal, count(*), COALESCE(sum(recipients), 0) FROM usage_log GROUP BY principal;

CREATE FUNCTION usage_totals_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_totals AS t (principal, messages, recipients)
    SELECT principal, count(*), COALESCE(sum(recipients), 0)
    FROM added GROUP BY principal ORDER BY principal
    ON CONFLICT (principal) DO UPDATE
        SET messages = t.messages + excluded.messages,
            recipients = t.recipients + excluded.recipients;
    RETURN NULL;
END;
$$;

CREATE FUNCTION usage_totals_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE usage_totals t
    SET messages = t.messages - g.n, recipients = t.recipients - g.r
    FROM (SELECT principal, count(*) AS n, COALESCE(sum(recipients), 0) AS r
          FROM removed GROUP BY principal) g
    WHERE t.principal = g.principal
      -- The rows to update locked in principal order (see above).
      AND t.principal IN (SELECT principal FROM usage_totals
                          WHERE principal IN (SELECT principal FROM removed)
                          ORDER BY principal FOR UPDATE);
    RETURN NULL;
END;
$$;

CREATE TRIGGER usage_totals_on_insert AFTER INSERT ON usage_log
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION usage_totals_add();
CREATE TRIGGER usage_totals_on_delete AFTER DELETE ON usage_log
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION usage_totals_remove();
