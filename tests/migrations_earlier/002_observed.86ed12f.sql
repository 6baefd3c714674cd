-- session-lens 002: lifecycle recorded from observed traffic.
-- Events are written exactly once (their IDs are kept), and a recorder that
-- writes late (after an outage) stamps the audit trail with when the event
-- happened: SET LOCAL session_lens.occurred_at.

CREATE TABLE IF NOT EXISTS {events} (
    event_id uuid PRIMARY KEY,
    session_id text NOT NULL,
    action text NOT NULL,
    occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := coalesce(
        nullif(current_setting('session_lens.occurred_at', true), '')::timestamptz,
        clock_timestamp());
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF (OLD.state || '>' || NEW.state) NOT IN ({transitions})
           AND coalesce(current_setting('session_lens.any_transition', true), '') <> 'on' THEN
            RAISE EXCEPTION 'illegal transition % -> %', OLD.state, NEW.state
                USING ERRCODE = 'check_violation',
                      DETAIL = OLD.state || '>' || NEW.state;
        END IF;
        NEW.updated_at := at;
        IF NEW.state = 'DELETED' THEN
            NEW.deleted_at := coalesce(NEW.deleted_at, at);
        ELSIF OLD.state = 'DELETED' AND NEW.state <> 'ARCHIVED' THEN
            NEW.deleted_at := NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    how text := coalesce(nullif(current_setting('session_lens.trigger', true), ''), 'sql');
    who text := coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user);
    why text := nullif(current_setting('session_lens.reason', true), '');
    at timestamptz := coalesce(
        nullif(current_setting('session_lens.occurred_at', true), '')::timestamptz,
        clock_timestamp());
BEGIN
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

-- One call records one observed event: exactly once, in the model or not
-- (the upstream is the truth). Returns the state before, 'none', or 'duplicate'.
CREATE OR REPLACE FUNCTION {record}(
    p_event uuid, p_session text, p_action text, p_state text, p_ok boolean,
    p_at timestamptz, p_reason text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    before text;
BEGIN
    INSERT INTO {events} (event_id, session_id, action, occurred_at)
    VALUES (p_event, p_session, p_action, p_at)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'duplicate';
    END IF;
    PERFORM set_config('session_lens.occurred_at', p_at::text, true),
            set_config('session_lens.reason', coalesce(p_reason, ''), true),
            set_config('session_lens.trigger', 'observed', true),
            set_config('session_lens.any_transition', 'on', true);
    SELECT state INTO before FROM {table} WHERE {id} = p_session FOR UPDATE;
    IF NOT p_ok THEN  -- a creation that did not complete
        INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor, reason)
        VALUES (p_session, p_at, 'CREATING', NULL, 'observed',
                coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user),
                p_reason);
    ELSIF p_state IS NULL THEN
        DELETE FROM {table} WHERE {id} = p_session;
    ELSIF before IS NULL THEN
        INSERT INTO {table} ({id}, state, created_at, updated_at)
        VALUES (p_session, p_state, p_at, p_at);
    ELSE
        UPDATE {table} SET state = p_state WHERE {id} = p_session;
    END IF;
    RETURN coalesce(before, 'none');
END
$$;
