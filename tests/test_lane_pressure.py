"""The lane under pressure: answers before bodies, clients leaving anywhere, slow uploads,
HTTP/1.0 framing, drains, transfer codings and the body of a rewritten miss."""

import asyncio
import contextlib
import logging
import socket

import pytest
from aiohttp import web

from session_lens.app import LANE

from .conftest import MakeProxy, Upstream, parse_response, read_head
from .test_proxy import request_bytes

END = b"\r\n\r\n"


async def read_one(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """One response framed by Content-Length (or none), raw."""
    head = await asyncio.wait_for(reader.readuntil(END), timeout)
    lengths = [
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    if not lengths:
        return head
    return head + await asyncio.wait_for(reader.readexactly(lengths[0]), timeout)


# --- 1. bodies of requests answered here stay counted as read ahead --------------------


async def test_bodies_of_requests_answered_here_do_not_stall_the_connection(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """GET lookups with a malformed ID and a body are answered here (404); their bodies,
    already read, must not stay counted as read ahead, or reading pauses for good."""
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    body = b"x" * 60_000
    statuses = []
    try:
        for _ in range(6):
            writer.write(
                request_bytes(
                    "GET /api/sessions/not-an-id HTTP/1.1",
                    "Host: h",
                    f"Content-Length: {len(body)}",
                    body=body,
                )
            )
            await writer.drain()
            statuses.append(parse_response(await read_one(reader, 3)).status)
        writer.write(request_bytes("GET /after HTTP/1.1", "Host: h"))
        statuses.append(parse_response(await read_one(reader, 3)).status)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        statuses.append(type(exc).__name__)  # type: ignore[arg-type]
    finally:
        writer.close()
    assert statuses == [404] * 6 + [200]


# --- 2. an upstream connection owed the rest of a request body goes back to the pool -----


async def test_a_client_leaving_mid_answer_does_not_pool_an_upstream_owed_body_bytes(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """The client leaves while its answer is held back (it does not read) and the
    upstream's answer is whole, but the request body is not: the upstream connection
    still expects body bytes and must not serve the next request."""
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_head(reader)
                heads.append(head.split(b"\r\n")[0])
                if head.startswith(b"POST"):
                    # Answered at once, body read after: as any server that replies early.
                    body = b"b" * 300_000
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                    writer.write(body[:200_000])
                    await writer.drain()
                    await asyncio.sleep(0.3)  # the proxy is held back by its client by now
                    writer.write(body[200_000:])
                    await writer.drain()
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    bodies.append(await reader.readexactly(length))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    proxy = await make_proxy(await raw_upstream(early), upstream_read_timeout="1s")
    assert proxy.runner is not None
    lane = proxy.runner.app[LANE]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (proxy.host, proxy.port))
    _, writer = await asyncio.open_connection(sock=sock)
    for _ in range(50):  # a slow link: small kernel buffers on the proxy's side too
        if lane.connections:
            break
        await asyncio.sleep(0.01)
    [conn] = lane.connections
    conn._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.write(request_bytes("POST /upload HTTP/1.1", "Host: h", "Content-Length: 1000"))
    writer.write(b"0123456789")  # 10 of the 1000 bytes
    await writer.drain()
    # Wait until the answer is whole upstream and held back by the client not reading.
    for _ in range(100):
        await asyncio.sleep(0.02)
        conns = list(lane.connections)
        active = conns[0]._active if conns else None
        held = active is not None and active.upstream is not None
        if held and active.upstream.complete and conns[0].out.blocked:
            break
    else:
        c = conns[0] if conns else None
        u = c._active.upstream if c and c._active else None
        writer.transport.abort()
        pytest.fail(
            f"state not reached: {c and c.out.blocked} {u and (u.complete, u.buffered)}"
            f" {c and c._transport.get_write_buffer_size()}"
        )
    writer.transport.abort()  # the client goes away
    await asyncio.sleep(0.2)
    reader2, writer2 = await asyncio.open_connection(proxy.host, proxy.port)
    writer2.write(request_bytes("GET /after HTTP/1.1", "Host: h"))
    try:
        answer = parse_response(await read_one(reader2, 3))
    finally:
        writer2.close()
    assert answer.status == 200, answer
    assert b"GET /after HTTP/1.1" in heads
    assert b"GET /after" not in b"".join(bodies), "the next request became the body of the last"


# --- 3. a connection closed after an answer whose head said nothing of it ---------------


async def test_an_answer_before_the_whole_body_says_the_connection_closes(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """The upstream answers a POST before its body is all sent (an early 401, say): the
    connection closes after it, and the answer says so (RFC 9112 §9.6), or a client
    reusing the connection would lose its next request."""

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    proxy = await make_proxy(await raw_upstream(early))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("POST /upload HTTP/1.1", "Host: h", "Content-Length: 100000"))
    writer.write(b"x" * 1000)
    await writer.drain()
    answer = parse_response(await read_one(reader))
    await asyncio.sleep(0.2)
    closed = reader.at_eof() or writer.transport.is_closing()
    if not closed:
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
    writer.close()
    assert answer.status == 401
    if closed:
        assert answer.header("Connection") == ["close"], answer.headers


async def test_a_malformed_lookup_answered_before_its_body_says_the_connection_closes(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """The same for an answer of the lane's own: a GET lookup with a malformed ID whose
    body has not all arrived gets its 404 with `Connection: close`, then the close."""
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("GET /api/sessions/not-an-id HTTP/1.1", "Host: h", "Content-Length: 10")
        + b"01234"
    )
    await writer.drain()
    answer = parse_response(await read_one(reader))
    rest = await asyncio.wait_for(reader.read(), 2)  # b"" at the close
    writer.close()
    assert answer.status == 404
    assert rest == b""
    assert answer.header("Connection") == ["close"], answer.headers


# --- 4. HTTP/1.0 clients never get Transfer-Encoding -----------------------------------


async def test_a_head_from_an_http_1_0_client_gets_no_transfer_encoding(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """RFC 9112 §6.1: a server MUST NOT send Transfer-Encoding in a response unless the
    request was HTTP/1.1 or later, also to a HEAD whose upstream answer was chunked."""

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(chunked))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("HEAD /x HTTP/1.0", "Host: h"))
    head = await asyncio.wait_for(reader.readuntil(END), 5)
    writer.close()
    answer = parse_response(head)
    assert answer.status == 200
    assert answer.header("Transfer-Encoding") == [], head


# --- 5. upstream_read_timeout counts from the request's end, not its head -------------


async def test_an_upload_slower_than_the_read_timeout_is_not_a_504(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """`upstream_read_timeout` runs from the end of the request: a body that takes longer
    than it to arrive (each piece in time) is no 504, the upstream was waiting for it."""
    proxy = await make_proxy(upstream.url, upstream_read_timeout="1s")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("POST /upload HTTP/1.1", "Host: h", "Content-Length: 30"))
    for _ in range(3):
        writer.write(b"0123456789")
        await writer.drain()
        await asyncio.sleep(0.6)  # 1.8 s in all: the body trickles, well within limits
    answer = parse_response(await read_one(reader))
    writer.close()
    assert answer.status == 200, answer.body
    assert [(s.method, len(s.body)) for s in upstream.seen] == [("POST", 30)]


# --- 6. a miss whose body is cut counts one lookup twice -------------------------------


async def test_a_miss_cut_short_counts_its_lookup_once(raw_upstream, make_proxy: MakeProxy) -> None:
    """A miss whose body fails while it is read to be merged is counted once: `not_found`,
    not `upstream_error` as well."""

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"error":'
        )
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(cut))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("GET /api/sessions/exec_20251230_020944_4ad060d9 HTTP/1.1", "Host: h")
    )
    try:
        answer = parse_response(await read_one(reader))
    finally:
        writer.close()
    assert answer.status == 502
    route = "/api/sessions/{session_id}"
    outcomes = {
        outcome: proxy.metric("session_lens_lookups_total", route=route, outcome=outcome)
        for outcome in ("found", "not_found", "invalid", "upstream_error", "other")
    }
    assert sum(outcomes.values()) == 1, outcomes


