-- session-lens import: whether a source's text is a time: ISO 8601 (as a file writes
-- it, or as PostgreSQL prints its timestamp types), never a special word such as
-- `now`, `epoch` or `infinity` (PostgreSQL 16 and later).

CREATE OR REPLACE FUNCTION pg_temp.session_lens_timestamp_ok(value text)
RETURNS boolean LANGUAGE sql STABLE
AS $sl$ SELECT value IS NULL OR (
    value ~ '^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$'
    AND pg_input_is_valid(value, 'timestamptz')) $sl$;
