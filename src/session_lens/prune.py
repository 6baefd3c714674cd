"""Audit retention: the tracking horizon moved first, then the evidence older than it removed.

The order keeps every answer true wherever a run stops. Once the horizon has
moved (its own committed transaction), an ID minted before it without evidence
reads `predates_tracking`, whether its entries are gone yet or not; a purged
session newer than it keeps its whole trail. The entries then go in short
batches, each its own transaction, walking an index on their time by key (a
rescan from the start would read every dead entry of the batches before it),
so the service's writes never wait behind a long one and a re-run continues
where the last one stopped. The database's guard (migration 003) refuses any
DELETE of entries at or after the horizon, whoever sends it.

The indexes the batches walk are built with CREATE INDEX CONCURRENTLY by the
first run, so nobody who never prunes pays for them; a build cut short leaves
an INVALID index, dropped and built again by the next run.
"""

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from .migrations import Progress
from .schema import AUDIT_TIME_INDEX, EVENTS_TIME_INDEX, Tables

LOCK_KEY = 0x5E551_9A7E  # one prune at a time, apart from the migration runner's lock
BATCH_SIZE = 5_000
STATEMENT_TIMEOUT = 60.0
"""A batch, a horizon move or a count; index builds and the first counts may take longer."""
LOCK_TIMEOUT = "2s"
"""How long a batch may wait for a lock: never long in a queue ahead of the service's writes."""


class PruneError(Exception):
    """The store cannot be pruned as it is; `detail` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Stage(StrEnum):
    """How far a run has got."""

    STARTING = "starting"
    HORIZON = "moving the horizon"
    INDEXES = "building the indexes"
    AUDIT = "removing audit entries"
    EVENTS = "removing observed events"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Index:
    """An index the batches walk, and how to build it without blocking writes."""

    table: str
    """The table, quoted and schema-qualified."""
    name: str
    """The index's bare name, unquoted."""
    create: str


@dataclass(frozen=True, slots=True)
class Horizon:
    """The tracking row: the horizon and the bound of what has been pruned."""

    horizon: datetime | None
    pruned_before: datetime | None


_READ = "SELECT horizon, pruned_before FROM {tracking}"
_WOULD_BE = (
    "SELECT greatest(migrated_at, observing_since,"
    " greatest(coalesce(pruned_before, '-infinity'), $1)),"
    " greatest(coalesce(pruned_before, '-infinity'), $1)"
    " FROM {tracking}"
)
# Never backwards: a later run with a longer period leaves the horizon where it is.
_MOVE = (
    "UPDATE {tracking}"
    " SET pruned_before = greatest(coalesce(pruned_before, '-infinity'), $1)"
    " RETURNING horizon, pruned_before"
)
_COUNT = "SELECT count(*) FROM {table} WHERE occurred_at < $1"
_CREATE_INDEX = "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({columns})"
_INDEX_STATE = (
    "SELECT i.indexrelid::regclass::text AS name, i.indisvalid AS valid"
    " FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid"
    " WHERE i.indrelid = to_regclass($1) AND c.relname = $2"
)
# $1 the bound, ($2, $3) the last key removed, $4 the batch size. The key walks
# the index from where the last batch stopped; the guard checks each batch.
_AUDIT_BATCH = (
    "WITH batch AS ("
    " SELECT id, occurred_at FROM {audit}"
    " WHERE occurred_at < $1 AND (occurred_at, id) > ($2, $3)"
    " ORDER BY occurred_at, id LIMIT $4"
    "), gone AS ("
    " DELETE FROM {audit} AS a USING batch WHERE a.id = batch.id RETURNING a.id"
    ")"
    " SELECT (SELECT count(*) FROM gone) AS removed, last.occurred_at, last.id"
    " FROM (SELECT occurred_at, id FROM batch"
    "  ORDER BY occurred_at DESC, id DESC LIMIT 1) AS last"
)
# The events' index is on time alone: `>=` the last time removed, since events
# may share a time; the ones already removed are not seen again.
_EVENTS_BATCH = (
    "WITH batch AS ("
    " SELECT event_id, occurred_at FROM {events}"
    " WHERE occurred_at < $1 AND occurred_at >= $2"
    " ORDER BY occurred_at LIMIT $3"
    "), gone AS ("
    " DELETE FROM {events} AS e USING batch WHERE e.event_id = batch.event_id"
    " RETURNING e.event_id"
    ")"
    " SELECT (SELECT count(*) FROM gone) AS removed, max(occurred_at) AS last FROM batch"
)


