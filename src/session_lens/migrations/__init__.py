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
        " SELECT {id} AS sl_key FROM {table} WHERE state IS NULL {after}"
        " ORDER BY {id} LIMIT $1 FOR UPDATE"
        "), filled AS ("
        " UPDATE {table} AS t SET state = ({expr}),"
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
        " SELECT count(*) AS rows, max(key) AS last FROM filled"
    )
    first = template.format(after="", expr=state_expression, **names)
    rest = template.format(after=f"AND {names['id']} > $2", expr=state_expression, **names)
    return first, rest


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
        has_state = await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass($1)"
            " AND attname = 'state' AND NOT attisdropped",
            names["table"],
        )
        to_fill = (
            await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE state IS NULL")
            if has_state
            else total
        )
    return Plan(applied, pending, exists, total, to_fill)


Progress = Callable[[int], None]


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
    total = await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE state IS NULL")
    if not total:
        return
    advance = on_backfill(total) if on_backfill else None
    first, rest = backfill_sql(tables, state_expression)
    row = await conn.fetchrow(first, batch_size)
    while row["rows"]:
        if advance:
            advance(row["rows"])
        row = await conn.fetchrow(rest, batch_size, row["last"])
    left = await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE state IS NULL")
    if left:
        raise _BackfillIncomplete(f"backfill_state gave no state for {left} rows")


class _BackfillIncomplete(Exception):
    pass
