-- session-lens 004: event time decides, not arrival.
-- Several recorders (replicas, workers, a spool replayed after an outage) may
-- deliver one session's observed events in any order. Each session ends in the
-- state its latest event (by occurred_at, then event_id) gives; an event older
-- than the latest already applied joins the audit trail in its place in time and
-- leaves the state alone. PostgreSQL is the only coordinator: a transaction-scoped
-- advisory lock per session serialises its events, whoever records them.

-- Whether the event completed (a creation answered 5xx did not); NULL in events
-- recorded before this version, which all completed.
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS ok boolean;

CREATE INDEX IF NOT EXISTS session_lens_events_session_idx
    ON {events} (session_id, occurred_at DESC, event_id DESC);

-- The audit trail in time order: the evidence reads a session's latest entry by
-- when it happened, which a late event need not be.
CREATE INDEX IF NOT EXISTS session_audit_session_time_idx
    ON {audit} (session_id, occurred_at DESC, id DESC);
DROP INDEX IF EXISTS {audit_session_idx};

-- An observed purge of a session never seen alive is still evidence it existed.
ALTER TABLE {audit} DROP CONSTRAINT IF EXISTS session_audit_check;

-- The trigger stays quiet when the writer audits the change itself.
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    how text := coalesce(nullif(current_setting('session_lens.trigger', true), ''), 'sql');
    who text := coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user);
    why text := nullif(current_setting('session_lens.reason', true), '');
    at timestamptz := coalesce(
        nullif(current_setting('session_lens.occurred_at', true), '')::timestamptz,
        clock_timestamp());
BEGIN
    IF coalesce(current_setting('session_lens.audited', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor, reason)
        VALUES (NEW.{id}::text, at, NULL, NEW.state, how, who, why);
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor, reason)
            VALUES (NEW.{id}::text, at, OLD.state, NEW.state, how, who, why);
        END IF;
    ELSE
        INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor, reason)
        VALUES (OLD.{id}::text, at, OLD.state, NULL, how, who, why);
    END IF;
    RETURN NULL;
END
$$;

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
