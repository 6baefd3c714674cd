-- session-lens 009: a live table is brought into the model while its service writes.
-- The triggers are in place before the backfill has reached every row: a row without
-- a state of the model yet (one the backfill has not come to: no state, or one of the
-- service's own) takes its first state with the timestamps its writer gives, so that
-- the backfill dates it by its own age, not by the migration's clock. Under
-- `session_lens.row_times` (a batch recorded as a set, 008) a changed state takes the
-- time its writer set, row by row. Everything else is as 002 defined it.

CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz;
BEGIN
    IF OLD.state IS NULL OR OLD.state::text NOT IN ({states}) THEN
        RETURN NEW;
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF (OLD.state || '>' || NEW.state) NOT IN ({transitions})
           AND coalesce(current_setting('session_lens.any_transition', true), '') <> 'on' THEN
            RAISE EXCEPTION 'illegal transition % -> %', OLD.state, NEW.state
                USING ERRCODE = 'check_violation',
                      DETAIL = OLD.state || '>' || NEW.state;
        END IF;
        IF coalesce(current_setting('session_lens.row_times', true), '') = 'on' THEN
            at := NEW.updated_at;
        ELSE
            at := coalesce(
                nullif(current_setting('session_lens.occurred_at', true), '')::timestamptz,
                clock_timestamp());
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
