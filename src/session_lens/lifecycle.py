"""A small async library over asyncpg for the session lifecycle.

A session service can use it directly: atomic creation, the diagram's moves,
soft delete, restore, archive, lookups that leave deleted sessions out. The
database itself keeps the model (see the migration): this library names the
writer in the audit trail and turns refusals into errors that say why.
"""

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any

import asyncpg

from .evidence.classify import Rules, Said, classify
from .evidence.tables import Evidence, Queries
from .ids import IdValidator
from .schema import TRANSITIONS, SessionState, Tables, quote_ident


class LifecycleError(Exception):
    """A lifecycle operation was refused; nothing changed."""


class IllegalTransition(LifecycleError):
    """The diagram has no move between these two states."""

    def __init__(self, session_id: str, old: SessionState, new: SessionState) -> None:
        super().__init__(f"{session_id}: illegal transition {old} -> {new}")
        self.session_id = session_id
        self.old = old
        self.new = new


class SessionNotFound(LifecycleError):
    """No such session (or it is gone)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"{session_id}: no such session")
        self.session_id = session_id


class CreationFailed(LifecycleError):
    """A creation was rolled back; the audit trail says why."""

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"{session_id}: creation failed: {reason}")
        self.session_id = session_id
        self.reason = reason


class LookupReason(StrEnum):
    """Why `get_session` found what it found."""

    OK = "ok"
    INVALID_FORMAT = "invalid_format"
    NEVER_EXISTED = "never_existed"
    DELETED = "deleted"
    ARCHIVED = "archived"
    PURGED = "purged"
    CREATION_FAILED = "creation_failed"
    PREDATES_TRACKING = "predates_tracking"
    """No row, no audit entry, and the ID was minted before tracking began: no evidence."""


@dataclass(frozen=True, slots=True)
class Session:
    """A session's lifecycle columns."""

    id: str
    state: SessionState
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The answer to a lookup: found or not, and why."""

    found: bool
    session: Session | None
    reason: LookupReason


Verify = Callable[[asyncpg.Connection, str], Awaitable[None]]


class Lifecycle:
    """Lifecycle operations on the configured tables, through a pool or a connection."""

    def __init__(
        self,
        db: asyncpg.Pool | asyncpg.Connection,
        tables: Tables | None = None,
        *,
        actor: str = "session-lens",
        max_future_skew: timedelta = timedelta(hours=24),
        id_timezone: tzinfo = UTC,
        visibility_window: timedelta = timedelta(seconds=5),
        creation_timeout: timedelta = timedelta(seconds=30),
    ) -> None:
        self._db = db
        self._tables = tables or Tables()
        self._actor = actor
        self._validator = IdValidator(max_future_skew, id_timezone)
        self._evidence = Queries(self._tables).evidence
        self._rules = Rules(visibility_window, creation_timeout)
        names = self._tables.names
        columns = "{id}::text, state, created_at, updated_at, deleted_at".format(**names)
        self._select = f"SELECT {columns} FROM {names['table']} WHERE {names['id']} = $1"
        self._update = (
            f"UPDATE {names['table']} SET state = $2 WHERE {names['id']} = $1 RETURNING {columns}"
        )
        self._list = f"SELECT {columns} FROM {names['table']}"
        self._audit_failure = (
            f"INSERT INTO {names['audit']}"
            " (session_id, old_state, new_state, trigger, actor, reason)"
            " VALUES ($1, 'CREATING', NULL, $2, $3, $4)"
        )

    async def create_session(
        self,
        session_id: str,
        fields: Mapping[str, Any] | None = None,
        *,
        required: Iterable[str] = (),
        verify: Verify | None = None,
        actor: str | None = None,
    ) -> Session:
        """Create atomically: CREATING, checks, ACTIVE, all in one transaction or none of it.

        `required` names fields that must be present and not None; `verify` may run
        further checks inside the transaction and raise to refuse. A refused creation
        leaves one audit entry, CREATING -> (none), with the error as its reason.
        """
        fields = dict(fields or {})
        rule = self._validator.check(session_id)
        if rule is not None:
            raise LifecycleError(f"{session_id!r}: invalid session id ({rule})")
        names = self._tables.names
        columns = [names["id"], "state", *map(quote_ident, fields)]
        placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        insert = f"INSERT INTO {names['table']} ({', '.join(columns)}) VALUES ({placeholders})"
        who = actor or self._actor
        try:
            async with self._connection() as conn, conn.transaction():
                await self._name_writer(conn, "create", who)
                await conn.execute(
                    insert, session_id, SessionState.CREATING.value, *fields.values()
                )
                missing = [name for name in required if fields.get(name) is None]
                if missing:
                    raise CreationFailed(
                        session_id, f"missing required fields: {', '.join(missing)}"
                    )
                if verify is not None:
                    await verify(conn, session_id)
                row = await conn.fetchrow(self._update, session_id, SessionState.ACTIVE.value)
        except Exception as exc:
            reason = (
                exc.reason if isinstance(exc, CreationFailed) else f"{type(exc).__name__}: {exc}"
            )
            async with self._connection() as conn:
                # A duplicate ID is no failed creation: that session exists and keeps its trail.
                if await conn.fetchrow(self._select, session_id) is None:
                    await conn.execute(self._audit_failure, session_id, "create", who, reason)
            if isinstance(exc, CreationFailed):
                raise
            raise CreationFailed(session_id, reason) from exc
        return _session(row)

    async def transition(
        self,
        session_id: str,
        to: SessionState,
        *,
        actor: str | None = None,
        reason: str | None = None,
        trigger: str = "api",
    ) -> Session:
        """Move a session along one edge of the diagram; anything else raises, changing nothing."""
        async with self._connection() as conn, conn.transaction():
            current = await conn.fetchrow(self._select + " FOR UPDATE", session_id)
            if current is None:
                raise SessionNotFound(session_id)
            old = SessionState(current["state"])
            if to not in TRANSITIONS[old]:
                raise IllegalTransition(session_id, old, to)
            await self._name_writer(conn, trigger, actor or self._actor, reason)
            row = await conn.fetchrow(self._update, session_id, to.value)
        return _session(row)

    async def pause(self, session_id: str, **how: Any) -> Session:
        """ACTIVE -> PAUSED."""
        return await self.transition(session_id, SessionState.PAUSED, **how)

    async def resume(self, session_id: str, **how: Any) -> Session:
        """PAUSED -> ACTIVE."""
        return await self.transition(session_id, SessionState.ACTIVE, **how)

    async def stop(self, session_id: str, **how: Any) -> Session:
        """ACTIVE or PAUSED -> STOPPED."""
        return await self.transition(session_id, SessionState.STOPPED, **how)

    async def soft_delete(self, session_id: str, **how: Any) -> Session:
        """STOPPED -> DELETED; the row stays, `deleted_at` is set."""
        return await self.transition(session_id, SessionState.DELETED, **how)

    async def restore(self, session_id: str, **how: Any) -> Session:
        """DELETED -> STOPPED; `deleted_at` is cleared."""
        return await self.transition(session_id, SessionState.STOPPED, **how)

    async def archive(self, session_id: str, **how: Any) -> Session:
        """STOPPED or DELETED -> ARCHIVED."""
        return await self.transition(session_id, SessionState.ARCHIVED, **how)

    async def get_session(self, session_id: str, include_deleted: bool = False) -> LookupResult:
        """Look a session up the way a service should: deleted ones only when asked for."""
        if self._validator.check(session_id) is not None:
            return LookupResult(False, None, LookupReason.INVALID_FORMAT)
        async with self._connection() as conn:
            row = await conn.fetchrow(self._select, session_id)
            if row is None:  # why not: the one classification every door gives
                evidence = Evidence(*(await conn.fetchrow(self._evidence, session_id)).values())
                if evidence.has_row:  # created between the two reads
                    row = await conn.fetchrow(self._select, session_id)
        if row is None:
            said = Said(evidence, self._validator.minted_at(session_id))
            verdict = classify(said, include_deleted, self._rules)
            return LookupResult(False, None, LookupReason(verdict.reason.value))
        session = _session(row)
        if session.state is SessionState.ARCHIVED:
            return LookupResult(False, session, LookupReason.ARCHIVED)
        if session.state is SessionState.DELETED and not include_deleted:
            return LookupResult(False, session, LookupReason.DELETED)
        return LookupResult(True, session, LookupReason.OK)

    async def list_sessions(self, include_deleted: bool = False, limit: int = 100) -> list[Session]:
        """Sessions, newest first; DELETED ones only with `include_deleted`."""
        where = "" if include_deleted else " WHERE state <> 'DELETED'"
        query = f"{self._list}{where} ORDER BY created_at DESC LIMIT $1"
        async with self._connection() as conn:
            rows = await conn.fetch(query, limit)
        return [_session(row) for row in rows]

    def _connection(self) -> Any:
        if isinstance(self._db, asyncpg.Pool):
            return self._db.acquire()
        return _Borrowed(self._db)

    @staticmethod
    async def _name_writer(
        conn: asyncpg.Connection, trigger: str, actor: str, reason: str | None = None
    ) -> None:
        """Tell the audit trigger who is writing, for this transaction only."""
        await conn.execute(
            "SELECT set_config('session_lens.trigger', $1, true),"
            " set_config('session_lens.actor', $2, true),"
            " set_config('session_lens.reason', $3, true)",
            trigger,
            actor,
            reason or "",
        )


class _Borrowed:
    """A connection handed in, used as if acquired from a pool (and not closed)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def __aenter__(self) -> asyncpg.Connection:
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        return None


def _session(row: asyncpg.Record) -> Session:
    return Session(row[0], SessionState(row[1]), row[2], row[3], row[4])
