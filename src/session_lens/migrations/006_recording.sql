-- session-lens 006: a database migrated from an earlier text of 002 or 004 ends
-- where one migrated from their released texts does.
-- 002 first shipped without {record_batch}; 004 (and 005, a version folded into
-- 004 and never used again) first shipped other bodies of {record}, one of which
-- inserted a session first seen deleted without deleted_at. Both functions are
-- defined here again exactly as 002 and 004 define them now, and such rows get
-- the delete's time. On a database migrated from the released texts this changes
-- nothing.

UPDATE {table} AS t SET deleted_at = t.updated_at
 WHERE t.state = 'DELETED' AND t.deleted_at IS NULL
   AND EXISTS (SELECT 1 FROM {events} AS e WHERE e.session_id = t.{id}::text);

CREATE OR REPLACE FUNCTION {record}(
    p_event uuid, p_session text, p_action text, p_state text, p_ok boolean,
    p_at timestamptz, p_reason text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    target text := CASE WHEN p_ok THEN p_state END;  -- NULL: no row after it
    before text;
    before_at timestamptz;
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
    SELECT state, updated_at INTO before, before_at
      FROM {table} WHERE {id} = p_session FOR UPDATE;
    -- Not older than the row's state either: a row imported or written with SQL
    -- reached its state at updated_at.
    newest := newest AND (before_at IS NULL OR p_at >= before_at);
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

-- A batch in one round trip, in order; returns what {record} returned for each.
CREATE OR REPLACE FUNCTION {record_batch}(
    p_events uuid[], p_sessions text[], p_actions text[], p_states text[], p_oks boolean[],
    p_ats timestamptz[], p_reasons text[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    results text[] := ARRAY[]::text[];
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_events, 1), 0) LOOP
        results := results || {record}(p_events[i], p_sessions[i], p_actions[i], p_states[i],
                                       p_oks[i], p_ats[i], p_reasons[i]);
    END LOOP;
    RETURN results;
END
$$;
