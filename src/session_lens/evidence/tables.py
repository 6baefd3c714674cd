"""PostgreSQL reads for explaining misses: queries built once, rows as frozen dataclasses.

Errors from asyncpg or the network become this module's own:

    StoreError
    ├── StoreUnavailable   no connection could be had (down, refused, pool closed)
    ├── StoreTimeout       the query did not answer in time
    └── StoreQueryFailed   the database answered with an error (not migrated, say)
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from ..pg import UNREACHABLE, held, remedy
from ..schema import Tables


class StoreError(Exception):
    """The lifecycle tables could not be read."""

    kind = "query"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class StoreUnavailable(StoreError):
    """No connection to the database could be had."""

    kind = "unavailable"


class StoreTimeout(StoreError):
    """The database did not answer in time."""

    kind = "timeout"


class StoreQueryFailed(StoreError):
    """The database refused the query."""

    kind = "query"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the lifecycle tables say of one session ID, read in one round trip."""

    state: str | None
    created_at: datetime | None
    updated_at: datetime | None
    deleted_at: datetime | None
    last_old_state: str | None
    last_new_state: str | None
    last_at: datetime | None
    last_trigger: str | None
    now: datetime
    horizon: datetime | None
    """Since when the lifecycle tables hold every change (None: not recorded)."""
    replaying: datetime | None = None
    """The newest event of the spools being replayed now, by any recorder (None: none is)."""

    @property
    def has_row(self) -> bool:
        """Whether the sessions table holds the ID."""
        return self.state is not None

    @property
    def has_audit(self) -> bool:
        """Whether the audit trail has ever heard of the ID."""
        return self.last_at is not None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of a session's audit trail."""

    id: int
    occurred_at: datetime
    old_state: str | None
    new_state: str | None
    trigger: str
    actor: str
    reason: str | None


REPLAY_STALE = 60
"""Seconds after which a replay that said nothing more is taken for dead (its recorder
says so with every batch it writes)."""


class Queries:
    """The SQL for the configured tables, formatted once so asyncpg caches each statement."""

    def __init__(self, tables: Tables) -> None:
        names = tables.names
        self.evidence = (
            # ::timestamptz: a legacy table may keep these as timestamps without a zone.
            "SELECT s.state::text, s.created_at::timestamptz, s.updated_at::timestamptz,"
            " s.deleted_at::timestamptz,"
            " a.old_state, a.new_state, a.occurred_at, a.trigger, statement_timestamp(),"
            " (SELECT horizon FROM {tracking}),"
            " (SELECT max(newest) FROM {replays}"
            f"  WHERE heartbeat > statement_timestamp() - interval '{REPLAY_STALE} seconds')"
            " FROM (SELECT $1::text AS key) AS k"
            " LEFT JOIN {table} AS s ON s.{id} = k.key"
            " LEFT JOIN LATERAL ("
            "  SELECT old_state, new_state, occurred_at, trigger FROM {audit}"
            "  WHERE session_id = k.key ORDER BY occurred_at DESC, id DESC LIMIT 1"
            " ) AS a ON true"
        ).format(**names)
        self.timeline = (
            "SELECT id, occurred_at, old_state, new_state, trigger, actor, reason"
            " FROM {audit} WHERE session_id = $1::text ORDER BY occurred_at, id LIMIT $2"
        ).format(**names)
        self.stored = (  # event IDs as a recorder writes them: 32 hex digits
            "SELECT replace(event_id::text, '-', '') FROM {events}"
            " WHERE event_id = ANY($1::text[]::uuid[])"
        ).format(**names)


async def read_evidence(
    pool: asyncpg.Pool, queries: Queries, session_id: str, timeout: float
) -> Evidence:
    """The evidence for one ID; raises a StoreError."""
    row = await _fetch(pool, timeout, queries.evidence, session_id)
    assert row is not None
    return Evidence(*row.values())


async def read_stored(
    pool: asyncpg.Pool, queries: Queries, event_ids: list[str], timeout: float
) -> set[str]:
    """Which of these observed events the tables have; raises a StoreError."""
    async with _translated(timeout), asyncio.timeout(timeout), held(pool) as conn:
        rows = await conn.fetch(queries.stored, event_ids)
    return {row[0] for row in rows}


async def read_timeline(
    pool: asyncpg.Pool, queries: Queries, session_id: str, timeout: float, limit: int = 1000
) -> list[AuditEntry]:
    """The audit trail of one ID, oldest first; raises a StoreError."""
    async with _translated(timeout), asyncio.timeout(timeout), held(pool) as conn:
        rows = await conn.fetch(queries.timeline, session_id, limit)
    return [AuditEntry(*row.values()) for row in rows]


