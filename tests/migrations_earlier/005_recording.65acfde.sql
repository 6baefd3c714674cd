-- session-lens 005: a session first seen deleted is deleted since that event;
-- the newest event costs one index probe less.
-- When the first event to reach the store is a delete (the creation still in
-- another recorder's spool, or tracking begun late), the row is inserted in
-- DELETED: deleted_at is the delete's time, as an update into DELETED sets it.
-- The state before an event in time is read from the events only when the row
-- cannot say it (a late event, or no row): most events arrive newest, row there.

UPDATE {table} AS t SET deleted_at = t.updated_at
 WHERE t.state = 'DELETED' AND t.deleted_at IS NULL
   AND EXISTS (SELECT 1 FROM {events} AS e WHERE e.session_id = t.{id}::text);

-- One observed event, exactly once. Returns what it found:
--   'before_horizon'  older than the pruned history: not applied again
--   'future'          stamped further ahead of the database's clock than
--                     session_lens.max_ahead (default 5 minutes): refused
--   'duplicate'       already recorded
--   'late:<state>'    older than the session's latest event: audited in its place
--                     in time, the state untouched; <state> the one before it then
--   '<state>'/'none'  the newest: applied; the state before it
CREATE OR REPLACE FUNCTION {record}(
    p_event uuid, p_session text, p_action text, p_state text, p_ok boolean,
    p_at timestamptz, p_reason text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    target text := CASE WHEN p_ok THEN p_state END;  -- NULL: no row after it
    before text;
    prior text;
    newest boolean;
    who text := coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user);
BEGIN
    IF p_at < (SELECT pruned_before FROM {tracking}) THEN
        RETURN 'before_horizon';
    END IF;
    IF p_at > clock_timestamp() + coalesce(
            nullif(current_setting('session_lens.max_ahead', true), '')::interval,
            interval '5 minutes') THEN
        RETURN 'future';
    END IF;
    -- One session's events one at a time, whichever recorder brings them.
    PERFORM pg_advisory_xact_lock(1397051211, hashtext(p_session));
    INSERT INTO {events} (event_id, session_id, action, occurred_at, ok)
    VALUES (p_event, p_session, p_action, p_at, p_ok)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'duplicate';
    END IF;
    -- The newest of its session: the first in the index's order, now it is in.
    newest := (SELECT e.event_id FROM {events} AS e WHERE e.session_id = p_session
                ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT 1) = p_event;
    PERFORM set_config('session_lens.occurred_at', p_at::text, true),
            set_config('session_lens.audited', 'on', true),
            set_config('session_lens.any_transition', 'on', true);
    SELECT state INTO before FROM {table} WHERE {id} = p_session FOR UPDATE;
    -- The state just before this event in time: for the newest, the row's when there
    -- is one (someone else may have written it too); else what the latest earlier
    -- event led to.
    IF newest AND before IS NOT NULL THEN
        prior := before;
    ELSE
        SELECT CASE WHEN coalesce(e.ok, true) THEN
                   CASE e.action WHEN 'create' THEN 'ACTIVE' WHEN 'pause' THEN 'PAUSED'
                        WHEN 'resume' THEN 'ACTIVE' WHEN 'stop' THEN 'STOPPED'
                        WHEN 'delete' THEN 'DELETED' WHEN 'restore' THEN 'STOPPED'
                        WHEN 'archive' THEN 'ARCHIVED' END
               END
          INTO prior
          FROM {events} AS e
         WHERE e.session_id = p_session AND (e.occurred_at, e.event_id) < (p_at, p_event)
         ORDER BY e.occurred_at DESC, e.event_id DESC
         LIMIT 1;
    END IF;
    IF newest THEN
        IF NOT p_ok THEN
            NULL;  -- a creation that did not complete leaves no row
        ELSIF target IS NULL THEN
            DELETE FROM {table} WHERE {id} = p_session;
        ELSIF before IS NULL THEN
            INSERT INTO {table} ({id}, state, created_at, updated_at, deleted_at)
            VALUES (p_session, target, p_at, p_at, CASE WHEN target = 'DELETED' THEN p_at END);
        ELSE
            UPDATE {table} SET state = target WHERE {id} = p_session;
        END IF;
    ELSIF p_action = 'create' AND p_ok THEN
        UPDATE {table} SET created_at = p_at WHERE {id} = p_session AND created_at > p_at;
    END IF;
    INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor, reason)
    VALUES (p_session, p_at, CASE WHEN p_ok THEN prior ELSE 'CREATING' END, target,
            'observed', who, p_reason);
    PERFORM set_config('session_lens.audited', '', true);
    IF newest THEN
        RETURN coalesce(prior, 'none');
    END IF;
    RETURN 'late:' || coalesce(prior, 'none');
END
$$;
