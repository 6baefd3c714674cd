"""A reference session service whose sessions live in QuestDB, with faults on purpose.

The story's data provider: one WAL table partitioned by day on the session's creation
(the moment its ID names), with a TTL; a state change is an `UPDATE` of the row,
deletion is soft (`state = 'DELETED'`), `include_deleted` shows a deleted session, and
an archived one is kept but not served, as the lifecycle library does.
QuestDB applies every write from its write-ahead log a moment after accepting it, so a
read straight after a write may not see it yet: that is the store, not a fault.

Faults, each a cause of a miss that session-lens should name:

- `ignore_include_deleted`: a deleted session is 404 even when asked for it;
- `suspended_wal`: now and then the table's WAL is suspended (`ALTER TABLE ... SUSPEND
  WAL`) for `suspend_for` seconds: every write is accepted, none becomes visible until
  `RESUME WAL`, as after a failed apply;
- `lagging_apply`: more often, the apply pauses for `lag` seconds, so fresh sessions
  show late (QuestDB has no setting that slows its apply: a short suspension is the lag);
- `dropped_partitions`: an operator drops the oldest day partition now and then.

`SUSPEND WAL` needs QuestDB's dev mode (`dev.mode.enabled=true`, or
`QDB_DEV_MODE_ENABLED=true`); elsewhere turn those two faults off.
"""

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from .ids import IdValidator
from .schema import TRANSITIONS, SessionState

FAULTS = ("ignore_include_deleted", "suspended_wal", "lagging_apply", "dropped_partitions")
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
TIMEOUT = 10.0
_MINTED = IdValidator(timedelta(days=1))
ACTIONS = {
    "pause": SessionState.PAUSED,
    "resume": SessionState.ACTIVE,
    "stop": SessionState.STOPPED,
    "restore": SessionState.STOPPED,
    "archive": SessionState.ARCHIVED,
}


@dataclass
class StoreFaults:
    """Which faults are on, and how often they strike (seconds)."""

    enabled: frozenset[str] = frozenset(FAULTS)
    suspend_every: float = 20.0
    suspend_for: float = 4.0
    lag_every: float = 6.0
    lag: float = 1.0
    drop_every: float = 15.0

    def on(self, fault: str) -> bool:
        """Whether a fault is enabled."""
        return fault in self.enabled


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session's row in QuestDB (its times naive, in UTC, as QuestDB keeps them)."""

    id: str
    state: SessionState
    created_at: datetime
    updated_at: datetime | None
    deleted_at: datetime | None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "created_at": self.created_at.replace(tzinfo=UTC).isoformat(),
            "deleted_at": self.deleted_at.replace(tzinfo=UTC).isoformat()
            if self.deleted_at
            else None,
        }


def table_name(name: str) -> str:
    """A table name safe to put into SQL text; raises ValueError otherwise."""
    if not TABLE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a plain table name (letters, digits, _)")
    return name


def minted(session_id: str) -> datetime:
    """The second an ID names (naive UTC), which is its row's designated timestamp."""
    at = _MINTED.minted_at(session_id)
    if at is None:
        raise ValueError(f"{session_id!r} is not a session ID")
    return at.replace(tzinfo=None)


async def create_table(conn: asyncpg.Connection, table: str, ttl_days: int) -> None:
    """The sessions table: WAL, partitioned by day on creation, dropped after `ttl_days`."""
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {table_name(table)} (id VARCHAR, state SYMBOL,"
        " created_at TIMESTAMP, updated_at TIMESTAMP, deleted_at TIMESTAMP)"
        f" TIMESTAMP(created_at) PARTITION BY DAY TTL {int(ttl_days)} DAYS WAL",
        timeout=TIMEOUT,
    )


