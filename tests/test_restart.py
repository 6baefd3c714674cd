"""Readiness and rolling restarts: /readyz says 200 only when the proxy port serves,
and a new process taking over the port from an old one loses no request.
"""

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import ProxyUnderTest, Upstream, free_port, parse_response, wait_until_healthy
from .test_cli import CLI

MODES = [pytest.param((), id="single"), pytest.param(("--workers", "2"), id="workers")]


@asynccontextmanager
async def lens(
    upstream: str, db: str, port: int, *args: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """`session-lens serve` on `port`, with an admin port of its own."""
    admin = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [
            *CLI, "serve", "--upstream", upstream, "--database-url", db,
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--log-level", "warning", *args,
        ],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield process, admin
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def ready(client: aiohttp.ClientSession, admin: int) -> dict[str, Any] | None:
    """/readyz's body when it says 200, else None (not ready, or not answering yet)."""
    try:
        async with client.get(f"http://127.0.0.1:{admin}/readyz") as response:
            body: dict[str, Any] = await response.json()
            return body if response.status == 200 else None
    except aiohttp.ClientConnectionError:
        return None


async def until_ready(admin: int, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client:
        deadline = time.monotonic() + 20
        while (body := await ready(client, admin)) is None:
            assert process.poll() is None, "session-lens exited"
            assert time.monotonic() < deadline, "session-lens did not get ready"
            await asyncio.sleep(0.02)
        return body


async def _get(port: int) -> int:
    """One request on a connection of its own."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client,
        client.get(f"http://127.0.0.1:{port}/ping") as response,
    ):
        await response.read()
        return response.status


@pytest.mark.parametrize("args", MODES)
async def test_ready_only_once_the_proxy_port_serves(
    upstream: Upstream, db: str, args: tuple[str, ...]
) -> None:
    port = free_port()
    async with lens(upstream.url, db, port, *args) as (process, admin):
        body = await until_ready(admin, process)
        # At once, as a load balancer would: many connections, none refused.
        assert await asyncio.gather(*(_get(port) for _ in range(40))) == [200] * 40
        if args:
            assert body["checks"]["workers"] == "ok"
            assert body["workers"] == {"listening": 2, "of": 2}


async def test_connections_queued_when_the_listener_closes_are_served(
    proxy: ProxyUnderTest,
) -> None:
    # Connected while the loop does not run: they wait in the kernel's accept queue,
    # as connections do in an old process's when a rolling restart stops it.
    queued = [socket.create_connection((proxy.host, proxy.port)) for _ in range(20)]
    assert proxy.runner is not None
    [site] = proxy.runner.sites
    await site.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port)).close()

    async def ask(sock: socket.socket) -> int:
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /queued HTTP/1.1\r\nHost: lens\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return parse_response(answer).status

    assert await asyncio.gather(*(ask(sock) for sock in queued)) == [200] * 20


class Traffic:
    """Requests sent without pause, on new connections and on kept-alive ones, until stopped."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.answered = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for n in range(4):
            self._tasks.append(asyncio.create_task(self._send(n, keep_alive=False)))
            self._tasks.append(asyncio.create_task(self._send(n, keep_alive=True)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _send(self, n: int, keep_alive: bool) -> None:
        # POST on kept-alive connections: aiohttp sends it once, never again on a new
        # connection, so a connection closed under a request shows as a failure.
        connector = aiohttp.TCPConnector(force_close=not keep_alive, limit=1)
        async with aiohttp.ClientSession(connector=connector) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                method = "POST" if keep_alive else "GET"
                path = f"/traffic/{n}/{keep_alive}/{i}"
                try:
                    async with client.request(method, self.url + path, data=b"x") as response:
                        body = await response.json()
                        if response.status != 200 or body != {"path": path}:
                            self.failures.append(f"{method} {path}: {response.status} {body}")
                        else:
                            self.answered += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures.append(f"{method} {path}: {exc!r}")


async def _requests_served(admin: int) -> float:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{admin}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("session_lens_requests_total{")
    )


@pytest.mark.parametrize("args", MODES)
async def test_a_rolling_restart_loses_no_request(
    upstream: Upstream, db: str, args: tuple[str, ...]
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"path": request.path})

    upstream.respond = echo
    upstream.read_body = False
    port = free_port()
    traffic = Traffic(port)
    async with lens(upstream.url, db, port, *args) as (old, old_admin):
        await until_ready(old_admin, old)
        traffic.start()
        try:
            await asyncio.sleep(0.5)
            async with lens(upstream.url, db, port, *args) as (new, new_admin):
                await until_ready(new_admin, new)
                before = traffic.answered
                old.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(old.wait, 20) == 0
                during = traffic.answered - before
                await asyncio.sleep(0.5)
                await traffic.stop()
                assert traffic.failures == []
                assert during > 0
                assert await _requests_served(new_admin) > 0
                await wait_until_healthy(new_admin, new)
        finally:
            await traffic.stop()
    print(f"\nrolling restart {args}: {traffic.answered} requests, none lost")