async def _fetch(
    pool: asyncpg.Pool, timeout: float, query: str, *args: object
) -> asyncpg.Record | None:
    # One deadline for both steps: a timer, where asyncpg's own acquire timeout
    # would start a task on every call.
    async with _translated(timeout), asyncio.timeout(timeout), held(pool) as conn:
        return await conn.fetchrow(query, *args)


@asynccontextmanager
async def _translated(timeout: float) -> AsyncIterator[None]:
    """Turn asyncpg's and the network's exceptions into StoreErrors."""
    try:
        yield
    except TimeoutError as exc:
        raise StoreTimeout(f"no answer within {timeout * 1000:g} ms") from exc
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        hint = remedy(exc)
        detail = f"{type(exc).__name__}: {exc}" + (f" ({hint})" if hint else "")
        raise StoreQueryFailed(detail) from exc


TRAIL_ENTRIES = 64
"""The newest audit entries read per ID for a trail: a lookup older than all of them is
judged as the oldest of them left it."""


@dataclass(frozen=True, slots=True)
class Trail:
    """What the lifecycle tables say of one ID over time: its row now and its newest audit
    entries, from which `replay.as_of` tells the evidence at any past moment."""

    session_id: str
    state: str | None
    created_at: datetime | None
    updated_at: datetime | None
    deleted_at: datetime | None
    entries: list[AuditEntry]
    """Oldest first; at most `TRAIL_ENTRIES`, the newest (their actor and reason not read)."""
    now: datetime
    horizon: datetime | None
    judged: dict[tuple[bool, int], Any] = field(default_factory=dict, compare=False, repr=False)
    """Reasons given to lookups of it that no age decides, by `include_deleted` and the
    audit entries behind them: the same again for another such lookup."""

    @property
    def complete(self) -> bool:
        """Whether `entries` holds the ID's whole audit trail."""
        return len(self.entries) < TRAIL_ENTRIES

    def steps_by(self, moment: datetime | None) -> int:
        """How many of the audit entries kept had happened by `moment` (None: now)."""
        if moment is None or moment >= self.now:
            return len(self.entries)
        low, high = 0, len(self.entries)
        while low < high:
            middle = (low + high) // 2
            if self.entries[middle].occurred_at <= moment:
                low = middle + 1
            else:
                high = middle
        return low

    def evidence(self) -> Evidence:
        """The evidence now, as the one evidence query reads it."""
        last = self.entries[-1] if self.entries else None
        return Evidence(
            self.state, self.created_at, self.updated_at, self.deleted_at,
            last.old_state if last else None, last.new_state if last else None,
            last.occurred_at if last else None, last.trigger if last else None,
            self.now, self.horizon,
        )  # fmt: skip


def trails_query(tables: Tables) -> str:
    """The SQL reading the trails of many IDs at once ($1 text[], $2 the entries per ID)."""
    return (
        "SELECT k.key, s.state::text, s.created_at::timestamptz, s.updated_at::timestamptz,"
        " s.deleted_at::timestamptz, a.olds, a.news, a.ats, a.triggers,"
        " statement_timestamp(), (SELECT horizon FROM {tracking})"
        " FROM unnest($1::text[]) AS k(key)"
        " LEFT JOIN {table} AS s ON s.{id} = k.key"
        " LEFT JOIN LATERAL ("
        "  SELECT array_agg(t.old_state ORDER BY t.occurred_at, t.id) AS olds,"
        "   array_agg(t.new_state ORDER BY t.occurred_at, t.id) AS news,"
        "   array_agg(t.occurred_at ORDER BY t.occurred_at, t.id) AS ats,"
        "   array_agg(t.trigger ORDER BY t.occurred_at, t.id) AS triggers"
        "  FROM (SELECT id, old_state, new_state, occurred_at, trigger FROM {audit}"
        "   WHERE session_id = k.key ORDER BY occurred_at DESC, id DESC LIMIT $2) AS t"
        " ) AS a ON true"
    ).format(**tables.names)


async def read_trails(
    pool: asyncpg.Pool, query: str, session_ids: list[str], timeout: float
) -> dict[str, Trail]:
    """The trails of many IDs in one round trip (`query` from `trails_query`); raises a
    StoreError."""
    async with _translated(timeout), asyncio.timeout(timeout), held(pool) as conn:
        rows = await conn.fetch(query, session_ids, TRAIL_ENTRIES)
    trails = {}
    for row in rows:
        key, state, created, updated, deleted, olds, news, ats, triggers, now, horizon = row
        entries = [
            AuditEntry(0, at, old, new, trigger, "", None)
            for old, new, at, trigger in zip(
                olds or (), news or (), ats or (), triggers or (), strict=True
            )
        ]
        trails[key] = Trail(key, state, created, updated, deleted, entries, now, horizon)
    return trails