async def seed(conn: asyncpg.Connection, table: str, days: int, per_day: int) -> None:
    """Sessions of the last `days` days (none today), `per_day` a day, in one INSERT: a
    fifth each ACTIVE, PAUSED, STOPPED, DELETED (since its creation) and ARCHIVED."""
    start = (datetime.now(UTC) - timedelta(days=days)).replace(
        hour=0, minute=0, second=0, microsecond=0, tzinfo=None
    )
    step = 86_400 // per_day
    origin = f"'{start:%Y-%m-%dT%H:%M:%S}Z'"
    await conn.execute(
        f"INSERT INTO {table_name(table)} SELECT"
        " concat('exec_', to_str(ts, 'yyyyMMdd_HHmmss'), '_', lpad(cast(x AS string), 8, '0')),"
        " cast(CASE x % 5 WHEN 0 THEN 'ACTIVE' WHEN 1 THEN 'PAUSED' WHEN 2 THEN 'STOPPED'"
        " WHEN 3 THEN 'DELETED' ELSE 'ARCHIVED' END AS SYMBOL), ts, ts,"
        " CASE WHEN x % 5 = 3 THEN ts END"
        f" FROM (SELECT x, dateadd('s', cast((x - 1) * {step} AS int), {origin}) ts"
        f" FROM long_sequence({int(days * per_day)}))",
        timeout=60,
    )