class Queries:
    """The SQL of a prune for the configured tables, formatted once."""

    def __init__(self, tables: Tables) -> None:
        names = tables.names
        audit, events = names["audit"], names["events"]
        self.tracking = names["tracking"]
        self.now = "SELECT statement_timestamp()"
        self.read = _READ.format(**names)
        self.would_be = _WOULD_BE.format(**names)
        self.move = _MOVE.format(**names)
        self.count_audit = _COUNT.format(table=audit)
        self.count_events = _COUNT.format(table=events)
        self.indexes = (
            Index(
                audit,
                AUDIT_TIME_INDEX,
                _CREATE_INDEX.format(
                    index=names["audit_time_idx"], table=audit, columns="occurred_at, id"
                ),
            ),
            Index(
                events,
                EVENTS_TIME_INDEX,
                _CREATE_INDEX.format(
                    index=names["events_time_idx"], table=events, columns="occurred_at"
                ),
            ),
        )
        self.index_state = _INDEX_STATE
        self.audit_batch = _AUDIT_BATCH.format(**names)
        self.events_batch = _EVENTS_BATCH.format(**names)
        self.batch_settings = (
            f"SET LOCAL session_lens.pruning = 'on'; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"
        )


@dataclass(frozen=True, slots=True)
class Preview:
    """What a run would do: the horizon's move and how much would go."""

    horizon: Horizon
    would_be: Horizon
    audit_entries: int
    events: int


