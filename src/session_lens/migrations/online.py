"""The steps that touch the service's live table, each short and bounded.

Version 001 is released as one text; on a live table the runner does not run it in
one transaction. Its statements are taken apart (`split_first`): those on our own
tables and functions run with the version, in one short transaction; those that
take the service's table for long are done here, the online way, once every version
is in (`finishing`), and each is found done or not from the catalog, so a run that
stopped anywhere is continued by the next:

    tracking     defaults and triggers, one short transaction; the horizon starts here
    backfill     state, timestamps and one audit entry per row, batch by batch,
                 each batch its own transaction
    constraints  CHECKs added NOT VALID, then VALIDATEd, then NOT NULL without a scan
    index        the state index CONCURRENTLY; an invalid one left over is rebuilt

Every transaction that takes a lock on the service's table does so under
`lock_timeout` and is tried again, with backoff, when the lock is not granted:
the service waits for us no longer than that.
"""

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import asyncpg

from ..schema import Tables

STATE_INDEX = "session_lens_state_idx"
STATE_CHECK = "session_lens_state_check"
TIMESTAMPS = ("created_at", "updated_at")
NOT_NULL = ("state", *TIMESTAMPS)
TRIGGERS = ("session_lens_guard", "session_lens_audit")
SHOWN_REFUSALS = 10
ISO_8601 = (
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?"
    r"(Z|[+-]\d{2}(:?\d{2})?)?$"
)
"""An ISO 8601 date or time as text; PostgreSQL's special words (`now`, `epoch`) are not."""
SESSION_ID = (
    r"^exec_[1-9]\d{3}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])_([01]\d|2[0-3])[0-5]\d[0-5]\d"
    r"_[a-f0-9]{8}$"
)
T = TypeVar("T")


def _quiet(line: str) -> None:
    pass


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Online:
    """How the steps on the service's table run."""

    lock_timeout: timedelta = timedelta(seconds=2)
    batch_pause: timedelta = timedelta(0)
    created_at: str | None = None
    """SQL over the row giving its creation time; None: the time its ID was minted."""
    updated_at: str | None = None
    """SQL over the row giving when it last changed; None: its creation time."""
    id_timezone: str = "UTC"
    give_up_after: timedelta = timedelta(minutes=10)
    """How long a step keeps asking for its lock before the run stops."""
    say: Callable[[str], None] = field(default=_quiet, compare=False)
    """One line for the person running it (a lock not granted, refused values)."""
    stopping: Callable[[], bool] = field(default=_never, compare=False)
    """Asked after each batch and step: True stops the run there."""


@dataclass(frozen=True, slots=True)
class Step:
    """One thing the run does to the service's table, and the lock it takes."""

    name: str
    lock: str
    """The strongest lock on the service's table, and for how long, for a person."""
    sql: tuple[str, ...]
    alone: bool = False
    """Runs outside a transaction (CONCURRENTLY), without lock_timeout: it blocks nobody."""


BACKFILL = Step("backfill", "ROW EXCLUSIVE; each batch's rows, for its transaction", ())


class MigrationStopped(Exception):
    """The run stopped where it was asked to; everything committed stays."""

    def __init__(self, done: str, rows: int, left: int) -> None:
        super().__init__(done, rows, left)
        self.done = done
        self.rows = rows
        self.left = left


class LockNotGranted(Exception):
    """A step could not have its lock for `give_up_after`."""

    def __init__(self, step: str, attempts: int, holders: str) -> None:
        super().__init__(step, attempts, holders)
        self.step = step
        self.attempts = attempts
        self.holders = holders

    def __str__(self) -> str:
        return (
            f"{self.step}: the lock was not granted in {self.attempts} attempts"
            f" ({self.holders}); end that transaction, or run again later"
        )


class BackfillRefused(Exception):
    """A row the backfill cannot give a state of the model; its batch was rolled back."""

    def __init__(self, key: str, state: str | None) -> None:
        super().__init__(key, state)
        self.key = key
        self.state = state

    def __str__(self) -> str:
        gave = "NULL" if self.state is None else repr(self.state)
        return f"backfill_state gave {gave} for row {self.key!r}, not a state of the model"


def statements(sql: str) -> list[str]:
    """The statements of a script, split at `;` outside dollar quotes; comments kept."""
    found: list[str] = []
    current = ""
    for n, part in enumerate(re.split(r"(\$\$)", sql)):
        if n % 4 in (1, 2, 3):  # a $$, a body, the closing $$
            current += part
            continue
        pieces = part.split(";")
        for piece in pieces[:-1]:
            found.append((current + piece).strip() + ";")
            current = ""
        current += pieces[-1]
    if current.strip():
        found.append(current.strip())
    return [s for s in found if _code(s)]


