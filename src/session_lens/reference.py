"""A reference session service on the lifecycle library, with faults on purpose.

It implements the story's API (create, get with `include_deleted`, pause, resume,
stop, delete, restore, archive, list) and can misbehave the ways real services
do, each fault a cause of a miss that session-lens should name:

- `ignore_include_deleted`: a deleted session is 404 even when asked for it;
- `lagging_replica`: reads come from a replica that lags writes by `lag` seconds;
- `loses_sessions`: a share of live sessions is simply not found;
- `failing_creations`: a share of creations fails half-way (rolled back), and a
  share is slow, two-step: the CREATING row is committed first;
- `hard_deletes`: an operator purges a share of deleted sessions with plain SQL;
- `locks_table`: now and then a maintenance job locks the audit table for a moment.

Each lookup it answers "not found" it logs as the story's service does, one JSON line
(`event_type` `questdb_data_provider.session_not_found`, the ID and `include_deleted`
as asked under `data`), to the `miss_log` it is given: what `session-lens triage` reads.

It is the demo's upstream and a fixture for the tests.
"""

import asyncio
import contextlib
import json
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import asyncpg
from aiohttp import web

from .lifecycle import CreationFailed, IllegalTransition, Lifecycle, Session, SessionNotFound
from .schema import LIVE_STATES, SessionState

FAULTS = (
    "ignore_include_deleted",
    "lagging_replica",
    "loses_sessions",
    "failing_creations",
    "hard_deletes",
    "locks_table",
)


@dataclass
class Faults:
    """Which faults are on, and how often they strike."""

    enabled: frozenset[str] = frozenset(FAULTS)
    lag: float = 1.5
    """Seconds the replica lags behind writes."""
    share: float = 0.1
    """Share of sessions a probabilistic fault strikes."""
    purge_share: float = 0.35
    """Share of deleted sessions an operator purges by hand."""
    slow_creation: float = 1.5
    lock_every: float = 4.0
    lock_for: float = 0.2
    rng: random.Random = field(default_factory=random.Random)

    def on(self, fault: str) -> bool:
        """Whether a fault is enabled."""
        return fault in self.enabled

    def strikes(self, fault: str, share: float | None = None) -> bool:
        """Whether an enabled probabilistic fault strikes this time."""
        return fault in self.enabled and self.rng.random() < (share or self.share)


def new_session_id(minted: datetime | None = None) -> str:
    """A fresh ID in the service's format, minted now unless told when."""
    return (minted or datetime.now(UTC)).strftime("exec_%Y%m%d_%H%M%S_") + secrets.token_hex(4)


