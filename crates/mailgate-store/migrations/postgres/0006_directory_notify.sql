-- Directory changes pushed to every node (issue 16 item 5): a committed change to the directory
-- generation, or to the injected faults (`mailgate simulate`, which every node reloads with the
-- directory), sends a NOTIFY on the channel `mailgate_directory`. Each node LISTENs on a
-- connection of its own (crates/mailgate-store/src/postgres/changes.rs) and reloads at once;
-- its periodic re-check (`directory.reload_interval_ms`) stays the fallback for a notification
-- lost while that connection was down.
--
-- In the database, not in the writers: every writer (`mailgate apply`, the imperative verbs, a
-- door's settings API, another version of Mailgate, an operator's SQL) announces by committing,
-- and only then: a NOTIFY is delivered at commit, never for a rolled-back change.
--
-- Never on the send path: only `meta`'s directory generation (moved by directory commits alone)
-- and `simulated_faults` carry a trigger. A transaction that notifies takes, at commit, a lock
-- every notifying commit in the cluster shares; directory and fault changes are rare, sends are
-- not, so no table a send writes may ever get one.
--
-- The payload is informative only (`directory <generation>` or `faults`): a listener reloads
-- both on any notification.
CREATE FUNCTION mailgate_notify_directory() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'meta' THEN
        PERFORM pg_notify('mailgate_directory', 'directory ' || NEW.value);
    ELSE
        PERFORM pg_notify('mailgate_directory', 'faults');
    END IF;
    RETURN NULL;
END
$$;

-- One row of `meta` is the generation; a commit moves it by one (postgres/directory.rs).
CREATE TRIGGER mailgate_directory_changed
    AFTER UPDATE OF value ON meta
    FOR EACH ROW
    WHEN (NEW.key = 'directory_generation' AND NEW.value IS DISTINCT FROM OLD.value)
    EXECUTE FUNCTION mailgate_notify_directory();

-- Once per statement: set, replace or clear a fault (identical payloads in one transaction are
-- delivered once).
CREATE TRIGGER mailgate_faults_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON simulated_faults
    FOR EACH STATEMENT
    EXECUTE FUNCTION mailgate_notify_directory();