def _code(statement: str) -> str:
    """The statement without its leading comment lines."""
    lines = statement.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("--")):
        lines.pop(0)
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class First:
    """Version 001's after-backfill statements, taken apart for a live table."""

    now: tuple[str, ...]
    """On our own tables and functions: with the version."""
    tracking: tuple[str, ...]
    """The triggers on the service's table: the tracking step."""


def split_first(after: str, tables: Tables) -> First:
    """Which of 001's statements run with it and which wait for the tracking step.

    Its `ALTER TABLE` of the service's table (defaults, NOT NULL, the CHECK) and the
    state index are done by `finishing` instead, the online way.
    """
    table = tables.names["table"]
    now, tracking = [], []
    for statement in statements(after):
        code = _code(statement)
        if re.match(rf"ALTER TABLE {re.escape(table)}\s", code) or re.match(
            rf"CREATE INDEX .* ON {re.escape(table)}\s", code
        ):
            continue
        if re.match(rf"(DROP|CREATE) TRIGGER .*\bON {re.escape(table)}\s", code, re.S):
            tracking.append(statement)
        else:
            now.append(statement)
    return First(tuple(now), tuple(tracking))


async def locked(
    conn: asyncpg.Connection, step: str, sql: Sequence[str], table: str, online: Online
) -> None:
    """Run `sql` in one transaction under lock_timeout, again with backoff until granted."""
    await _retrying(conn, step, table, online, lambda: _transaction(conn, sql, online))


async def _transaction(conn: asyncpg.Connection, sql: Sequence[str], online: Online) -> None:
    async with conn.transaction():
        await _lock_timeout(conn, online)
        for statement in sql:
            await conn.execute(statement)


async def _lock_timeout(conn: asyncpg.Connection, online: Online) -> None:
    milliseconds = max(1, int(online.lock_timeout.total_seconds() * 1000))
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{milliseconds}ms")


async def _retrying(
    conn: asyncpg.Connection,
    step: str,
    table: str,
    online: Online,
    attempt: Callable[[], Awaitable[T]],
) -> T:
    started = time.monotonic()
    delay = 0.25
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except asyncpg.LockNotAvailableError:
            holders = await _holders(conn, table)
            if time.monotonic() - started > online.give_up_after.total_seconds():
                raise LockNotGranted(step, tries, holders) from None
            shown = table.replace('"', "")
            online.say(
                f"{step}: lock on {shown} not granted within"
                f" {_seconds(online.lock_timeout)} ({holders}); trying again in {delay:g}s"
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _holders(conn: asyncpg.Connection, table: str) -> str:
    """Who holds a lock on the table, for the line that says we wait."""
    rows = await conn.fetch(
        "SELECT a.pid, a.state, extract(epoch FROM clock_timestamp() - a.xact_start) AS age"
        " FROM pg_stat_activity AS a WHERE a.pid <> pg_backend_pid() AND a.pid IN"
        " (SELECT l.pid FROM pg_locks AS l WHERE l.relation = to_regclass($1) AND l.granted)"
        " ORDER BY a.xact_start LIMIT 3",
        table,
    )
    if not rows:
        return "held by a transaction since ended"
    return "held by " + ", ".join(
        f"pid {r['pid']} ({r['state']}"
        + (f", in a transaction for {float(r['age']):.0f}s" if r["age"] is not None else "")
        + ")"
        for r in rows
    )


def _seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g}s"


# The steps, found done or not from the catalog.


async def finishing(
    conn: asyncpg.Connection, tables: Tables, first_after: str | None, online: Online
) -> list[Step]:
    """The steps on the service's table still to do, in order; [] when none are."""
    names = tables.names
    table = names["table"]
    steps: list[Step] = []
    catalog = await conn.fetchrow(
        "SELECT"
        " (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1)"
        "   AND tgname = ANY($2::text[]) AND NOT tgisinternal) AS triggers,"
        " (SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass($1)"
        "   AND conname = $3) AS checked,"
        " (SELECT bool_and(attnotnull) FROM pg_attribute WHERE attrelid = to_regclass($1)"
        "   AND attname = ANY($4::text[]) AND NOT attisdropped) AS not_null,"
        " (SELECT i.indisvalid FROM pg_index AS i WHERE i.indrelid = to_regclass($1)"
        "   AND i.indexrelid = to_regclass($5)) AS index_valid",
        table,
        list(TRIGGERS),
        STATE_CHECK,
        list(NOT_NULL),
        _index_name(tables),
    )
    if catalog["triggers"] < len(TRIGGERS) and first_after is not None:
        horizon = await conn.fetchval("SELECT to_regclass($1)", names["tracking"]) is not None
        steps.append(_tracking(tables, first_after, horizon))
    if not (catalog["checked"] and catalog["not_null"]):
        steps.append(BACKFILL)
        steps.extend(_constraints(tables, catalog["checked"]))
    if not catalog["index_valid"]:
        rebuild = catalog["index_valid"] is False
        steps.append(_index(tables, rebuild))
    return steps


