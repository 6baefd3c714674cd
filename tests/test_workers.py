"""`--workers N`: processes sharing the proxy port, metrics adding up, a dead worker replaced."""

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import VALID_ID, Upstream, parents
from tests.test_cli import serving


def _workers_of(pid: int) -> set[int]:
    """The spawned worker processes of `pid` (the resource tracker left out)."""
    return {
        child
        for child, parent in parents().items()
        if parent == pid and b"spawn_main" in _cmdline(child)
    }


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def _workers(pid: int, count: int) -> set[int]:
    """The supervisor's worker processes, once `count` of them run."""
    for _ in range(200):
        workers = _workers_of(pid)
        if len(workers) == count:
            return workers
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} workers did not start")


async def _get(url: str) -> int:
    """One request on a connection of its own, so the kernel picks a worker each time."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client,
        client.get(url) as response,
    ):
        await response.read()
        return response.status


async def _metric(admin_port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name)
    )


async def _until_serving(url: str) -> None:
    for _ in range(200):
        try:
            await _get(url)
            return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("the workers do not answer")


async def test_two_workers_share_the_port_and_add_up_their_metrics(
    upstream: Upstream, db: str
) -> None:
    peers: set[tuple[str, int]] = set()

    async def note_peer(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.json_response({"id": VALID_ID})

    upstream.respond = note_peer
    async with serving(upstream.url, db, "--workers", "2") as served:
        workers = await _workers(served.process.pid, 2)
        lookup = f"{served.url}/api/sessions/{VALID_ID}"
        await _until_serving(lookup)
        await asyncio.sleep(0.5)  # both workers listening
        peers.clear()
        before = await _metric(served.admin_port, 'session_lens_requests_total{code="2xx"')
        statuses = [await _get(lookup) for _ in range(60)]
        assert statuses == [200] * 60
        # Each worker keeps one pooled upstream connection for sequential requests:
        # two peers upstream means both workers took connections.
        assert len(peers) == 2
        after = await _metric(served.admin_port, 'session_lens_requests_total{code="2xx"')
        assert after - before == 60  # one /metrics, both workers' counts

        # The limit the README states: counted, but no exemplar crosses the processes.
        assert await _get(f"{served.url}/api/sessions/exec_2025") == 404
        async with (
            aiohttp.ClientSession() as client,
            client.get(
                f"http://127.0.0.1:{served.admin_port}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            ) as response,
        ):
            scraped = await response.text()
        assert 'rule="pattern"} 1.0\n' in scraped
        assert " # {" not in scraped

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        replaced = await _workers(served.process.pid, 2)
        assert victim not in replaced
        await asyncio.sleep(0.5)
        assert [await _get(lookup) for _ in range(20)] == [200] * 20
        assert await _metric(served.admin_port, "session_lens_inflight_requests") == 0

        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(served.process.wait, 15) == 0
        assert not any(_alive(pid) for pid in replaced)
