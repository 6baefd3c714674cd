"""How the lane's connections end when the client is not where the hop is: an answer
before the whole request lingers until the client has read it, and a client that takes
nothing of its answers is cut after `send_timeout`."""

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web

from session_lens.app import LANE
from session_lens.lane import Lane

from .conftest import (
    MakeProxy,
    ProxyUnderTest,
    Upstream,
    need,
    parse_response,
    raw_exchange,
)

MIB = 1 << 20


def _lane(proxy: ProxyUnderTest) -> Lane:
    assert proxy.runner is not None
    return proxy.runner.app[LANE]


async def _until_closed(proxy: ProxyUnderTest, within: float) -> float:
    """Seconds until the lane holds no client connection; fails after `within`."""
    started = time.monotonic()
    while _lane(proxy).connections:
        assert time.monotonic() - started < within, "the connection is still open"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _send_while_reading(port: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
    """Send `head`, then `body` as fast as the hop takes it, while reading what comes.

    What was read until the hop's end of the connection, and whether reading ended in
    a clean end (rather than a reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(head)
        with memoryview(body) as view:
            for start in range(0, len(body), 256 * 1024):
                writer.write(view[start : start + 256 * 1024])
                await writer.drain()

    sending = asyncio.create_task(send())
    received = b""
    clean = True
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            received += chunk
    except ConnectionResetError:
        clean = False
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    return received, clean


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_gets_its_413_read_not_a_reset(
    upstream: Upstream, make_proxy: MakeProxy, chunked: bool
) -> None:
    proxy = await make_proxy(upstream.url, max_body_bytes="1MiB", lingering_timeout="2s")
    body = b"x" * (10 * MIB)
    if chunked:
        head = b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(
            b"10000\r\n" + body[i : i + 0x10000] + b"\r\n" for i in range(0, len(body), 0x10000)
        )
    else:
        head = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
    started = time.monotonic()
    received, clean = await _send_while_reading(proxy.port, head, body)
    response = parse_response(received)
    assert response.status == 413
    assert len(response.body) == int(response.header("Content-Length")[0])
    assert response.json()["detail"] == "the request body is larger than 1048576 bytes"
    assert clean, "the client got a reset"
    await _until_closed(proxy, within=2 + 1.5 - (time.monotonic() - started))


async def test_a_client_still_sending_after_the_linger_is_cut(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """Lingering is bounded: a client that goes on sending is closed after the timeout."""
    proxy = await make_proxy(upstream.url, max_body_bytes="64KiB", lingering_timeout="1s")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 100000000\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")

    async def trickle() -> None:
        while True:
            writer.write(b"y" * 1000)
            await writer.drain()
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        assert await _until_closed(proxy, within=2.5) >= 0.5
    finally:
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
        writer.close()


async def test_curl_uploading_too_much_reads_the_413(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = await make_proxy(upstream.url, max_body_bytes="1MiB")
    big = tmp_path / "big"
    big.write_bytes(b"z" * (10 * MIB))
    for expect in ("Expect:", "Expect: 100-continue"):  # at once, and waiting for 100
        process = await asyncio.create_subprocess_exec(
            need("curl", "curl"), "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
            "-H", expect, "-T", str(big), f"{proxy.url}/upload",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        assert (process.returncode, out) == (0, b"413"), expect
    assert upstream.seen == []


# --- send_timeout: a client that takes nothing of its answers --------------------------


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_client_that_never_reads_is_cut_after_the_send_timeout(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    released = asyncio.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 1 << 30
        await response.prepare(request)
        chunk = b"b" * (256 * 1024)
        try:
            for _ in range((1 << 30) // len(chunk)):
                await response.write(chunk)
        except (ConnectionError, asyncio.CancelledError):
            released.set()  # the hop let its upstream connection go
            raise
        return response

    upstream.respond = huge
    proxy = await make_proxy(upstream.url, send_timeout="1s")
    before = _rss()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    await asyncio.get_running_loop().sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n" * 4)
    try:
        await _until_closed(proxy, within=6)
        await asyncio.wait_for(released.wait(), 5)
        assert _rss() - before < 64 * MIB  # nothing like the 1 GiB answer was held
        assert proxy.metric("session_lens_inflight_requests") == 0
        assert proxy.metric("session_lens_requests_total", kind="passthrough", code="2xx") == 1
        # What it gets, when it reads at last, is a cut answer: never all of it.
        received = 0
        try:
            while chunk := await asyncio.get_running_loop().sock_recv(sock, 1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 1 << 30
    finally:
        sock.close()


async def test_a_slow_reader_that_keeps_reading_is_not_cut(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    size = 8 * MIB

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"s" * size)

    upstream.respond = large
    proxy = await make_proxy(upstream.url, send_timeout="1s")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
    writer.write(b"GET /large HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    received = 0
    started = time.monotonic()
    while chunk := await reader.read(size // 10):  # about a tenth every 0.3 s: 3 s in all
        received += len(chunk)
        await asyncio.sleep(0.3 * len(chunk) / (size // 10))
    writer.close()
    assert time.monotonic() - started > 2
    head = received - size
    assert 0 < head < 1000, "the answer was cut"


async def test_a_reader_slower_than_the_kernel_buffers_is_not_cut(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """Progress is what the client acknowledges, not only what leaves the hop's own
    buffer: the kernel takes more only in bursts, seconds apart for a slow reader."""

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 256 * MIB
        await response.prepare(request)
        chunk = b"h" * (256 * 1024)
        for _ in range(1024):
            await response.write(chunk)
        return response

    upstream.respond = huge
    proxy = await make_proxy(upstream.url, send_timeout="3s")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /huge HTTP/1.1\r\nHost: h\r\n\r\n")
    received = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < 9:  # about 160 KB/s, for three send timeouts
            chunk = await reader.read(16 * 1024)
            assert chunk, f"cut after {received} bytes"
            received += len(chunk)
            await asyncio.sleep(0.1)
        assert _lane(proxy).connections
    finally:
        writer.close()


# --- what the attacks on the lane found ------------------------------------------------


async def test_request_trailers_never_reach_another_clients_request(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """aiohttp's server takes a request's trailers for fields of the next request on
    its connection: the upstream connection is not pooled after trailers."""
    proxy = await make_proxy(upstream.url)
    attacker = await raw_exchange(
        proxy.port,
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n0\r\nCookie: session=ATTACKER\r\n\r\n",
    )
    victim = await raw_exchange(
        proxy.port,
        b"GET /victim HTTP/1.1\r\nHost: x\r\nCookie: session=VICTIM\r\nConnection: close\r\n\r\n",
    )
    assert (attacker.status, victim.status) == (200, 200)
    seen = upstream.seen[-1]
    assert seen.raw_path == "/victim"
    assert seen.header("Cookie") == ["session=VICTIM"]


async def test_a_thousand_pipelined_upgrade_requests_in_one_read_are_all_answered(
    upstream: Upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(upstream.url)
    burst = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n" * 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(burst + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 1001
    assert len(upstream.seen) == 1001
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_malformed_body_after_an_upgrade_head_gets_one_400_and_lingers(
    upstream: Upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(upstream.url, lingering_timeout="1s")
    response, clean = await _send_while_reading(
        proxy.port,
        b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"ZZZ\r\n",
    )
    assert response.count(b"HTTP/1.1 ") == 1
    assert parse_response(response).status == 400
    assert clean
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
