-- session-lens import: the staged page into the lifecycle store, one audit entry per
-- new session. What can be done for the whole page is (the state, which timestamps
-- parse, which sessions are known); then one INSERT per row, so that each session's
-- audit entry is stamped with the time of its state in the source (the trigger reads
-- `session_lens.occurred_at`), not with the import's. `careful`: the state expression
-- row by row, a row it fails on refused.
--
-- A template that writer.py fills in: identifiers quoted, the state expression as
-- given, each timestamp column of the source as text (NULL when it has none), and
-- {minted}: the time the row's ID was minted, read in the zone `zone`.
-- Timestamps are ISO 8601 or the database's own types, and a creation time more than
-- a day off the ID's minted time is refused; without one, the ID's minted time it is.

CREATE OR REPLACE FUNCTION pg_temp.session_lens_import_page(careful boolean, zone text)
RETURNS TABLE (o_row bigint, o_outcome text, o_detail text)
LANGUAGE plpgsql AS $sl$
#variable_conflict use_column
DECLARE
    r record;
    v_state text;
BEGIN
    FOR r IN
        SELECT p.*,
               CASE WHEN p.sl_bad IS NULL
                    THEN coalesce(p.created_at::timestamptz, p.sl_minted,
                                  p.updated_at::timestamptz, now())
               END AS sl_created,
               CASE WHEN p.sl_bad IS NULL
                    THEN coalesce(p.updated_at::timestamptz, p.created_at::timestamptz,
                                  p.sl_minted, now())
               END AS sl_updated
        FROM (
            SELECT q.*,
                   CASE WHEN NOT pg_temp.session_lens_timestamp_ok(q.created_at) THEN 'created_at'
                        WHEN NOT pg_temp.session_lens_timestamp_ok(q.updated_at) THEN 'updated_at'
                        WHEN NOT pg_temp.session_lens_timestamp_ok(q.deleted_at) THEN 'deleted_at'
                   END AS sl_bad,
                   EXISTS (SELECT 1 FROM {audit} AS a WHERE a.session_id = q.sl_id)
                       AS sl_known,
                   {minted} AS sl_minted
            FROM (
                SELECT s.{row} AS sl_n, s.{source_id}::text AS sl_id,
                       CASE WHEN careful THEN NULL ELSE ({expression})::text END AS sl_state,
                       {created_at} AS created_at, {updated_at} AS updated_at,
                       {deleted_at} AS deleted_at
                FROM pg_temp.{stage} AS s
            ) AS q
        ) AS p
        ORDER BY p.sl_n
    LOOP
        v_state := r.sl_state;
        IF careful THEN
            BEGIN
                SELECT ({expression})::text INTO v_state
                FROM pg_temp.{stage} AS s WHERE s.{row} = r.sl_n;
            EXCEPTION WHEN others THEN
                o_row := r.sl_n; o_outcome := 'refused';
                o_detail := 'the state expression failed: ' || SQLERRM; RETURN NEXT; CONTINUE;
            END;
        END IF;
        IF v_state IS NULL OR v_state NOT IN ({states}) THEN
            o_row := r.sl_n; o_outcome := 'refused';
            o_detail := CASE WHEN v_state IS NULL THEN 'the state expression gave NULL'
                        ELSE format('state %L is not one of {state_names}', v_state)
                        END;
            RETURN NEXT; CONTINUE;
        END IF;
        IF r.sl_bad IS NOT NULL THEN
            o_row := r.sl_n; o_outcome := 'refused';
            o_detail := format('%s %L is not a timestamp (ISO 8601)', r.sl_bad, CASE r.sl_bad
                WHEN 'created_at' THEN r.created_at WHEN 'updated_at' THEN r.updated_at
                ELSE r.deleted_at END);
            RETURN NEXT; CONTINUE;
        END IF;
        IF r.created_at IS NOT NULL AND r.sl_minted IS NOT NULL
           AND abs(extract(epoch FROM r.created_at::timestamptz - r.sl_minted)) > 86400 THEN
            o_row := r.sl_n; o_outcome := 'refused';
            o_detail := format('created_at %L is more than a day off the time the ID was'
                               ' minted (%s)', r.created_at,
                               to_char(r.sl_minted AT TIME ZONE zone, 'YYYY-MM-DD HH24:MI:SS'));
            RETURN NEXT; CONTINUE;
        END IF;
        IF r.sl_known THEN
            o_row := r.sl_n; o_outcome := 'known'; o_detail := NULL; RETURN NEXT; CONTINUE;
        END IF;
        PERFORM set_config('session_lens.occurred_at', r.sl_updated::text, true);
        INSERT INTO {table} ({id}, state, created_at, updated_at, deleted_at)
        VALUES (r.sl_id, v_state, r.sl_created, r.sl_updated,
                CASE WHEN v_state = 'DELETED'
                     THEN coalesce(r.deleted_at::timestamptz, r.sl_updated)
                     WHEN v_state = 'ARCHIVED' THEN r.deleted_at::timestamptz END)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            o_row := r.sl_n; o_outcome := 'known'; o_detail := NULL; RETURN NEXT;
        END IF;
    END LOOP;
END
$sl$;
