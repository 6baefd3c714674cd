"""Versioned, idempotent, transactional schema migrations and their runner.

Each `NNN_name.sql` file beside this module is one version. Its text is a
template of quoted identifiers (see `Tables.names`). One advisory lock keeps two
runners apart; each version commits whole or not at all, in one short transaction
under `lock_timeout`. The version whose text has a line `-- @backfill` (001) is
the one that takes the service's live table: what of it would hold that table for
long (its triggers, defaults, the backfill, NOT NULL, the CHECK, the state index)
is done by `online.py` instead, the online way, once every version is in.

A released version's text never changes: `RELEASED` holds its sha256, the
versions table the checksum of the text each database applied, and a run where
either differs is refused before anything is applied. A change is a new version.
Versions applied before checksums were kept are taken as their released texts:
the texts 001-004 had before (`EARLIER`) differ from those only in what 006
defines again. Version 005 is not used: it named a recording change that was
folded into 004.

    MigrationError     a version failed; nothing of it was kept (a step on the live
                       table failed: the steps and batches before it are kept)
    MigrationStopped   asked to stop: what was committed stays, the next run goes on
    MigrationChanged   a text is not the released one, or not the one applied
"""

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import asyncpg

from ..schema import Tables
from .online import (
    BackfillRefused,
    LockNotGranted,
    MigrationStopped,
    Online,
    Step,
    backfill,
    finishing,
    locked,
    needs,
    run_step,
    split_first,
)

__all__ = [
    "BATCH_SIZE",
    "EARLIER",
    "MIGRATIONS",
    "RELEASED",
    "Migration",
    "MigrationChanged",
    "MigrationError",
    "MigrationStopped",
    "Online",
    "Plan",
    "Progress",
    "Step",
    "checksum",
    "migrate",
    "plan",
    "qualified",
]

LOCK_KEY = 0x5E551_0E15  # "session lens": one advisory lock for every runner
BACKFILL_MARK = "-- @backfill"
BATCH_SIZE = 10_000
ONLINE = Online()
"""The online steps' defaults."""

RELEASED: dict[int, str] = {
    1: "0012c49558a727d8181f3fa1b47bfba68a86d88f10236ade95d8c8f3973c9440",
    2: "e1649fe211b6cd9ccc093aefa23187302f474d0110de7435d056a7dca00cd57d",
    3: "4e98d385244ce3208e7e5799525bd4cdbdcbb6fec4841fd688f186a544d14dc3",
    4: "e181bb243f1a26b19fc8c063905c9bec5963e6a7b5827d7e8fb056e7d91a6284",
    6: "ad3819581fc4c097ea74d8c7111ecd526cb14b90fd6a7450775cbbb52196ca4a",
    7: "d6c4a079be7fc2e07e2d580e4770aa61ab08242c2f9485edfb88aa1e6356696f",
    8: "b48373e33e12ed964367f26fa8e500e3b09e5304bc72bea6d9c4f7533bf1b03f",
    9: "00cda17c59079705335d465dd68515a87f796bf92ab4c2ae8559dc5495b604d7",
}
"""The sha256 of each released version's text; a version joins when it is released."""

EARLIER: dict[int, frozenset[str]] = {
    1: frozenset({"2d79d922319c88e46c06e4cece900fc2d2a8989951956abbf7b9a438734f2cde"}),
    2: frozenset({"ad73b58527988bc91c27de39ed2d6d442e3026eff29a85bf7941bde71a3e4094"}),
    3: frozenset({"c5c01db7970abd6e1904c57e5309770b2b345eb74f9f1b50734ecdea5ab42a9e"}),
    4: frozenset(
        {
            "6a2edf4e4a8e0078865a352d747b33f368faad53ac26ab924e2913be725fe056",
            "8ebcb1080a58aee1d83da3e6048dd5f12abf8737c3b991d0f136bf1f6d76b75c",
            "a999ebb29067a43d73e5a9c7ade2613169977dfac24e7183cf140dcffc2112fc",
        }
    ),
}
"""Texts a version had before its released one; 006 brings a database migrated by them forward."""


