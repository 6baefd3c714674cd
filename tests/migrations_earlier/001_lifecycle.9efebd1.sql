-- session-lens 001: lifecycle states, soft delete, append-only audit trail.
-- Placeholders in braces are quoted identifiers filled in by the runner.

CREATE TABLE IF NOT EXISTS {table} ({id} text PRIMARY KEY);

ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS state text,
    ADD COLUMN IF NOT EXISTS created_at timestamptz,
    ADD COLUMN IF NOT EXISTS updated_at timestamptz,
    ADD COLUMN IF NOT EXISTS deleted_at timestamptz;

CREATE TABLE IF NOT EXISTS {audit} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id text NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    old_state text,
    new_state text,
    trigger text NOT NULL,
    actor text NOT NULL DEFAULT session_user,
    reason text,
    CHECK (old_state IS NOT NULL OR new_state IS NOT NULL)
);

CREATE INDEX IF NOT EXISTS session_audit_session_id_idx ON {audit} (session_id, id DESC);

-- @backfill: existing rows get their state here, in batches, each with an audit entry.

ALTER TABLE {table}
    ALTER COLUMN state SET DEFAULT 'ACTIVE',
    ALTER COLUMN state SET NOT NULL,
    ALTER COLUMN created_at SET DEFAULT clock_timestamp(),
    ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN updated_at SET DEFAULT clock_timestamp(),
    ALTER COLUMN updated_at SET NOT NULL,
    ADD CONSTRAINT session_lens_state_check CHECK (state IN ({states}));

CREATE INDEX IF NOT EXISTS session_lens_state_idx ON {table} (state);

-- The audit trail is append-only: the database refuses to change or remove it.
CREATE OR REPLACE FUNCTION {append_only}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'session_audit is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER session_audit_append_only
    BEFORE UPDATE OR DELETE ON {audit}
    FOR EACH ROW EXECUTE FUNCTION {append_only}();

CREATE TRIGGER session_audit_no_truncate
    BEFORE TRUNCATE ON {audit}
    FOR EACH STATEMENT EXECUTE FUNCTION {append_only}();

-- Every state change keeps the model: only the diagram's moves, timestamps kept.
-- `SET LOCAL session_lens.any_transition = 'on'` lets a recorder of observed
-- traffic write what the upstream did even when the model would not allow it.
CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF (OLD.state || '>' || NEW.state) NOT IN ({transitions})
           AND coalesce(current_setting('session_lens.any_transition', true), '') <> 'on' THEN
            RAISE EXCEPTION 'illegal transition % -> %', OLD.state, NEW.state
                USING ERRCODE = 'check_violation',
                      DETAIL = OLD.state || '>' || NEW.state;
        END IF;
        NEW.updated_at := clock_timestamp();
        IF NEW.state = 'DELETED' THEN
            NEW.deleted_at := coalesce(NEW.deleted_at, clock_timestamp());
        ELSIF OLD.state = 'DELETED' AND NEW.state <> 'ARCHIVED' THEN
            NEW.deleted_at := NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER session_lens_guard
    BEFORE UPDATE OF state ON {table}
    FOR EACH ROW EXECUTE FUNCTION {guard}();

-- Whoever writes (the app, an operator, a script), the audit trail hears of it.
-- The writer may name itself with SET LOCAL session_lens.trigger / .actor / .reason.
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    how text := coalesce(nullif(current_setting('session_lens.trigger', true), ''), 'sql');
    who text := coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user);
    why text := nullif(current_setting('session_lens.reason', true), '');
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason)
        VALUES (NEW.{id}::text, NULL, NEW.state, how, who, why);
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason)
            VALUES (NEW.{id}::text, OLD.state, NEW.state, how, who, why);
        END IF;
    ELSE
        INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason)
        VALUES (OLD.{id}::text, OLD.state, NULL, how, who, why);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER session_lens_audit
    AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {fn}();
