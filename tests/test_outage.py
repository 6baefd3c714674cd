"""The outage test: lifecycle traffic through PostgreSQL stopping and a SIGKILL, nothing lost.

Sessions go through create, pause, resume, stop and delete; PostgreSQL is stopped
for part of the run and session-lens is killed with SIGKILL once. Afterwards every
confirmed event is in the audit trail exactly once, in each session's order, and
no client request failed.
"""

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from session_lens.embedded import start_embedded
from session_lens.migrations import migrate
from session_lens.schema import Tables

from .conftest import Upstream, free_port, wait_until_healthy

SESSIONS = int(os.environ.get("SESSION_LENS_OUTAGE_SESSIONS", "2000"))
ACTIONS = ("create", "pause", "resume", "stop", "delete")
EXPECTED = [
    "(none)>ACTIVE",
    "ACTIVE>PAUSED",
    "PAUSED>ACTIVE",
    "ACTIVE>STOPPED",
    "STOPPED>DELETED",
]


async def service(request: web.Request) -> web.StreamResponse:
    parts = request.path.strip("/").split("/")
    if request.method == "POST" and len(parts) == 2:
        return web.json_response({"id": json.loads(await request.read())["id"]}, status=201)
    return web.json_response({"id": parts[2]})


class Lens:
    """`session-lens serve` in observed mode, as a process that can be killed and restarted."""

    def __init__(self, upstream: str, database: str, spool: Path) -> None:
        self.port, self.admin = free_port(), free_port()
        self.args = [
            sys.executable, "-m", "session_lens", "serve", "--upstream", upstream,
            "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
            "--database-url", database, "--lifecycle-source", "observed",
            "--spool-dir", str(spool), "--log-level", "warning",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(self.args, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        await wait_until_healthy(self.admin, self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def spooled(self) -> float:
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{self.admin}/metrics") as response,
        ):
            for line in (await response.text()).splitlines():
                if line.startswith("session_lens_spooled_events "):
                    return float(line.split()[1])
        raise AssertionError("no spooled_events metric")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


async def test_nothing_is_lost_through_a_database_outage_and_a_kill(
    upstream: Upstream, tmp_path: Path
) -> None:
    if os.environ.get("SESSION_LENS_TEST_DATABASE_URL"):
        pytest.skip("needs a PostgreSQL of its own to stop and start")
    database = start_embedded(tmp_path, delete_on_exit=True)
    url = database.url
    setup = await asyncpg.connect(url)
    await migrate(setup, Tables())
    await setup.close()

    upstream.respond = service
    upstream.read_body = False
    lens = Lens(upstream.url, url, tmp_path / "spool")
    await lens.start()

    total = SESSIONS * len(ACTIONS)
    done = 0
    in_flight = 0
    gate = asyncio.Event()
    gate.set()
    latencies: dict[str, list[float]] = {"before": [], "outage": [], "after": []}
    phase = "before"
    failures: list[str] = []
    milestones: dict[int, Callable[[], Awaitable[None]]] = {}

    async def stop_database() -> None:
        nonlocal phase
        await asyncio.to_thread(database.stop)
        phase = "outage"

    async def kill_and_restart() -> None:
        gate.clear()
        while in_flight:  # noqa: ASYNC110 - a counter, not something to await
            await asyncio.sleep(0.01)
        lens.kill()
        await lens.start()
        gate.set()

    async def start_database() -> None:
        nonlocal phase
        await asyncio.to_thread(database.start)
        phase = "after"

    milestones[total // 5] = stop_database
    milestones[total // 2] = kill_and_restart
    milestones[total * 3 // 4] = start_database
    pending_milestones: list[asyncio.Task[None]] = []

    async def session_worker(queue: asyncio.Queue[int], client: aiohttp.ClientSession) -> None:
        nonlocal done, in_flight
        while not queue.empty():
            n = queue.get_nowait()
            session_id = f"exec_20251230_020944_{n:08x}"
            for action in ACTIONS:
                await gate.wait()
                method, path, body = _request(session_id, action)
                in_flight += 1
                started = time.perf_counter()
                try:
                    async with client.request(
                        method, f"http://127.0.0.1:{lens.port}{path}", json=body
                    ) as response:
                        await response.read()
                        if response.status >= 300:
                            failures.append(f"{method} {path}: {response.status}")
                except aiohttp.ClientError as exc:
                    failures.append(f"{method} {path}: {exc!r}")
                finally:
                    in_flight -= 1
                latencies[phase].append(time.perf_counter() - started)
                done += 1
                if done in milestones:
                    pending_milestones.append(asyncio.create_task(milestones.pop(done)()))

    try:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(SESSIONS):
            queue.put_nowait(n)
        async with aiohttp.ClientSession() as client:
            await asyncio.gather(*(session_worker(queue, client) for _ in range(16)))
        await asyncio.gather(*pending_milestones)
        assert failures == []
        assert done == total

        deadline = time.monotonic() + 60
        while await lens.spooled() > 0:
            assert time.monotonic() < deadline, "the spool did not drain"
            await asyncio.sleep(0.2)

        check = await asyncpg.connect(url)
        try:
            assert await check.fetchval("SELECT count(*) FROM session_lens_events") == total
            trails = await check.fetch(
                "SELECT session_id, array_agg(coalesce(old_state, '(none)') || '>' ||"
                " coalesce(new_state, '(none)') ORDER BY id) AS moves"
                " FROM session_audit GROUP BY session_id"
            )
        finally:
            await check.close()
        assert len(trails) == SESSIONS
        wrong = [row["session_id"] for row in trails if row["moves"] != EXPECTED]
        assert wrong == []
    finally:
        lens.stop()

    report = {name: _summary(values) for name, values in latencies.items()}
    print(f"\noutage test: {total} lifecycle requests, latency by phase: {report}")
    assert max(max(values) for values in latencies.values() if values) < 2.0


def _request(session_id: str, action: str) -> tuple[str, str, Any]:
    if action == "create":
        return "POST", "/api/sessions", {"id": session_id}
    if action == "delete":
        return "DELETE", f"/api/sessions/{session_id}", None
    return "POST", f"/api/sessions/{session_id}/{action}", None


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"n={len(values)} p50={statistics.median(ordered) * 1000:.1f}ms p99={p99 * 1000:.1f}ms"