# --- 7. draining closes at once after an answer that promised to keep the connection --


async def test_draining_does_not_cut_a_connection_right_after_a_kept_alive_answer(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """An answer whose head went out before shutdown began said nothing of closing: the
    connection is not cut when it ends, so the client's next request comes (within
    DRAIN_IDLE) and is answered with `Connection: close`."""

    async def streamed(request: web.Request) -> web.StreamResponse:
        if request.path != "/stream":
            return web.json_response({"path": request.path})
        response = web.StreamResponse()
        response.content_length = 10
        await response.prepare(request)
        await response.write(b"01234")
        await asyncio.sleep(0.5)
        await response.write(b"56789")
        return response

    upstream.respond = streamed
    proxy = await make_proxy(upstream.url, shutdown_grace="3s")
    assert proxy.runner is not None
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /stream HTTP/1.1", "Host: h"))
    head = await asyncio.wait_for(reader.readuntil(END), 5)
    assert b"connection: close" not in head.lower()
    stopping = asyncio.create_task(proxy.runner.cleanup())  # shutdown begins mid-answer
    await asyncio.wait_for(reader.readexactly(10), 5)
    writer.write(request_bytes("POST /next HTTP/1.1", "Host: h", "Content-Length: 2", body=b"hi"))
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError as exc:
        data = type(exc).__name__.encode()
    writer.close()
    await stopping
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert b"connection: close" in data.lower()


# --- 8. observed mode: a confirmed creation is lost when the client leaves mid-body ------


async def test_a_confirmed_creation_is_recorded_though_the_client_left_mid_body(
    upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    """The upstream answered 201 to POST /api/sessions (the default route: the ID is in
    the answer's body) and the client leaves before the body is whole: the creation the
    upstream confirmed is still recorded, the rest of the body read for its ID."""
    import asyncpg

    from .test_observed import SID, settled, timeline

    async def created(request: web.Request) -> web.StreamResponse:
        await request.read()
        body = b'{"id": "%s", "padding": "%s"}' % (SID.encode(), b"p" * 100)
        response = web.StreamResponse(status=201)
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:20])
        await asyncio.sleep(0.5)
        await response.write(body[20:])
        return response

    upstream.respond = created
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("POST /api/sessions HTTP/1.1", "Host: h", "Content-Length: 2", body=b"{}")
    )
    head = await asyncio.wait_for(reader.readuntil(END), 5)
    assert head.startswith(b"HTTP/1.1 201 ")
    writer.transport.abort()  # gone before the body is whole
    await asyncio.sleep(1.0)
    await settled(proxy)
    conn = await asyncpg.connect(db)
    try:
        assert await timeline(conn, SID) == [(None, "ACTIVE", "observed")]
    finally:
        await conn.close()