@dataclass(slots=True)
class Pruning:
    """One run against one connection; its fields say how far it has got, even when cut short."""

    conn: asyncpg.Connection
    tables: Tables
    cutoff: datetime
    batch_size: int = BATCH_SIZE
    stage: Stage = Stage.STARTING
    before: Horizon | None = None
    after: Horizon | None = None
    audit_total: int = 0
    audit_removed: int = 0
    events_total: int = 0
    events_removed: int = 0
    seconds: dict[Stage, float] = field(default_factory=dict)
    queries: Queries = field(init=False)
    _on_stage: Callable[[Stage], None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.queries = Queries(self.tables)

    async def check(self) -> None:
        """Raise a PruneError unless the store has the tracking row of migration 003."""
        found = await self.conn.fetchval(
            "SELECT to_regclass($1)", self.queries.tracking, timeout=STATEMENT_TIMEOUT
        )
        if found is None:
            raise PruneError("the lifecycle tables predate migration 003: run migrate first")
        if await self.conn.fetchrow(self.queries.read, timeout=STATEMENT_TIMEOUT) is None:
            raise PruneError(f"{self.queries.tracking} has no row: run migrate again")

    async def preview(self) -> Preview:
        """Count what would go; change nothing."""
        await self.check()
        q = self.queries
        row = await self.conn.fetchrow(q.read, timeout=STATEMENT_TIMEOUT)
        would = await self.conn.fetchrow(q.would_be, self.cutoff, timeout=STATEMENT_TIMEOUT)
        bound = would[1]
        # Without the index yet, these counts read the whole table: no timeout of ours.
        audit = await self.conn.fetchval(q.count_audit, bound, timeout=None)
        events = await self.conn.fetchval(q.count_events, bound, timeout=None)
        return Preview(Horizon(*row.values()), Horizon(*would.values()), audit, events)

    async def run(
        self,
        progress: Callable[[Stage, int], Progress] | None = None,
        on_stage: Callable[[Stage], None] | None = None,
    ) -> None:
        """Move the horizon, build the indexes, remove what is older; safe to cut and re-run.

        `progress(stage, total)` returns what to call with each batch's count;
        `on_stage` hears of each stage as it begins.
        """
        self._on_stage = on_stage
        await self.check()
        locked = await self.conn.fetchval(
            "SELECT pg_try_advisory_lock($1)", LOCK_KEY, timeout=STATEMENT_TIMEOUT
        )
        if not locked:
            raise PruneError("another prune is running on this database")
        # Held until the run ends, or its connection closes if it is cut short.
        await self._timed(Stage.HORIZON, self._move())
        await self._timed(Stage.INDEXES, self._indexes())
        await self._timed(Stage.AUDIT, self._audit(progress))
        await self._timed(Stage.EVENTS, self._events(progress))
        self.stage = Stage.DONE
        await self.conn.execute(
            "SELECT pg_advisory_unlock($1)", LOCK_KEY, timeout=STATEMENT_TIMEOUT
        )

    async def _timed(self, stage: Stage, work: Coroutine[Any, Any, None]) -> None:
        self.stage = stage
        if self._on_stage:
            self._on_stage(stage)
        started = time.perf_counter()
        try:
            await work
        finally:
            self.seconds[stage] = time.perf_counter() - started

    async def _move(self) -> None:
        q = self.queries
        async with self.conn.transaction():
            await self.conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            row = await self.conn.fetchrow(q.read + " FOR UPDATE", timeout=STATEMENT_TIMEOUT)
            moved = await self.conn.fetchrow(q.move, self.cutoff, timeout=STATEMENT_TIMEOUT)
        # Only once committed: until then, a run cut short has changed nothing.
        self.before, self.after = Horizon(*row.values()), Horizon(*moved.values())

    async def _indexes(self) -> None:
        # One process builds, not a leader and its workers: the cores stay the service's.
        await self.conn.execute(
            "SET max_parallel_maintenance_workers = 0", timeout=STATEMENT_TIMEOUT
        )
        for index in self.queries.indexes:
            found = await self.conn.fetchrow(
                self.queries.index_state, index.table, index.name, timeout=STATEMENT_TIMEOUT
            )
            if found is not None and not found["valid"]:
                # A build cut short: IF NOT EXISTS would take it for done.
                await self.conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {found['name']}")
            if found is None or not found["valid"]:
                # Outside a transaction, and as long as it takes (no timeout of ours):
                # the service's writes go on meanwhile.
                await self.conn.execute(index.create, timeout=None)

    @property
    def _bound(self) -> datetime:
        assert self.after is not None and self.after.pruned_before is not None
        return self.after.pruned_before

    async def _audit(self, progress: Callable[[Stage, int], Progress] | None) -> None:
        q = self.queries
        self.audit_total = await self.conn.fetchval(q.count_audit, self._bound, timeout=None)
        advance = progress(Stage.AUDIT, self.audit_total) if progress else None
        last_at, last_id = datetime.min.replace(tzinfo=self._bound.tzinfo), -(1 << 63)
        while True:
            async with self.conn.transaction():
                await self.conn.execute(q.batch_settings)
                row = await self.conn.fetchrow(
                    q.audit_batch, self._bound, last_at, last_id, self.batch_size,
                    timeout=STATEMENT_TIMEOUT,
                )  # fmt: skip
            if row is None:
                return
            self.audit_removed += row["removed"]
            last_at, last_id = row["occurred_at"], row["id"]
            if advance:
                advance(row["removed"])

    async def _events(self, progress: Callable[[Stage, int], Progress] | None) -> None:
        q = self.queries
        self.events_total = await self.conn.fetchval(q.count_events, self._bound, timeout=None)
        advance = progress(Stage.EVENTS, self.events_total) if progress else None
        last = datetime.min.replace(tzinfo=self._bound.tzinfo)
        while True:
            async with self.conn.transaction():
                await self.conn.execute(q.batch_settings)
                row = await self.conn.fetchrow(
                    q.events_batch, self._bound, last, self.batch_size, timeout=STATEMENT_TIMEOUT
                )
            if not row["removed"]:
                return
            self.events_removed += row["removed"]
            last = row["last"]
            if advance:
                advance(row["removed"])
