"""The lane: pipelining, chunked and HEAD requests mid-connection, slow heads, caps, retries."""

import asyncio

from aiohttp import web

from .conftest import MakeProxy, Upstream, parse_response, read_head
from .test_proxy import request_bytes


async def _read_responses(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """`count` responses with Content-Length bodies, each as raw bytes."""
    responses = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        responses.append(head + await reader.readexactly(length))
    return responses


async def test_pipelined_requests_are_answered_in_order(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("GET /a HTTP/1.1", "Host: h")
        + request_bytes("POST /b HTTP/1.1", "Host: h", "Content-Length: 5", body=b"hello")
        + request_bytes("GET /c HTTP/1.1", "Host: h")
    )
    answers = [parse_response(r).json() for r in await _read_responses(reader, 3)]
    writer.close()
    assert [a["path"] for a in answers] == ["/a", "/b", "/c"]
    assert [(s.method, s.raw_path, s.body) for s in upstream.seen] == [
        ("GET", "/a", b""),
        ("POST", "/b", b"hello"),
        ("GET", "/c", b""),
    ]


async def test_chunked_and_head_requests_mid_way_keep_the_connection(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /fast HTTP/1.1", "Host: h"))
    [first] = await _read_responses(reader, 1)
    # Chunked, then HEAD: the same lane serves them and what comes after.
    writer.write(
        request_bytes("POST /chunked HTTP/1.1", "Host: h", "Transfer-Encoding: chunked")
        + b"5\r\nhello\r\n0\r\n\r\n"
        + request_bytes("HEAD /head HTTP/1.1", "Host: h")
        + request_bytes("GET /after HTTP/1.1", "Host: h")
    )
    [second] = await _read_responses(reader, 1)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    [fourth] = await _read_responses(reader, 1)
    writer.close()
    assert parse_response(first).json()["path"] == "/fast"
    assert parse_response(second).json()["path"] == "/chunked"
    assert parse_response(head).status == 200
    assert parse_response(fourth).json()["path"] == "/after"
    assert [(s.method, s.raw_path, s.body) for s in upstream.seen] == [
        ("GET", "/fast", b""),
        ("POST", "/chunked", b"hello"),
        ("HEAD", "/head", b""),
        ("GET", "/after", b""),
    ]


async def test_a_request_head_too_slow_to_arrive_gets_408(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, header_read_timeout="0.3s")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /slowloris HTTP/1.1\r\nHost: h\r\n")  # and then nothing
    received = await asyncio.wait_for(reader.read(), 5)  # the hop closes the connection
    writer.close()
    response = parse_response(received)
    assert response.status == 408
    assert response.header("Connection") == ["close"]
    assert upstream.seen == []


async def test_connections_over_the_limit_get_503(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, max_connections=2)
    held = []
    for path in ("/one", "/two"):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(request_bytes(f"GET {path} HTTP/1.1", "Host: h"))
        await _read_responses(reader, 1)
        held.append(writer)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    response = parse_response(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert response.status == 503
    assert response.header("Retry-After") == ["1"]
    held.pop().close()
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /three HTTP/1.1", "Host: h", "Connection: close"))
    assert parse_response(await asyncio.wait_for(reader.read(), 5)).status == 200
    writer.close()
    for other in held:
        other.close()


async def test_a_kept_alive_connection_closed_upstream_is_retried_when_idempotent(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    connections = 0

    async def once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)  # the next request on this connection: closed unanswered
        writer.close()

    proxy = await make_proxy(await raw_upstream(once_per_connection))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for path in ("/first", "/second"):  # the second meets the closed connection, then a new one
        writer.write(request_bytes(f"GET {path} HTTP/1.1", "Host: h"))
        [answer] = await _read_responses(reader, 1)
        assert parse_response(answer).status == 200
    # A POST is not sent twice: the upstream may have acted on it.
    writer.write(request_bytes("POST /third HTTP/1.1", "Host: h", "Content-Length: 0"))
    [answer] = await _read_responses(reader, 1)
    writer.close()
    assert parse_response(answer).status == 502
    assert connections == 2


async def test_a_body_less_post_gains_no_content_length(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("POST /empty HTTP/1.1", "Host: h", "X-Custom-Case: Kept"))
    [answer] = await _read_responses(reader, 1)
    writer.close()
    assert parse_response(answer).status == 200
    [seen] = upstream.seen
    assert seen.header("Content-Length") == []
    assert ("X-Custom-Case", "Kept") in seen.headers


async def test_a_client_leaving_takes_a_reused_upstream_request_along(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    abandoned = asyncio.Event()

    async def slow_or_quick(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                abandoned.set()
                raise
        return web.json_response({"path": request.path})

    upstream.respond = slow_or_quick
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /warm HTTP/1.1", "Host: h"))
    await _read_responses(reader, 1)  # the upstream connection is pooled now
    writer.write(request_bytes("GET /slow HTTP/1.1", "Host: h"))  # sent on it at once
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.wait_for(abandoned.wait(), 5)
    await asyncio.sleep(0.05)
    assert proxy.metric("session_lens_inflight_requests") == 0
    writer2_reader, writer2 = await asyncio.open_connection(proxy.host, proxy.port)
    writer2.write(request_bytes("GET /after HTTP/1.1", "Host: h", "Connection: close"))
    assert parse_response(await asyncio.wait_for(writer2_reader.read(), 5)).status == 200
    writer2.close()


async def test_early_hints_are_relayed_as_they_come_but_not_to_http_1_0(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    hinted = asyncio.Event()

    async def hinting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_head(reader)
            except asyncio.IncompleteReadError:
                writer.close()
                return
            writer.write(hints)
            await writer.drain()
            await asyncio.wait_for(hinted.wait(), 5)  # the final answer waits for the client
            hinted.clear()
            writer.write(final)
            await writer.drain()

    proxy = await make_proxy(await raw_upstream(hinting))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /page HTTP/1.1", "Host: h", "X-Request-ID: r"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == hints
    hinted.set()
    [answer] = await _read_responses(reader, 1)
    writer.close()
    assert parse_response(answer).status == 200
    # HTTP/1.0 has no interim answers (RFC 9110 §15.2): the client sees only the final one.
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /page HTTP/1.0", "X-Request-ID: r"))
    await asyncio.sleep(0.2)
    hinted.set()
    received = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"103" not in received.split(b"\r\n")[0]
    assert parse_response(received).body == b"ok"