# --- 9. a WebSocket upgrade in absolute form ------------------------------------------


WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


async def test_a_websocket_upgrade_in_absolute_form_reaches_the_upstream(
    upstream: Upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A WebSocket upgrade in absolute form (RFC 9112 §3.2.2) reaches the upstream with
    its path, as any other request does."""

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    upstream.respond = echo
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"GET http://edge.test/ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        + WS_KEY
        + b"\r\n\r\n"
    )
    with caplog.at_level(logging.INFO):
        try:
            head = await asyncio.wait_for(reader.readuntil(END), 5)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert [s.raw_path for s in upstream.seen] == ["/ws"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# --- 10. a close-delimited answer cut by a reset is relayed as whole -------------------


async def test_a_close_delimited_answer_cut_by_a_reset_is_not_relayed_as_whole(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """An answer without a length ends with the connection; a reset (not a FIN) means it
    was cut, so the client's connection is cut too, never ended with a clean last chunk."""
    import struct

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart of it")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    proxy = await make_proxy(await raw_upstream(reset))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /stream HTTP/1.1", "Host: h"))
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 3):
            received += chunk
            if received.endswith(b"\r\n0\r\n\r\n"):
                break
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    assert b"Transfer-Encoding: chunked" in received, received
    assert not received.endswith(b"0\r\n\r\n"), "a reset body was ended as if whole"


# --- 11. the lane's own answers to an HTTP/1.0 keep-alive client -----------------------


async def test_an_own_answer_to_an_http_1_0_keep_alive_client_says_keep_alive(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """An HTTP/1.0 client asking for keep-alive gets `Connection: keep-alive` on the lane's
    own answers too: without it, it takes the answer as the connection's last."""
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("GET /api/sessions/not-an-id HTTP/1.0", "Host: h", "Connection: keep-alive")
    )
    answer = parse_response(await read_one(reader))
    writer.write(request_bytes("GET /next HTTP/1.0", "Host: h", "Connection: keep-alive"))
    second = parse_response(await read_one(reader))
    writer.close()
    assert answer.status == 404
    assert second.status == 200  # the connection was kept: so the first answer must say so
    assert "keep-alive" in ",".join(answer.header("Connection")).lower(), answer.headers


# --- 12. codings the lane drops while the bytes keep them ------------------------------