class QuestDBReferenceService:
    """The service's handlers over a QuestDB pool, and its background faults."""

    def __init__(self, pool: asyncpg.Pool, faults: StoreFaults, table: str = "sessions") -> None:
        self.pool = pool
        self.faults = faults
        self.table = table_name(table)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wal = asyncio.Lock()
        """One pause of the apply at a time: a lag's RESUME must not end a suspension."""
        t = self.table
        self._select = (
            f"SELECT id, state, created_at, updated_at, deleted_at FROM {t}"
            " WHERE created_at >= $1 AND created_at < $2 AND id = $3 LIMIT 1"
        )
        self._insert = f"INSERT INTO {t} VALUES ($1, $2, $3, $4, null)"
        self._update = (
            f"UPDATE {t} SET state = $1, updated_at = $2, deleted_at = $3"
            " WHERE created_at >= $4 AND created_at < $5 AND id = $6"
        )
        self._list = (
            "SELECT id, state, created_at, updated_at, deleted_at FROM {t}{where}"
            " ORDER BY created_at DESC LIMIT 100"
        )

    def app(self) -> web.Application:
        """The aiohttp application serving the session API."""
        app = web.Application()
        app.add_routes(
            [
                web.post("/api/sessions", self.create),
                web.get("/api/sessions", self.list),
                web.get("/api/sessions/{session_id}", self.get),
                web.delete("/api/sessions/{session_id}", self.delete),
                web.post("/api/sessions/{session_id}/{action}", self.act),
            ]
        )
        app.cleanup_ctx.append(self._background)
        return app

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        if self.faults.on("suspended_wal"):
            self._spawn(self._every(self.faults.suspend_every, self._pause_apply, "suspend_for"))
        if self.faults.on("lagging_apply"):
            self._spawn(self._every(self.faults.lag_every, self._pause_apply, "lag"))
        if self.faults.on("dropped_partitions"):
            self._spawn(self._every(self.faults.drop_every, self.drop_oldest_partition))
        yield
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await self.resume()  # never leave the table suspended behind us

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _every(self, seconds: float, job: Callable[..., Awaitable[Any]], *args: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await job(*args)

    async def _pause_apply(self, length: str) -> None:
        async with self._wal:
            await self.suspend()
            try:
                await asyncio.sleep(getattr(self.faults, length))
            finally:
                await self.resume()

    async def suspend(self) -> None:
        """Suspend the table's WAL: writes are accepted, none is applied."""
        await self.pool.execute(f"ALTER TABLE {self.table} SUSPEND WAL", timeout=TIMEOUT)

    async def resume(self) -> None:
        """Resume the table's WAL: what was accepted meanwhile becomes visible."""
        await self.pool.execute(f"ALTER TABLE {self.table} RESUME WAL", timeout=TIMEOUT)

    async def drop_oldest_partition(self) -> str | None:
        """Drop the oldest day partition, as an operator might; its name, or None."""
        oldest = await self.pool.fetchval(
            f"SELECT name FROM table_partitions('{self.table}') ORDER BY index LIMIT 1",
            timeout=TIMEOUT,
        )
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        if oldest is None or oldest >= today:  # the active partition stays
            return None
        await self.pool.execute(
            f"ALTER TABLE {self.table} DROP PARTITION LIST '{oldest}'", timeout=TIMEOUT
        )
        return str(oldest)

    async def find(self, session_id: str) -> StoredSession | None:
        """The session's row, read in the partition its ID names."""
        try:
            at = minted(session_id)
        except ValueError:
            return None
        row = await self.pool.fetchrow(
            self._select, at, at + timedelta(seconds=1), session_id, timeout=TIMEOUT
        )
        if row is None:
            return None
        return StoredSession(
            row["id"], SessionState(row["state"]), row["created_at"], row["updated_at"],
            row["deleted_at"],
        )  # fmt: skip

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        session_id = str(body.get("id") or new_session_id())
        try:
            at = minted(session_id)
        except ValueError as exc:
            return web.json_response({"id": session_id, "error": str(exc)}, status=400)
        if await self.find(session_id) is not None:
            return web.json_response({"id": session_id, "error": "exists"}, status=409)
        now = _now()
        await self.pool.execute(self._insert, session_id, "ACTIVE", at, now, timeout=TIMEOUT)
        stored = StoredSession(session_id, SessionState.ACTIVE, at, now, None)
        return web.json_response(stored.json(), status=201)

    async def get(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        include_deleted = request.query.get("include_deleted", "").lower() in ("true", "1")
        if self.faults.on("ignore_include_deleted"):
            include_deleted = False
        found = await self.find(session_id)
        if found is None or found.state is SessionState.ARCHIVED:  # kept, never served
            return _not_found(session_id)
        if found.state is SessionState.DELETED and not include_deleted:
            return _not_found(session_id)
        return web.json_response(found.json())

    async def list(self, request: web.Request) -> web.Response:
        include_deleted = request.query.get("include_deleted", "").lower() in ("true", "1")
        where = "" if include_deleted else " WHERE state != 'DELETED'"
        rows = await self.pool.fetch(self._list.format(t=self.table, where=where), timeout=TIMEOUT)
        return web.json_response(
            [StoredSession(r["id"], SessionState(r["state"]), r["created_at"],
                           r["updated_at"], r["deleted_at"]).json() for r in rows]
        )  # fmt: skip

    async def delete(self, request: web.Request) -> web.Response:
        return await self._move(request.match_info["session_id"], SessionState.DELETED)

    async def act(self, request: web.Request) -> web.Response:
        target = ACTIONS.get(request.match_info["action"])
        if target is None:
            raise web.HTTPNotFound()
        return await self._move(request.match_info["session_id"], target)

    async def _move(self, session_id: str, target: SessionState) -> web.Response:
        found = await self.find(session_id)
        if found is None:
            return _not_found(session_id)
        if target not in TRANSITIONS[found.state]:
            error = f"{found.state.value} -> {target.value} is not allowed"
            return web.json_response({"id": session_id, "error": error}, status=409)
        now = _now()
        deleted = now if target is SessionState.DELETED else None
        at = found.created_at
        await self.pool.execute(
            self._update, target.value, now, deleted, at, at + timedelta(seconds=1), session_id,
            timeout=TIMEOUT,
        )  # fmt: skip
        moved = StoredSession(session_id, target, at, now, deleted)
        return web.json_response(moved.json())


def new_session_id() -> str:
    """A fresh ID in the service's format, minted now."""
    return datetime.now(UTC).strftime("exec_%Y%m%d_%H%M%S_") + secrets.token_hex(4)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _not_found(session_id: str) -> web.Response:
    return web.json_response({"error": "session_not_found", "id": session_id}, status=404)
