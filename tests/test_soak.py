"""The soak: mixed traffic through `session-lens serve`, every answer compared with the direct one.

    SESSION_LENS_SOAK_REQUESTS=200000 .venv/bin/pytest tests/test_soak.py -s

CI runs a shorter count (the default below); docs/reliability.md has the full run.
"""

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web

from .conftest import Upstream, free_port

REQUESTS = int(os.environ.get("SESSION_LENS_SOAK_REQUESTS", "3000"))
DECLARED = {"date", "server", "x-request-id", "x-session-not-found-reason"}
"""Headers session-lens may add or change; everything else must match the direct answer."""


async def service(request: web.Request) -> web.StreamResponse:
    path = request.path
    if path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data[::-1])
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(hashlib.sha256(message.data).digest())
        return ws
    if path.startswith("/upload"):
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})
    if path.startswith("/download/"):
        size = int(path.rsplit("/", 1)[1])
        return web.Response(body=bytes(i % 251 for i in range(size)))
    if path.startswith("/api/sessions/"):
        session_id = path.split("/")[3]
        if request.method in ("GET", "HEAD"):
            found = int(hashlib.sha256(session_id.encode()).hexdigest(), 16) % 2 == 0
            if found:
                return web.json_response({"id": session_id, "state": "ACTIVE"})
            return web.json_response({"error": "session_not_found"}, status=404)
        return web.json_response({"id": session_id, "done": request.method})
    return web.json_response({"path": path, "query": dict(request.query)})


async def chunked(n: int) -> AsyncIterator[bytes]:
    """One to five chunks of 1 B to 180 kB; aiohttp sends an async generator chunked."""
    for i in range(n // 20 % 5 + 1):
        yield bytes([(n + i) % 256]) * ((n // 20 + i) % 7 * 30_000 + 1)


def plan(n: int) -> tuple[str, str, bytes | AsyncIterator[bytes] | None]:
    kind = n % 10
    sid = f"exec_20251230_020944_{n:08x}"
    if kind in (0, 1):
        return "GET", f"/api/sessions/{sid}", None  # hits and misses
    if kind == 2:
        return "HEAD", f"/api/sessions/{sid}", None  # hits and misses, without a body
    if kind == 3:
        return "GET", f"/api/sessions/exec_{n}", None  # invalid IDs
    if kind == 4:
        return "POST", f"/api/sessions/{sid}/pause", b""
    if kind == 5:
        return "DELETE", f"/api/sessions/{sid}", None
    if kind == 6 and n // 10 % 2:
        return "POST", "/upload/chunked", chunked(n)
    if kind == 6:
        return "POST", "/upload", bytes(n % 256 for _ in range(256 * 1024))
    if kind == 7:
        return "GET", f"/download/{(n % 7) * 100_000 + 1}", None
    if kind == 8:
        return "WS", "/ws", None
    return "GET", f"/other/{n}?x={n}&y=%2F", None


async def send(client: aiohttp.ClientSession, base: str, n: int) -> tuple[object, ...]:
    method, path, body = plan(n)
    if method == "WS":
        async with client.ws_connect(base + path) as ws:
            await ws.send_str(f"message {n}")
            text = (await ws.receive()).data
            await ws.send_bytes(n.to_bytes(8, "big"))
            digest = (await ws.receive()).data
            await ws.close(code=4000 + n % 100)
            return ("WS", text, digest, ws.close_code)
    async with client.request(method, base + path, data=body) as response:
        payload = await response.read()
        headers = sorted(
            (k.lower(), v) for k, v in response.headers.items() if k.lower() not in DECLARED
        )
        if n % 10 == 3:
            # Answered by session-lens itself: it must say why, not what the upstream says.
            return (
                method,
                path,
                response.status,
                response.headers.get("X-Session-Not-Found-Reason"),
            )
        return (method, path, response.status, payload, headers)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_soak_loses_and_alters_nothing(upstream: Upstream, db: str, tmp_path: Path) -> None:
    upstream.respond = service
    upstream.read_body = False
    port, admin = free_port(), free_port()
    lens = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-m", "session_lens", "serve", "--upstream", upstream.url,
         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--database-url", db, "--not-found-body", "passthrough", "--log-level", "warning"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    proxied = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(200):
                try:
                    async with client.get(f"http://127.0.0.1:{admin}/healthz"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            differences: list[tuple[object, ...]] = []
            counter = iter(range(REQUESTS))
            samples: dict[str, int] = {}

            async def worker() -> None:
                for n in counter:
                    if n == REQUESTS // 5:
                        samples.update(rss=rss_kib(lens.pid), fds=fds(lens.pid))
                    direct = await send(client, upstream.url, n)
                    through = await send(client, proxied, n)
                    if n % 10 == 3:
                        if through[3] != "invalid_format":
                            differences.append((n, through))
                    elif direct != through:
                        differences.append((n, direct, through))

            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(16)))
            elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)  # let keep-alive connections settle
        growth_mib = (rss_kib(lens.pid) - samples["rss"]) / 1024
        fd_growth = fds(lens.pid) - samples["fds"]
        print(f"\nsoak: {REQUESTS} requests each way in {elapsed:.1f}s, rss growth after warm-up"
              f" {growth_mib:.1f} MiB, fd growth {fd_growth}")  # fmt: skip
        assert differences == []
        assert growth_mib < 32
        assert fd_growth <= 4
    finally:
        lens.terminate()
        _, err = lens.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode()[-3000:]
