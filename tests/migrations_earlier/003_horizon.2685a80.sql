-- session-lens 003: the tracking horizon, and pruning of evidence older than it.
-- The horizon is the moment from which the lifecycle tables hold every change:
-- the migration in database mode, the first recording in observed mode, moved
-- forward by `session-lens prune`. An ID minted before it with no evidence
-- predates tracking; only one minted after it can have never existed.

CREATE TABLE IF NOT EXISTS {tracking} (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    migrated_at timestamptz NOT NULL,
    observing_since timestamptz,
    pruned_before timestamptz,
    horizon timestamptz NOT NULL
        GENERATED ALWAYS AS (greatest(migrated_at, observing_since, pruned_before)) STORED
);

-- An existing store: tracked since migration 001 (whose trigger sees every change
-- from then on), and in observed mode since the first event recorded.
INSERT INTO {tracking} (migrated_at, observing_since)
VALUES (
    coalesce((SELECT applied_at FROM {versions} WHERE version = 1), now()),
    (SELECT min(occurred_at) FROM {events})
)
ON CONFLICT DO NOTHING;

-- Deleting audit entries: only `session-lens prune` (which says so with
-- session_lens.pruning) and only entries older than the horizon it has moved.
-- UPDATE and TRUNCATE stay refused for everyone.
DROP TRIGGER IF EXISTS session_audit_append_only ON {audit};
CREATE TRIGGER session_audit_append_only
    BEFORE UPDATE ON {audit}
    FOR EACH ROW EXECUTE FUNCTION {append_only}();

CREATE OR REPLACE FUNCTION {delete_guard}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('session_lens.pruning', true), '') <> 'on' THEN
        RAISE EXCEPTION 'session_audit is append-only: DELETE refused'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'session-lens prune --older-than removes entries older than a cut-off';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION {prune_guard}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM gone
        WHERE occurred_at >= coalesce((SELECT pruned_before FROM {tracking}), '-infinity')
    ) THEN
        RAISE EXCEPTION 'session_audit is append-only: only entries older than the horizon may be pruned'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS session_audit_delete_guard ON {audit};
CREATE TRIGGER session_audit_delete_guard
    BEFORE DELETE ON {audit}
    FOR EACH STATEMENT EXECUTE FUNCTION {delete_guard}();

DROP TRIGGER IF EXISTS session_audit_prune_guard ON {audit};
CREATE TRIGGER session_audit_prune_guard
    AFTER DELETE ON {audit}
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION {prune_guard}();

-- Observed events older than the pruned history are not applied again: their
-- record of having been applied may be gone with it.
CREATE OR REPLACE FUNCTION {record}(
    p_event uuid, p_session text, p_action text, p_state text, p_ok boolean,
    p_at timestamptz, p_reason text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    before text;
BEGIN
    IF p_at < (SELECT pruned_before FROM {tracking}) THEN
        RETURN 'before_horizon';
    END IF;
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