def _index_name(tables: Tables) -> str:
    schema = tables.schema
    return f'"{schema}".{STATE_INDEX}' if schema else STATE_INDEX


def online_steps(tables: Tables, first_after: str) -> list[Step]:
    """Every step on the service's table, as a run with 001 pending does them."""
    return [
        _tracking(tables, first_after, horizon=True),
        BACKFILL,
        *_constraints(tables, checked=False),
        _index(tables, rebuild=False),
    ]


def _tracking(tables: Tables, first_after: str, horizon: bool) -> Step:
    names = tables.names
    table = names["table"]
    sql = [
        f"ALTER TABLE {table} ALTER COLUMN state SET DEFAULT 'ACTIVE',"
        " ALTER COLUMN created_at SET DEFAULT clock_timestamp(),"
        " ALTER COLUMN updated_at SET DEFAULT clock_timestamp();",
        *split_first(first_after, tables).tracking,
    ]
    if horizon:
        # Tracking begins now: an ID minted before this has no evidence of what came before.
        sql.append(f"UPDATE {names['tracking']} SET migrated_at = clock_timestamp();")
    return Step(
        "tracking", "ACCESS EXCLUSIVE, milliseconds: defaults and triggers, no rewrite", tuple(sql)
    )


def _constraints(tables: Tables, checked: bool | None) -> list[Step]:
    names = tables.names
    table = names["table"]
    helpers = [(f"session_lens_{column}_not_null", column) for column in NOT_NULL]
    add = [
        f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name},"
        f" ADD CONSTRAINT {name} CHECK ({column} IS NOT NULL) NOT VALID;"
        for name, column in helpers
    ]
    if not checked:
        add.append(
            f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {STATE_CHECK},"
            f" ADD CONSTRAINT {STATE_CHECK} CHECK (state IN ({names['states']})) NOT VALID;"
        )
    validate = [
        f"ALTER TABLE {table} VALIDATE CONSTRAINT {name};"
        for name in [*(n for n, _ in helpers), STATE_CHECK]
    ]
    # Two statements: the CHECKs must still be there when SET NOT NULL looks for them.
    finish = [
        f"ALTER TABLE {table} "
        + ", ".join(f"ALTER COLUMN {column} SET NOT NULL" for column in NOT_NULL)
        + ";",
        f"ALTER TABLE {table} " + ", ".join(f"DROP CONSTRAINT {name}" for name, _ in helpers) + ";",
    ]
    return [
        Step("constraints added", "ACCESS EXCLUSIVE, milliseconds: NOT VALID, no scan", tuple(add)),
        *(
            Step(
                "constraint validated",
                "SHARE UPDATE EXCLUSIVE while it scans: reads and writes go on",
                (sql,),
            )
            for sql in validate
        ),
        Step(
            "NOT NULL",
            "ACCESS EXCLUSIVE, milliseconds: the validated CHECKs spare the scan",
            tuple(finish),
        ),
    ]


