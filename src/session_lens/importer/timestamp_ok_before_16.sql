-- session-lens import: whether a source's text is a time: ISO 8601 (as a file writes
-- it, or as PostgreSQL prints its timestamp types), never a special word such as
-- `now`, `epoch` or `infinity` (before PostgreSQL 16, which has no pg_input_is_valid).

CREATE OR REPLACE FUNCTION pg_temp.session_lens_timestamp_ok(value text)
RETURNS boolean LANGUAGE plpgsql STABLE AS $sl$ BEGIN
    IF value !~ '^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$' THEN
        RETURN false;
    END IF;
    PERFORM value::timestamptz; RETURN true;
EXCEPTION WHEN others THEN RETURN false; END $sl$;