class ReferenceService:
    """The service's handlers and its background faults."""

    def __init__(self, pool: asyncpg.Pool, faults: Faults, miss_log: IO[str] | None = None) -> None:
        self.pool = pool
        self.faults = faults
        self.miss_log = miss_log
        self.lifecycle = Lifecycle(pool, actor="reference-service")
        self._written: dict[str, float] = {}
        self._lost: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        """The aiohttp application serving the session API."""
        app = web.Application()
        routes = [
            web.post("/api/sessions", self.create),
            web.get("/api/sessions", self.list),
            web.get("/api/sessions/{session_id}", self.get),
            web.delete("/api/sessions/{session_id}", self.delete),
            web.post("/api/sessions/{session_id}/{action}", self.act),
        ]
        app.add_routes(routes)
        app.cleanup_ctx.append(self._background)
        return app

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        if self.faults.on("locks_table"):
            self._spawn(self._lock_now_and_then())
        yield
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lock_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(self.faults.lock_every)
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                async with self.pool.acquire() as conn, conn.transaction():
                    # The audit trail, so reads of sessions go on and only explaining waits.
                    await conn.execute("LOCK TABLE session_audit IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(self.faults.lock_for)

    def _touched(self, session_id: str) -> None:
        self._written[session_id] = asyncio.get_running_loop().time()
        if len(self._written) > 50_000:
            self._written.clear()

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        session_id = str(body.get("id") or new_session_id())
        if self.faults.strikes("failing_creations"):
            verify = _half_way
        elif self.faults.strikes("failing_creations"):
            await self.pool.execute(
                "INSERT INTO sessions (id, state) VALUES ($1, 'CREATING')", session_id
            )
            self._spawn(self._slow_creation(session_id))
            return web.json_response({"id": session_id, "state": "CREATING"}, status=202)
        else:
            verify = None
        try:
            session = await self.lifecycle.create_session(session_id, verify=verify)
        except CreationFailed as exc:
            return web.json_response({"id": session_id, "error": exc.reason}, status=503)
        self._touched(session_id)
        if self.faults.strikes("loses_sessions", 3 * self.faults.share):
            self._lost.add(session_id)
        return web.json_response(_json(session), status=201)

    async def _slow_creation(self, session_id: str) -> None:
        """The second step of a two-step creation: ACTIVE a while after CREATING was
        committed (before the 202 went out)."""
        await asyncio.sleep(self.faults.slow_creation)
        await self.pool.execute("UPDATE sessions SET state = 'ACTIVE' WHERE id = $1", session_id)
        self._touched(session_id)

    async def get(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        asked = request.query.get("include_deleted", "").lower() in ("true", "1")
        include_deleted = asked and not self.faults.on("ignore_include_deleted")
        found = await self.lifecycle.get_session(session_id, include_deleted)
        if not found.found or found.session is None or found.session.state == "CREATING":
            return self._missed(session_id, asked)
        lagging = self.faults.on("lagging_replica")
        written = self._written.get(session_id)
        if lagging and written and asyncio.get_running_loop().time() - written < self.faults.lag:
            return self._missed(session_id, asked)
        if session_id in self._lost and found.session.state in LIVE_STATES:
            return self._missed(session_id, asked)
        return web.json_response(_json(found.session))

    def _missed(self, session_id: str, include_deleted: bool) -> web.Response:
        """A lookup's 404, logged as the story's service logs it."""
        if self.miss_log is not None:
            line = {
                "timestamp": datetime.now(UTC).isoformat(),
                "level": "warning",
                "event_type": "questdb_data_provider.session_not_found",
                "data": {"session_id": session_id, "include_deleted": include_deleted},
            }
            self.miss_log.write(json.dumps(line) + "\n")
        return _not_found(session_id)

    async def list(self, request: web.Request) -> web.Response:
        include_deleted = request.query.get("include_deleted", "").lower() in ("true", "1")
        sessions = await self.lifecycle.list_sessions(include_deleted, limit=100)
        return web.json_response([_json(s) for s in sessions])

    async def delete(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        response = await self._move(session_id, self.lifecycle.soft_delete)
        if response.status == 200 and self.faults.strikes("hard_deletes", self.faults.purge_share):
            async with self.pool.acquire() as conn:  # an operator cleaning up by hand
                await conn.execute("DELETE FROM sessions WHERE id = $1", session_id)
        return response

    async def act(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        moves = {
            "pause": self.lifecycle.pause,
            "resume": self.lifecycle.resume,
            "stop": self.lifecycle.stop,
            "restore": self.lifecycle.restore,
            "archive": self.lifecycle.archive,
        }
        move = moves.get(request.match_info["action"])
        if move is None:
            raise web.HTTPNotFound()
        return await self._move(session_id, move)

    async def _move(self, session_id: str, move: Any) -> web.Response:
        try:
            session: Session = await move(session_id)
        except SessionNotFound:
            return _not_found(session_id)
        except IllegalTransition as exc:
            return web.json_response({"id": session_id, "error": str(exc)}, status=409)
        self._touched(session_id)
        return web.json_response(_json(session))


async def _half_way(conn: asyncpg.Connection, session_id: str) -> None:
    raise RuntimeError("storage quota exceeded while provisioning")


def _not_found(session_id: str) -> web.Response:
    return web.json_response({"error": "session_not_found", "id": session_id}, status=404)


def _json(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "state": session.state.value,
        "created_at": session.created_at.isoformat(),
        "deleted_at": session.deleted_at.isoformat() if session.deleted_at else None,
    }


__all__ = ["FAULTS", "Faults", "ReferenceService", "SessionState", "new_session_id"]


def main() -> None:
    """Run the reference service alone: `python -m session_lens.reference`.

    Environment: SESSION_LENS_DATABASE_URL (migrated), REFERENCE_LISTEN
    (host:port, default 127.0.0.1:8000), REFERENCE_FAULTS (comma-separated, default
    all; empty for none), REFERENCE_MISS_LOG (a file its misses are logged to, as JSON
    lines; default none).
    """
    import os

    from .config import parse_address

    url = os.environ["SESSION_LENS_DATABASE_URL"]
    listen = parse_address(os.environ.get("REFERENCE_LISTEN", "127.0.0.1:8000"))
    named = os.environ.get("REFERENCE_FAULTS", ",".join(FAULTS))
    faults = Faults(enabled=frozenset(f.strip() for f in named.split(",") if f.strip()))

    named_log = os.environ.get("REFERENCE_MISS_LOG")
    miss_log = open(named_log, "a", buffering=1) if named_log else None  # noqa: SIM115

    async def app() -> web.Application:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=8)
        application = ReferenceService(pool, faults, miss_log).app()

        async def close_pool(_: web.Application) -> None:
            await pool.close()
            if miss_log is not None:
                miss_log.close()

        application.on_cleanup.append(close_pool)
        return application

    web.run_app(app(), host=listen.host, port=listen.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