async def test_a_request_transfer_coding_other_than_chunked_is_not_silently_dropped(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """`Transfer-Encoding: gzip, chunked` is refused with 501 (RFC 9112 §6.1), never
    relayed as plain chunked with gzip bytes passing for the content."""
    import gzip

    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(record))
    packed = gzip.compress(b"hello")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("POST /up HTTP/1.1", "Host: h", "Transfer-Encoding: gzip, chunked")
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed)
    )
    data = await read_one(reader)
    writer.close()
    status = parse_response(data).status
    if status == 501:
        return  # refused: fine
    [head] = seen
    codings = [
        line.split(b":", 1)[1].strip().lower()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"transfer-encoding:")
    ]
    assert codings == [b"gzip, chunked"], head


async def test_a_problem_document_for_a_gzipped_miss_is_not_labelled_gzip(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """not_found_body=problem replaces the body of a miss with plain JSON: the upstream's
    `Content-Encoding: gzip` goes with its body."""
    import gzip

    packed = gzip.compress(b'{"error": "session_not_found"}')

    async def miss(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(packed), packed)
        )
        await writer.drain()
        writer.close()

    proxy = await make_proxy(await raw_upstream(miss), not_found_body="problem")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes("GET /api/sessions/exec_20251230_020944_4ad060d9 HTTP/1.1", "Host: h")
    )
    answer = parse_response(await read_one(reader))
    writer.close()
    assert answer.status == 404
    assert answer.body.startswith(b"{")  # plain JSON
    assert answer.header("Content-Encoding") == [], answer.headers


# --- guard (passes): clients vanishing at every point leave nothing behind -------------


async def test_clients_leaving_anywhere_leave_no_request_in_flight(
    upstream: Upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that abort at random points (mid-head, mid-body,
    waiting for the upstream, mid-answer, pipelined) leave the in-flight gauge at 0,
    no lane connection and no relay task behind, and log no traceback."""
    import random

    async def varied(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/slow"):
            await asyncio.sleep(0.05)
        if request.path.startswith("/big"):
            return web.Response(body=b"z" * 600_000)
        return web.json_response({"path": request.path})

    upstream.respond = varied
    proxy = await make_proxy(upstream.url)
    assert proxy.runner is not None
    lane = proxy.runner.app[LANE]
    rng = random.Random(7)
    shapes = [
        request_bytes("GET /slow HTTP/1.1", "Host: h"),
        request_bytes("GET /big HTTP/1.1", "Host: h"),
        request_bytes("HEAD /big HTTP/1.1", "Host: h"),
        request_bytes("POST /slow HTTP/1.1", "Host: h", "Content-Length: 50000") + b"p" * 50000,
        request_bytes("POST /c HTTP/1.1", "Host: h", "Transfer-Encoding: chunked")
        + b"5\r\nhello\r\n0\r\n\r\n",
        request_bytes("GET /api/sessions/exec_20251230_020944_4ad060d9 HTTP/1.1", "Host: h"),
        request_bytes("GET /api/sessions/bad HTTP/1.1", "Host: h"),
    ]

    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        data = b"".join(rng.choice(shapes) for _ in range(rng.randint(1, 4)))
        cut = rng.randint(1, len(data))
        writer.write(data[:cut])
        await asyncio.sleep(rng.choice([0, 0.001, 0.01, 0.03, 0.06]))
        if rng.random() < 0.5:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(rng.randint(1, 100_000)), 0.05)
        writer.transport.abort()

    with caplog.at_level(logging.INFO):
        for batch in range(10):
            await asyncio.gather(*(one(batch * 20 + n) for n in range(20)))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not lane.connections and proxy.metric("session_lens_inflight_requests") == 0:
                break
    assert proxy.metric("session_lens_inflight_requests") == 0
    assert not lane.connections
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_request_body_silent_for_the_read_timeout_gets_408(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """A body may trickle, but not stop: silent for `upstream_read_timeout`, it gets a 408
    and the connection closes, the upstream request with it."""
    proxy = await make_proxy(upstream.url, upstream_read_timeout="1s")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("POST /upload HTTP/1.1", "Host: h", "Content-Length: 10") + b"01234")
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 5)  # and then nothing: the hop closes
    writer.close()
    answer = parse_response(received)
    assert answer.status == 408
    assert answer.header("Connection") == ["close"]
    assert upstream.seen == []  # the upstream never had a whole request
    assert proxy.metric("session_lens_inflight_requests") == 0