def _index(tables: Tables, rebuild: bool) -> Step:
    table = tables.names["table"]
    index = _index_name(tables)
    sql = [f"DROP INDEX CONCURRENTLY IF EXISTS {index};"] if rebuild else []
    sql.append(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {STATE_INDEX} ON {table} (state);")
    what = "index rebuilt (an interrupted build left it invalid)" if rebuild else "index"
    return Step(
        what, "SHARE UPDATE EXCLUSIVE while it builds: reads and writes go on", tuple(sql), True
    )


async def run_step(conn: asyncpg.Connection, tables: Tables, step: Step, online: Online) -> None:
    """One step other than the backfill."""
    table = tables.names["table"]
    if not step.alone:
        await locked(conn, step.name, step.sql, table, online)
        return
    for statement in step.sql:
        await conn.execute(statement)


# The backfill.


def needs(tables: Tables, row: str = "") -> str:
    """Rows the backfill must touch: no state of the model, or no timestamps."""
    names = tables.names
    return (
        f"{row}state IS NULL OR {row}state::text NOT IN ({names['states']})"
        f" OR {row}created_at IS NULL OR {row}updated_at IS NULL"
    )


def minted(key: str, zone: str = "$2::text") -> str:
    """SQL: the time the ID `key` was minted, read in `zone`; NULL for another ID.

    Never an error, whatever the key: a backfill batch must not fail on a row.
    """
    day = f"(to_date(substr({key}, 6, 6) || '01', 'YYYYMMDD') + (substr({key}, 12, 2)::int - 1))"
    at = (
        f"({day}::timestamp + make_interval(hours => substr({key}, 15, 2)::int,"
        f" mins => substr({key}, 17, 2)::int, secs => substr({key}, 19, 2)::int))"
    )
    return (
        f"CASE WHEN {key} ~ '{SESSION_ID}' AND to_char({day}, 'DD') = substr({key}, 12, 2)"
        f" THEN {at} AT TIME ZONE {zone} END"
    )


async def as_time(conn: asyncpg.Connection, tables: Tables, expression: str, setting: str) -> str:
    """SQL turning the expression's value into a timestamptz; NULL where it is not one.

    The database's timestamp types are taken as they are (without a zone: UTC); text
    only as ISO 8601, never PostgreSQL's special words. Raises ValueError for another type.
    """
    table = tables.names["table"]
    try:
        statement = await conn.prepare(f"SELECT ({expression}) FROM {table} AS t")
    except asyncpg.PostgresError as exc:
        raise ValueError(f"{setting} {expression!r}: {exc}") from exc
    kind = statement.get_attributes()[0].type.name
    value = f"({expression})"
    if kind == "timestamptz":
        return value
    if kind == "timestamp":
        return f"({value} AT TIME ZONE 'UTC')"
    if kind == "date":
        return f"({value}::timestamp AT TIME ZONE 'UTC')"
    if kind in ("text", "varchar", "bpchar", "unknown"):
        text = f"{value}::text"
        valid = (
            f" AND pg_input_is_valid({text}, 'timestamptz')"
            if conn.get_server_version() >= (16, 0)
            else ""
        )
        return f"(CASE WHEN {text} ~ '{ISO_8601}'{valid} THEN {text}::timestamptz END)"
    raise ValueError(
        f"{setting} {expression!r} gives {kind}, not a time"
        " (timestamptz, timestamp, date or ISO 8601 text)"
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """The first and the following batch statements."""

    first: str
    rest: str


async def backfill_sql(
    conn: asyncpg.Connection, tables: Tables, state: str, online: Online
) -> Batch:
    """The batch statements: state, timestamps and one audit entry per row.

    $1 the batch size, $2 the IDs' zone, $3 the last key done (the following batches).
    A creation time that is not a time, or lies more than a day off the ID's minted
    time, is refused: the row gets its minted time, and the batch counts it.
    """
    names = tables.names
    key = f"t.{names['id']}::text"
    mint = "t.sl_minted"
    given = (
        await as_time(conn, tables, online.created_at, "backfill_created_at")
        if online.created_at is not None
        else None
    )
    if given is None:
        created = mint
        refused_created = "false"
    else:
        ok = (
            f"({given} IS NOT NULL AND isfinite({given}) AND ({mint} IS NULL OR"
            f" {given} BETWEEN {mint} - interval '1 day' AND {mint} + interval '1 day'))"
        )
        created = f"CASE WHEN {ok} THEN {given} ELSE {mint} END"
        refused_created = f"(({online.created_at}) IS NOT NULL AND NOT {ok})"
    # When nothing names a time (an ID of another shape, no value): the migration's.
    created = f"coalesce(t.created_at, {created}, clock_timestamp())"
    later = (
        await as_time(conn, tables, online.updated_at, "backfill_updated_at")
        if online.updated_at is not None
        else None
    )
    if later is None:
        updated = "b.sl_created"
        refused_updated = "false"
    else:
        ok = f"({later} IS NOT NULL AND isfinite({later}) AND {later} >= b.sl_created)"
        updated = f"CASE WHEN {ok} THEN {later} ELSE b.sl_created END"
        refused_updated = f"(({online.updated_at}) IS NOT NULL AND NOT {ok})"
    new_state = f"CASE WHEN t.state::text IN ({names['states']}) THEN t.state ELSE ({state}) END"
    template = (
        "WITH batch AS ("
        " SELECT t.{id} AS sl_key, {created} AS sl_created, {refused_created} AS sl_refused"
        " FROM (SELECT t.*, {minted} AS sl_minted FROM {table} AS t"
        "  WHERE ({needs}) {after} ORDER BY t.{id} LIMIT $1 FOR UPDATE) AS t"
        "), filled AS ("
        " UPDATE {table} AS t"
        " SET state = {new_state},"
        "  created_at = b.sl_created,"
        "  updated_at = coalesce(t.updated_at, {updated}),"
        "  deleted_at = CASE WHEN ({new_state}) = 'DELETED'"
        "   THEN coalesce(t.deleted_at, t.updated_at, {updated}) ELSE t.deleted_at END"
        " FROM batch AS b WHERE t.{id} = b.sl_key"
        " RETURNING t.{id} AS key, t.state AS state, t.updated_at AS at,"
        "  t.state::text IN ({states}) AS ok, b.sl_refused OR {refused_updated} AS refused"
        "), audited AS ("
        " INSERT INTO {audit} (session_id, occurred_at, old_state, new_state, trigger, actor,"
        "  reason)"
        " SELECT f.key::text, f.at, NULL, f.state, 'migration', session_user, 'backfill'"
        " FROM filled AS f WHERE f.ok"
        "  AND NOT EXISTS (SELECT 1 FROM {audit} AS a WHERE a.session_id = f.key::text)"
        ")"
        " SELECT count(*) AS rows, (array_agg(key ORDER BY key DESC))[1] AS last,"
        "  (array_agg(key::text) FILTER (WHERE NOT ok))[1] AS bad_key,"
        "  (array_agg(state::text) FILTER (WHERE NOT ok))[1] AS bad_state,"
        "  count(*) FILTER (WHERE NOT ok) AS bad,"
        "  (array_agg(key::text ORDER BY key) FILTER (WHERE refused))[1:{shown}] AS refused,"
        "  count(*) FILTER (WHERE refused) AS refused_count"
        " FROM filled"
    )
    values = {
        **names,
        "minted": minted(key),
        "needs": needs(tables, "t."),
        "created": created,
        "refused_created": refused_created,
        "updated": updated,
        "refused_updated": refused_updated,
        "new_state": new_state,
        "shown": SHOWN_REFUSALS,
    }
    # The expressions are the operator's SQL: kept out of str.format's way.
    first = _fill(template, after="", **values)
    rest = _fill(template, after=f"AND t.{names['id']} > $3", **values)
    return Batch(first, rest)


def _fill(template: str, **values: object) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m[1]]), template)