def checksum(text: str) -> str:
    """The sha256 of a migration's text, as recorded."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class MigrationError(Exception):
    """A migration could not be applied; nothing of it was kept."""

    def __init__(self, version: int, detail: str) -> None:
        super().__init__(f"migration {version:03d} failed: {detail}")
        self.version = version
        self.detail = detail


class MigrationChanged(Exception):
    """A version's text is not the released one, or not the one the database applied."""

    def __init__(self, version: int, file: str, expected: str, found: str, applied: bool) -> None:
        super().__init__(version, file, expected, found, applied)
        self.version = version
        self.file = file
        self.expected = expected
        self.found = found
        self.applied = applied

    def __str__(self) -> str:
        found, expected = self.found[:12], self.expected[:12]
        if self.applied:
            return (
                f"migration {self.version:03d} ({self.file}) was applied to this database from"
                f" another text (sha256 {found}) than the released one ({expected}): a version"
                " never runs again; bring its objects to the released text by hand and record"
                " its checksum, or migrate a new database; nothing was applied"
            )
        return (
            f"migration {self.version:03d} ({self.file}) is not the released text"
            f" (sha256 {found}, released {expected}): restore the released text and put"
            " the change in a new version; nothing was applied"
        )


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version."""

    version: int
    name: str
    template: str = field(repr=False)

    @property
    def file(self) -> str:
        """The file it comes from."""
        return f"{self.version:03d}_{self.name}.sql"

    @property
    def checksum(self) -> str:
        """The sha256 of its text."""
        return checksum(self.template)

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


@dataclass(frozen=True, slots=True)
class Plan:
    """What a migration run would do."""

    applied: tuple[int, ...]
    pending: tuple[Migration, ...]
    table_exists: bool
    rows: int
    rows_to_backfill: int
    unrecorded: tuple[int, ...] = ()
    """Versions applied before checksums were kept: the run records their released ones."""
    refused: MigrationChanged | None = None
    """Why the run would be refused, applying nothing."""
    unfinished: tuple[Step, ...] = ()
    """Steps on the service's table an earlier run left undone (it stopped half-way)."""

    @property
    def up_to_date(self) -> bool:
        """Whether there is nothing to do."""
        return not (self.pending or self.unrecorded or self.unfinished)


async def plan(
    conn: asyncpg.Connection,
    tables: Tables,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
    online: Online = ONLINE,
) -> Plan:
    """Look, change nothing: which versions are pending and how many rows they touch."""
    tables = await qualified(conn, tables)
    names = tables.names
    recorded = await _recorded(conn, names["versions"])
    applied = tuple(sorted(recorded))
    pending = tuple(m for m in migrations if m.version not in recorded)
    unrecorded = tuple(
        m.version
        for m in migrations
        if m.version in recorded and recorded[m.version] is None and m.version in RELEASED
    )
    try:
        _check(migrations, _adopted(recorded, migrations))
        refused = None
    except MigrationChanged as exc:
        refused = exc
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
            await conn.fetchval(f"SELECT count(*) FROM {names['table']} WHERE {needs(tables)}")
            if has_all
            else total
        )
    unfinished: tuple[Step, ...] = ()
    first = _first(migrations)
    if first is not None and first.version in recorded and exists:
        unfinished = tuple(await finishing(conn, tables, first.render(tables)[1], online))
    return Plan(applied, pending, exists, total, to_fill, unrecorded, refused, unfinished)


def _first(migrations: Sequence[Migration]) -> Migration | None:
    """The version whose text has a backfill: its steps on the table are done online."""
    return next((m for m in migrations if BACKFILL_MARK in m.template), None)


async def _recorded(conn: asyncpg.Connection, versions: str) -> dict[int, str | None]:
    """Each applied version's checksum; None where it was applied before checksums were kept."""
    if await conn.fetchval("SELECT to_regclass($1)", versions) is None:
        return {}
    has_checksum = await conn.fetchval(
        "SELECT count(*) = 1 FROM pg_attribute WHERE attrelid = to_regclass($1)"
        " AND attname = 'checksum' AND NOT attisdropped",
        versions,
    )
    column = "checksum" if has_checksum else "NULL::text"
    rows = await conn.fetch(f"SELECT version, {column} AS checksum FROM {versions}")
    return {row["version"]: row["checksum"] for row in rows}


def _adopted(
    recorded: dict[int, str | None], migrations: Sequence[Migration]
) -> dict[int, str | None]:
    """The checksums once those applied before checksums were kept take their released ones."""
    released = {m.version: RELEASED.get(m.version) for m in migrations}
    return {
        version: found if found is not None else released.get(version)
        for version, found in recorded.items()
    }


def _check(migrations: Sequence[Migration], recorded: dict[int, str | None]) -> None:
    """Refuse a released text that was changed, or one the database applied otherwise."""
    for migration in migrations:
        released = RELEASED.get(migration.version)
        if released is not None and migration.checksum != released:
            raise MigrationChanged(
                migration.version, migration.file, released, migration.checksum, applied=False
            )
    for migration in migrations:
        found = recorded.get(migration.version)
        known = {migration.checksum} | EARLIER.get(migration.version, frozenset())
        if found is not None and found not in known:
            raise MigrationChanged(
                migration.version, migration.file, migration.checksum, found, applied=True
            )


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
    migrations: Sequence[Migration] = MIGRATIONS,
    online: Online = ONLINE,
) -> list[int]:
    """Apply every pending version, then the steps on the live table; returns the versions.

    Safe to run again, and at once. Raises MigrationStopped when `online.stopping`
    says so (after a batch or a step: what was committed stays, the next run goes on).
    """
    applied = []
    tables = await qualified(conn, tables)
    first = _first(migrations)
    # One lock for the whole run, so two runners cannot interleave versions. Asked
    # for again and again, not waited for: a waiting statement's snapshot would hold
    # up the other runner's CREATE INDEX CONCURRENTLY, which waits for every snapshot.
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    try:
        await _bookkeeping(conn, tables, migrations)
        if first is not None:
            await _check_expression(conn, tables, state_expression, first)
        for migration in migrations:
            if await _apply(conn, tables, migration, online):
                applied.append(migration.version)
            if online.stopping():
                raise MigrationStopped(f"version {migration.version:03d}", 0, 0)
        if first is not None and await _applied(conn, tables, first):
            await _finish(conn, tables, first, state_expression, batch_size, on_backfill, online)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return applied


