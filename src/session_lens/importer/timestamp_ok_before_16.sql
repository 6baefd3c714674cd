-- session-lens import: whether a source's text is a timestamp (before PostgreSQL 16,
-- which has no pg_input_is_valid).

CREATE OR REPLACE FUNCTION pg_temp.session_lens_timestamp_ok(value text)
RETURNS boolean LANGUAGE plpgsql STABLE AS $sl$ BEGIN
    PERFORM value::timestamptz; RETURN true;
EXCEPTION WHEN others THEN RETURN false; END $sl$;
