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