async def _applied(conn: asyncpg.Connection, tables: Tables, migration: Migration) -> bool:
    return bool(
        await conn.fetchval(
            f"SELECT 1 FROM {tables.names['versions']} WHERE version = $1", migration.version
        )
    )


async def _check_expression(
    conn: asyncpg.Connection, tables: Tables, state_expression: str, first: Migration
) -> None:
    """Refuse a state expression the existing table cannot take, before anything changes."""
    table = tables.names["table"]
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return
    if await _applied(conn, tables, first):
        columns = ""
    else:  # its own columns, as the expression will see them
        columns = ", NULL::text AS state, NULL::timestamptz AS created_at,"
        columns += " NULL::timestamptz AS updated_at, NULL::timestamptz AS deleted_at"
        has = await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1)"
            " AND attnum > 0 AND NOT attisdropped",
            table,
        )
        if {"state", "created_at", "updated_at", "deleted_at"} & {r["attname"] for r in has}:
            columns = ""
    try:
        await conn.prepare(
            f"SELECT ({state_expression})::text FROM (SELECT *{columns} FROM {table}) AS t"
        )
    except asyncpg.PostgresError as exc:
        raise MigrationError(first.version, f"backfill_state {state_expression!r}: {exc}") from exc


async def _bookkeeping(
    conn: asyncpg.Connection, tables: Tables, migrations: Sequence[Migration]
) -> None:
    """Bring the versions table forward and check every text, or refuse and change nothing."""
    versions = tables.names["versions"]
    async with conn.transaction():
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {versions} ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), checksum text)"
        )
        # Nullable: NULL is a version applied before checksums were kept.
        await conn.execute(f"ALTER TABLE {versions} ADD COLUMN IF NOT EXISTS checksum text")
        adopted = _adopted(await _recorded(conn, versions), migrations)
        _check(migrations, adopted)
        unrecorded = {v: found for v, found in adopted.items() if found is not None}
        await conn.execute(
            f"UPDATE {versions} AS v SET checksum = r.checksum"
            " FROM unnest($1::integer[], $2::text[]) AS r (version, checksum)"
            " WHERE v.version = r.version AND v.checksum IS NULL",
            list(unrecorded),
            list(unrecorded.values()),
        )


async def _apply(
    conn: asyncpg.Connection, tables: Tables, migration: Migration, online: Online
) -> bool:
    """One version in one short transaction, under lock_timeout: its text, or for the
    version with a backfill, all but what `finishing` does on the live table."""
    names = tables.names
    if await _applied(conn, tables, migration):
        return False
    before, after = migration.render(tables)
    sql = [before, *split_first(after, tables).now] if after else [before]
    record = (
        f"INSERT INTO {names['versions']} (version, name, checksum) VALUES"
        f" ({migration.version}, {_literal(migration.name)}, {_literal(migration.checksum)})"
        " ON CONFLICT DO NOTHING"
    )
    try:
        await locked(
            conn, f"migration {migration.version:03d}", [*sql, record], names["table"], online
        )
    except (asyncpg.PostgresError, LockNotGranted) as exc:
        raise MigrationError(migration.version, str(exc)) from exc
    return True


def _literal(text: str) -> str:
    """A quoted SQL literal of a name or checksum (letters, digits, _ only)."""
    assert re.fullmatch(r"\w+", text), text
    return f"'{text}'"


async def _finish(
    conn: asyncpg.Connection,
    tables: Tables,
    first: Migration,
    state_expression: str,
    batch_size: int,
    on_backfill: Callable[[int], Progress] | None,
    online: Online,
) -> None:
    """The steps on the service's table that are not done yet, each found from the catalog."""
    after = first.render(tables)[1]
    for step in await finishing(conn, tables, after, online):
        try:
            if step.name == "backfill":
                done = await backfill(
                    conn, tables, state_expression, online, batch_size, on_backfill
                )
                if done.refused:
                    online.say(
                        f"backfill: {done.refused} rows' given timestamps refused (not a"
                        " time, or more than a day off the ID's minted time): dated by"
                        " their IDs instead, e.g. " + ", ".join(done.examples)
                    )
            else:
                await run_step(conn, tables, step, online)
        except BackfillRefused as exc:
            raise MigrationError(first.version, f"{exc}; the batches before it are kept") from exc
        except (ValueError, LockNotGranted) as exc:
            raise MigrationError(first.version, str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise MigrationError(first.version, f"{step.name}: {exc}") from exc
        if online.stopping():
            raise MigrationStopped(step.name, 0, 0)
