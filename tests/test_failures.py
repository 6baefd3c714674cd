"""Upstream failures become 502 or 504 with a problem document, never a traceback."""

import asyncio
import json
import logging
import socket
import struct

import pytest
from aiohttp import web

from .conftest import VALID_ID, MakeProxy, Upstream, free_port, raw_exchange, read_head

GET = (
    b"GET /api/sessions/" + VALID_ID.encode() + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_refused_is_502(make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await make_proxy(f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.INFO, logger="session_lens"):
        response = await raw_exchange(proxy.port, GET)
    assert response.status == 502
    assert response.header("Content-Type") == ["application/problem+json"]
    body = response.json()
    assert body["upstream_error"] == "connect"
    assert body["request_id"] == response.header("X-Request-ID")[0]
    assert proxy.metric("session_lens_upstream_errors_total", kind="connect") == 1
    assert proxy.metric("session_lens_requests_total", kind="lookup", code="5xx") == 1
    assert (
        proxy.metric(
            "session_lens_lookups_total",
            route="/api/sessions/{session_id}",
            outcome="upstream_error",
        )
        == 1
    )
    [line] = [r for r in caplog.records if r.getMessage() == "upstream error"]
    assert line.request_id == body["request_id"]  # type: ignore[attr-defined]
    assert line.upstream_error == "connect"  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]
    no_tracebacks(caplog)


async def test_reset_before_answer_is_502(
    raw_upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    proxy = await make_proxy(await raw_upstream(reset))
    response = await raw_exchange(proxy.port, GET)
    assert response.status == 502
    assert response.json()["upstream_error"] == "reset"
    no_tracebacks(caplog)


async def test_reset_mid_headers_is_502(
    raw_upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async def half_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(half_head))
    response = await raw_exchange(proxy.port, GET)
    assert response.status == 502
    assert response.json()["upstream_error"] == "reset"
    no_tracebacks(caplog)


async def test_malformed_response_is_502(
    raw_upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(garbage))
    response = await raw_exchange(proxy.port, GET)
    assert response.status == 502
    assert response.json()["upstream_error"] == "protocol"
    no_tracebacks(caplog)


async def test_slow_headers_are_504(
    raw_upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await release.wait()
        writer.close()

    proxy = await make_proxy(await raw_upstream(silent), upstream_read_timeout="200ms")
    try:
        response = await raw_exchange(proxy.port, GET)
    finally:
        release.set()
    assert response.status == 504
    assert response.json()["upstream_error"] == "timeout"
    assert proxy.metric("session_lens_upstream_errors_total", kind="timeout") == 1
    no_tracebacks(caplog)


async def test_body_cut_mid_stream_cuts_the_client_too(
    raw_upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(short_body))
    response = await raw_exchange(proxy.port, GET)
    assert response.status == 200
    assert response.header("Content-Length") == ["1000"]
    assert len(response.body) < 1000  # the client can tell the body is incomplete
    assert proxy.metric("session_lens_upstream_errors_total", kind="protocol") == 1
    no_tracebacks(caplog)


async def test_slow_body_is_cut_at_read_timeout(
    raw_upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await release.wait()
        writer.close()

    proxy = await make_proxy(await raw_upstream(stalls), upstream_read_timeout="200ms")
    try:
        response = await raw_exchange(proxy.port, GET)
    finally:
        release.set()
    assert response.status == 200
    assert response.body.startswith(b"5\r\nhello\r\n")
    assert not response.body.endswith(b"0\r\n\r\n")  # no clean end: the cut shows
    assert proxy.metric("session_lens_upstream_errors_total", kind="timeout") == 1
    no_tracebacks(caplog)


async def test_non_idempotent_requests_are_not_retried(raw_upstream, make_proxy: MakeProxy) -> None:
    attempts = 0

    async def drops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await read_head(reader)
        writer.close()

    proxy = await make_proxy(await raw_upstream(drops))
    response = await raw_exchange(
        proxy.port,
        b"POST /api/sessions HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
    )
    assert response.status == 502
    assert attempts == 1
    assert json.loads(response.body)["upstream_error"] == "reset"


def open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def test_faults_leak_no_connections_or_tasks(raw_upstream, make_proxy: MakeProxy) -> None:
    async def misbehaves(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if b"/reset" in head:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if b"/cut" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        elif b"/garbage" in head:
            writer.write(b"not http at all\r\n\r\n")
        else:  # half-close: a body delimited by the end of the connection
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(misbehaves))
    await raw_exchange(proxy.port, GET)  # warm up: pools, first connections
    await asyncio.sleep(0.1)
    fds, tasks = open_fds(), len(asyncio.all_tasks())
    statuses = []
    for _ in range(25):
        for path in ("/reset", "/cut", "/garbage", "/eof"):
            request = f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
            response = await raw_exchange(proxy.port, request)
            statuses.append((path, response.status, response.content[:12]))
    await asyncio.sleep(0.2)
    assert set(statuses) == {
        ("/reset", 502, statuses[0][2]),
        ("/cut", 200, b"short"),
        ("/garbage", 502, statuses[2][2]),
        ("/eof", 200, b"until the en"),
    }
    assert open_fds() <= fds + 2, "file descriptors leaked"
    assert len(asyncio.all_tasks()) <= tasks, "tasks leaked"


async def test_the_upstreams_own_5xx_are_counted_apart_from_ours(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """A 503 the upstream sends is its own; a 502 session-lens makes is not."""

    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "try later"}, status=503)

    upstream.respond = unavailable
    proxy = await make_proxy(upstream.url)
    assert (await raw_exchange(proxy.port, GET)).status == 503
    passthrough = (
        b"POST /api/other HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert (await raw_exchange(proxy.port, passthrough)).status == 503
    down = await make_proxy(f"http://127.0.0.1:{free_port()}")
    assert (await raw_exchange(down.port, GET)).status == 502

    for kind in ("lookup", "passthrough"):
        assert proxy.metric("session_lens_upstream_responses_total", kind=kind, code="5xx") == 1
        assert proxy.metric("session_lens_requests_total", kind=kind, code="5xx") == 1
    assert down.metric("session_lens_requests_total", kind="lookup", code="5xx") == 1
    assert down.metric("session_lens_upstream_responses_total", kind="lookup", code="5xx") == 0
