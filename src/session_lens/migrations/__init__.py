"""Versioned, idempotent, transactional schema migrations and their runner.

Each `NNN_name.sql` file beside this module is one version. Its text is a
template of quoted identifiers (see `Tables.names`); a line `-- @backfill`
splits it where existing rows get their state, in batches, each with an audit
entry of trigger `migration`. One advisory lock keeps two runners apart; each
version commits whole or not at all.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import asyncpg

from ..schema import Tables

LOCK_KEY = 0x5E551_0E15  # "session lens": one advisory lock for every runner
BACKFILL_MARK = "-- @backfill"
BATCH_SIZE = 10_000


class MigrationError(Exception):
    """A migration could not be applied; nothing of it was kept."""

    def __init__(self, version: int, detail: str) -> None:
        super().__init__(f"migration {version:03d} failed: {detail}")
        self.version = version
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version."""

    version: int
    name: str
    template: str = field(repr=False)

    def render(self, tables: Tables) -> tuple[str, str]:
        """The SQL before and after the backfill, identifiers filled in."""
        sql = self.template.format(**tables.names)
        parts = re.split(f"^{re.escape(BACKFILL_MARK)}.*$", sql, maxsplit=1, flags=re.M)
        return parts[0], parts[1] if len(parts) > 1 else ""


def _load() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(__package__).iterdir():
        match = re.fullmatch(r"(\d{3})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


MIGRATIONS = _load()


def backfill_sql(tables: Tables, state_expression: str) -> tuple[str, str]:
    """The first and the following batch statements: state, timestamps, audit entries."""
    names = tables.names
    template = (
        "WITH batch AS ("
        " SELECT {id} AS sl_key FROM {table} WHERE ({needs}) {after}"
        " ORDER BY {id} LIMIT $1 FOR UPDATE"
        "), filled AS ("
        " UPDATE {table} AS t"
        " SET state = CASE WHEN t.state::text IN ({states}) THEN t.state ELSE ({expr}) END,"
        " created_at = coalesce(t.created_at, clock_timestamp()),"
        " updated_at = coalesce(t.updated_at, clock_timestamp()),"
        " deleted_at = CASE WHEN ({expr}) = 'DELETED'"
        "  THEN coalesce(t.deleted_at, clock_timestamp()) ELSE t.deleted_at END"
        " FROM batch WHERE t.{id} = batch.sl_key"
        " RETURNING t.{id} AS key, t.state AS state"
        "), audited AS ("
        " INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason)"
        " SELECT key::text, NULL, state, 'migration', session_user, 'backfill' FROM filled"
        ")"
        " SELECT count(*) AS rows, (array_agg(key ORDER BY key DESC))[1] AS last FROM filled"
    )
    first = template.format(after="", expr=state_expression, needs=_needs(tables), **names)
    rest = template.format(
        after=f"AND {names['id']} > $2", expr=state_expression, needs=_needs(tables), **names
    )
    return first, rest


def _needs(tables: Tables) -> str:
    """Rows the backfill must touch: no state of the model, or no timestamps."""
    names = tables.names
    return (
        f"state IS NULL OR state::text NOT IN ({names['states']})"
        " OR created_at IS NULL OR updated_at IS NULL"
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """What a migration run would do."""

    applied: tuple[int, ...]
    pending: tuple[Migration, ...]
    table_exists: bool
    rows: int
    rows_to_backfill: int


async def plan(conn: asyncpg.Connection, tables: Tables) -> Plan:
    """Look, change nothing: which versions are pending and how many rows they touch."""
    tables = await qualified(conn, tables)
    names = tables.names
    applied: tuple[int, ...] = ()
    if await conn.fetchval("SELECT to_regclass($1)", names["versions"]) is not None:
        rows = await conn.fetch(f"SELECT version FROM {names['versions']} ORDER BY version")
        applied = tuple(row["version"] for row in rows)
    pending = tuple(m for m in MIGRATIONS if m.version not in applied)
    exists = await conn.fetchval("SELECT to_regclass($1)", names["table"]) is not None
    total = to_fill = 0
    if exists:
        total = await conn.fetchval(f"SELECT count(*) FROM {names['table']}")
        has_all = await conn.fetchval(
            "SELECT count(*) = 3 FROM pg_attribute WHERE attrelid = to_regclass($1)"
            " AND attname IN ('state', 'created_at', 'updated_at') AND NOT attisdropped",
            names["table"],
        )
        to_fill = (
            await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE {_needs(tables)}")
            if has_all
            else total
        )
    return Plan(applied, pending, exists, total, to_fill)


Progress = Callable[[int], None]


async def qualified(conn: asyncpg.Connection, tables: Tables) -> Tables:
    """The tables with their schema named, so triggers never depend on a search_path."""
    if tables.schema is not None:
        return tables
    schema = await conn.fetchval("SELECT current_schema()")
    return Tables(f"{schema}.{tables.sessions}", tables.id_column)


async def migrate(
    conn: asyncpg.Connection,
    tables: Tables,
    state_expression: str = "'ACTIVE'",
    *,
    batch_size: int = BATCH_SIZE,
    on_backfill: Callable[[int], Progress] | None = None,
) -> list[int]:
    """Apply every pending version; returns those applied. Safe to run again, and at once."""
    applied = []
    tables = await qualified(conn, tables)
    # One lock for the whole run, so two runners cannot interleave versions.
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        for migration in MIGRATIONS:
            if await _apply(conn, tables, migration, state_expression, batch_size, on_backfill):
                applied.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return applied


async def _apply(
    conn: asyncpg.Connection,
    tables: Tables,
    migration: Migration,
    state_expression: str,
    batch_size: int,
    on_backfill: Callable[[int], Progress] | None,
) -> bool:
    names = tables.names
    async with conn.transaction():
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {names['versions']} ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await conn.fetchval(
            f"SELECT 1 FROM {names['versions']} WHERE version = $1", migration.version
        )
        if done:
            return False
        before, after = migration.render(tables)
        try:
            await conn.execute(before)
            if after:
                await _backfill(conn, tables, state_expression, batch_size, on_backfill)
                await conn.execute(after)
        except (asyncpg.PostgresError, _BackfillIncomplete) as exc:
            raise MigrationError(migration.version, str(exc)) from exc
        await conn.execute(
            f"INSERT INTO {names['versions']} (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )
    return True


async def _backfill(
    conn: asyncpg.Connection,
    tables: Tables,
    state_expression: str,
    batch_size: int,
    on_backfill: Callable[[int], Progress] | None,
) -> None:
    names = tables.names
    total = await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE {_needs(tables)}")
    if not total:
        return
    advance = on_backfill(total) if on_backfill else None
    first, rest = backfill_sql(tables, state_expression)
    row = await conn.fetchrow(first, batch_size)
    while row["rows"]:
        if advance:
            advance(row["rows"])
        row = await conn.fetchrow(rest, batch_size, row["last"])
    left = await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE {_needs(tables)}")
    if left:
        raise _BackfillIncomplete(f"backfill_state gave no state of the model for {left} rows")


class _BackfillIncomplete(Exception):
    pass