@dataclass
class Backfilled:
    """What the backfill did, kept as it goes."""

    rows: int = 0
    batches: int = 0
    refused: int = 0
    examples: list[str] = field(default_factory=list)


async def backfill(
    conn: asyncpg.Connection,
    tables: Tables,
    state: str,
    online: Online,
    batch_size: int,
    on_backfill: "Callable[[int], Callable[[int], object]] | None",
) -> Backfilled:
    """Every row given its state, timestamps and audit entry, one transaction per batch."""
    names = tables.names
    table = names["table"]
    total = await conn.fetchval(f"SELECT count(*) FROM {table} AS t WHERE {needs(tables)}")
    done = Backfilled()
    if not total:
        return done
    batch = await backfill_sql(conn, tables, state, online)
    advance = on_backfill(total) if on_backfill else None
    last: object = None
    pause = online.batch_pause.total_seconds()
    while True:
        if online.stopping():
            raise MigrationStopped("backfill", done.rows, total - done.rows)

        async def one(after: object = last) -> asyncpg.Record:
            async with conn.transaction():
                await _lock_timeout(conn, online)
                # The batch's rows by their key, never a scan of the whole table per batch.
                await conn.execute(
                    "SELECT set_config('TimeZone', 'UTC', true),"
                    " set_config('session_lens.audited', 'on', true),"
                    " set_config('enable_hashjoin', 'off', true),"
                    " set_config('enable_mergejoin', 'off', true)"
                )
                if after is None:
                    row = await conn.fetchrow(batch.first, batch_size, online.id_timezone)
                else:
                    row = await conn.fetchrow(batch.rest, batch_size, online.id_timezone, after)
                if row["bad"]:
                    raise BackfillRefused(row["bad_key"], row["bad_state"])
                return row

        row = await _retrying(conn, "backfill batch", table, online, one)
        if not row["rows"]:
            return done
        last = row["last"]
        done.rows += row["rows"]
        done.batches += 1
        if row["refused_count"]:
            done.refused += row["refused_count"]
            room = SHOWN_REFUSALS - len(done.examples)
            done.examples.extend((row["refused"] or [])[:room])
        if advance:
            advance(row["rows"])
        if pause:
            await asyncio.sleep(pause)
