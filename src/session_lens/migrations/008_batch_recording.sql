-- session-lens 008: a batch of observed events recorded as a set.
-- {record_batch} calls {record} once an event: about ten statements each. Most
-- events of a batch are the only one of their session in it; {record_events}
-- records those with a handful of statements for the whole batch, and calls
-- {record} in order for the events of a session that has several. What each
-- event leaves (its events row, the sessions row, its audit entry, the result)
-- is what {record} would leave.

-- The audit trigger reads its settings only when it acts: a writer that audits
-- itself (`session_lens.audited`) costs it one setting read a row. The guard takes
-- the time the writer set (`updated_at`), row by row, under `session_lens.row_times`:
-- 009 defines it so.
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    how text;
    who text;
    why text;
    at timestamptz;
BEGIN
    IF coalesce(current_setting('session_lens.audited', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    how := coalesce(nullif(current_setting('session_lens.trigger', true), ''), 'sql');
    who := coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user);
    why := nullif(current_setting('session_lens.reason', true), '');
    at := coalesce(
        nullif(current_setting('session_lens.occurred_at', true), '')::timestamptz,
        clock_timestamp());
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

-- A batch, in order; returns what {record} returns for each event. Event IDs come
-- as text and times as microseconds since the epoch: cheaper to send than uuid and
-- timestamptz arrays.
CREATE OR REPLACE FUNCTION {record_events}(
    p_events text[], p_sessions text[], p_actions text[], p_states text[], p_oks boolean[],
    p_ats bigint[], p_reasons text[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_events, 1), 0);
    results text[] := array_fill(NULL::text, ARRAY[n]);
    horizon timestamptz := (SELECT pruned_before FROM {tracking});
    ahead timestamptz := clock_timestamp() + coalesce(
        nullif(current_setting('session_lens.max_ahead', true), '')::interval,
        interval '5 minutes');
    who text := coalesce(nullif(current_setting('session_lens.actor', true), ''), session_user);
    one record;
BEGIN
    IF n = 0 THEN
        RETURN results;
    END IF;
    -- Every session of the batch locked first, in one order for every recorder (the
    -- bytes' order, as a recorder sorts its batch): {record} takes these locks again.
    PERFORM pg_advisory_xact_lock(1397051211, hashtext(x.s))
       FROM (SELECT DISTINCT u.s COLLATE "C" AS s FROM unnest(p_sessions) AS u(s) ORDER BY 1) AS x;
    -- Their rows too, before the statement below takes its snapshot: what it reads
    -- of them is what it changes.
    PERFORM 1 FROM {table} WHERE {id} = ANY(p_sessions) ORDER BY {id} FOR UPDATE;
    PERFORM set_config('session_lens.audited', 'on', true),
            set_config('session_lens.any_transition', 'on', true),
            set_config('session_lens.row_times', 'on', true);
    WITH batch AS (
        SELECT u.i, u.e::uuid AS e, u.s, u.a, CASE WHEN u.ok THEN u.st END AS target, u.ok,
               timestamptz 'epoch' + u.at * interval '1 microsecond' AS at, u.why, count(*) OVER (PARTITION BY u.s) AS of_session
          FROM unnest(p_events, p_sessions, p_actions, p_states, p_oks, p_ats, p_reasons)
               WITH ORDINALITY AS u(e, s, a, st, ok, at, why, i)
    ), alone AS (  -- the only event of its session here, inside the horizon, not ahead
        SELECT * FROM batch
         WHERE of_session = 1 AND at >= coalesce(horizon, '-infinity') AND at <= ahead
    ), added AS (
        INSERT INTO {events} (event_id, session_id, action, occurred_at, ok)
        SELECT e, s, a, at, ok FROM alone
        ON CONFLICT DO NOTHING
    ), seen AS (  -- each event new to the store, with what the store held before it
        SELECT b.*, r.state AS before, r.updated_at AS before_at,
               NOT EXISTS (SELECT 1 FROM {events} AS x
                            WHERE x.session_id = b.s AND (x.occurred_at, x.event_id) > (b.at, b.e))
                   AND (r.updated_at IS NULL OR b.at >= r.updated_at) AS newest,
               (SELECT CASE WHEN coalesce(x.ok, true) THEN
                           CASE x.action WHEN 'create' THEN 'ACTIVE' WHEN 'pause' THEN 'PAUSED'
                                WHEN 'resume' THEN 'ACTIVE' WHEN 'stop' THEN 'STOPPED'
                                WHEN 'delete' THEN 'DELETED' WHEN 'restore' THEN 'STOPPED'
                                WHEN 'archive' THEN 'ARCHIVED' END
                       END
                  FROM {events} AS x
                 WHERE x.session_id = b.s AND (x.occurred_at, x.event_id) < (b.at, b.e)
                 ORDER BY x.occurred_at DESC, x.event_id DESC
                 LIMIT 1) AS earlier
          FROM alone AS b
          LEFT JOIN {table} AS r ON r.{id} = b.s
         -- What this statement adds is not in its snapshot: an event found is one
         -- recorded before (its session's lock keeps other recorders out meanwhile).
         WHERE NOT EXISTS (SELECT 1 FROM {events} AS x WHERE x.event_id = b.e)
    ), judged AS (
        SELECT seen.*,
               CASE WHEN newest AND before IS NOT NULL THEN before ELSE earlier END AS prior
          FROM seen
    ), purged AS (
        DELETE FROM {table} AS t USING judged AS j
         WHERE t.{id} = j.s AND j.newest AND j.ok AND j.target IS NULL
    ), made AS (
        INSERT INTO {table} ({id}, state, created_at, updated_at, deleted_at)
        SELECT s, target, at, at, CASE WHEN target = 'DELETED' THEN at END
          FROM judged
         WHERE newest AND ok AND target IS NOT NULL AND before IS NULL
    ), moved AS (  -- the guard stamps a changed state with updated_at, as set here
        UPDATE {table} AS t
           SET state = j.target,
               updated_at = CASE WHEN t.state IS DISTINCT FROM j.target THEN j.at
                                 ELSE t.updated_at END
          FROM judged AS j
         WHERE t.{id} = j.s AND j.newest AND j.ok AND j.target IS NOT NULL
           AND j.before IS NOT NULL
    ), dated AS (
        UPDATE {table} AS t SET created_at = j.at
          FROM judged AS j
         WHERE t.{id} = j.s AND NOT j.newest AND j.a = 'create' AND j.ok
           AND t.created_at > j.at
    ), audited AS (
        INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor, reason)
        SELECT s, at, CASE WHEN ok THEN prior ELSE 'CREATING' END, target, 'observed', who, why
          FROM judged
         ORDER BY i
    )
    SELECT array_agg(b.i ORDER BY b.i) AS at_,
           array_agg(CASE
                WHEN b.at < coalesce(horizon, '-infinity') THEN 'before_horizon'
                WHEN b.at > ahead THEN 'future'
                WHEN j.i IS NULL THEN 'duplicate'
                WHEN j.newest THEN coalesce(j.prior, 'none')
                ELSE 'late:' || coalesce(j.prior, 'none')
           END ORDER BY b.i) AS said
      INTO one
      FROM batch AS b
      LEFT JOIN judged AS j ON j.i = b.i
     WHERE b.of_session = 1;
    PERFORM set_config('session_lens.row_times', '', true),
            set_config('session_lens.audited', '', true);
    FOR k IN 1 .. coalesce(array_length(one.at_, 1), 0) LOOP
        results[one.at_[k]] := one.said[k];
    END LOOP;
    -- A session with several events here: one at a time, in order.
    FOR k IN 1 .. n LOOP
        IF results[k] IS NULL THEN
            results[k] := {record}(p_events[k]::uuid, p_sessions[k], p_actions[k], p_states[k],
                                   p_oks[k], timestamptz 'epoch' + p_ats[k] * interval '1 microsecond', p_reasons[k]);
        END IF;
    END LOOP;
    RETURN results;
END
$$;
