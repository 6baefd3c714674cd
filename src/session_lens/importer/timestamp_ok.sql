-- session-lens import: whether a source's text is a timestamp (PostgreSQL 16 and later).

CREATE OR REPLACE FUNCTION pg_temp.session_lens_timestamp_ok(value text)
RETURNS boolean LANGUAGE sql STABLE
AS $sl$ SELECT value IS NULL OR pg_input_is_valid(value, 'timestamptz') $sl$;
