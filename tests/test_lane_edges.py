"""The lane at its edges: framing tricks, pipelining pressure, retries, timeouts, caps."""

import asyncio
import os
import shutil
import time

import pytest
from aiohttp import web

from session_lens.app import LANE

from .conftest import MakeProxy, Upstream, free_port, parse_response, read_head
from .test_cli import CLI
from .test_proxy import request_bytes


async def _read_one(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """One response with a Content-Length body, as raw bytes."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lengths = [
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    assert len(lengths) == 1, head
    return head + await asyncio.wait_for(reader.readexactly(lengths[0]), timeout)


async def test_connection_naming_content_length_cannot_smuggle_a_request(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """A Connection header naming Content-Length cannot turn a body into a second request."""
    proxy = await make_proxy(upstream.url)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes(
            "POST /a HTTP/1.1",
            "Host: h",
            "Connection: content-length",
            f"Content-Length: {len(smuggled)}",
            body=smuggled,
        )
    )
    await _read_one(reader)
    await asyncio.sleep(0.3)
    writer.close()
    assert [(s.method, s.raw_path, s.body) for s in upstream.seen] == [("POST", "/a", smuggled)]


async def test_an_upstream_answer_naming_content_length_in_connection_keeps_its_framing(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """An answer whose Connection names Content-Length still reaches the client framed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        await reader.read()
        writer.close()

    proxy = await make_proxy(await raw_upstream(answer))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /a HTTP/1.1", "Host: h"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    response = parse_response(head)
    framed = response.header("Content-Length") or response.header("Transfer-Encoding")
    assert framed or response.header("Connection") == ["close"], head


async def test_a_read_timeout_on_a_reused_connection_is_not_retried(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """A silent upstream is a 504 after one read timeout: only resets are retried."""
    requests: list[bytes] = []

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            requests.append(head.split(b"\r\n")[0])
            if len(requests) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            # everything after the first request: silence

    proxy = await make_proxy(await raw_upstream(first_only), upstream_read_timeout="0.5s")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /first HTTP/1.1", "Host: h"))
    await _read_one(reader)
    started = time.monotonic()
    writer.write(request_bytes("GET /slow HTTP/1.1", "Host: h"))
    answer = parse_response(await _read_one(reader))
    elapsed = time.monotonic() - started
    writer.close()
    assert answer.status == 504
    assert requests == [b"GET /first HTTP/1.1", b"GET /slow HTTP/1.1"]
    assert elapsed < 0.9


async def test_pipelined_large_bodies_do_not_stall_with_reading_paused(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """Pipelined requests with large bodies are all answered: reading resumes for a body due."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.json_response({"path": request.path})

    upstream.respond = slow
    proxy = await make_proxy(upstream.url, header_read_timeout="2s")
    body = b"x" * 60000

    def post(path: str) -> bytes:
        return request_bytes(
            f"POST {path} HTTP/1.1", "Host: h", f"Content-Length: {len(body)}", body=body
        )

    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(post("/1"))
    await writer.drain()
    await asyncio.sleep(0.1)  # /1 is upstream, being answered slowly
    third = post("/3")
    writer.write(post("/2") + third[:30000])  # 90 KB buffered: the lane pauses reading
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(third[30000:])
    await writer.drain()
    statuses: list[int | str] = []
    try:
        for _ in range(3):
            statuses.append(parse_response(await _read_one(reader, 4)).status)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
        statuses.append(type(exc).__name__)
    writer.close()
    assert statuses == [200, 200, 200]
    assert [(s.raw_path, len(s.body)) for s in upstream.seen] == [
        ("/1", 60000),
        ("/2", 60000),
        ("/3", 60000),
    ]


async def test_a_slow_request_body_is_not_a_slow_head(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """`header_read_timeout` limits the head; a body may take its time."""
    proxy = await make_proxy(upstream.url, header_read_timeout="0.5s")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("POST /upload HTTP/1.1", "Host: h", "Content-Length: 10"))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"01234")
    await writer.drain()
    await asyncio.sleep(1.6)  # the head was whole long ago; the body trickles
    writer.write(b"56789")
    await writer.drain()
    answer = parse_response(await _read_one(reader))
    writer.close()
    assert answer.status == 200
    assert [(s.method, s.body) for s in upstream.seen] == [("POST", b"0123456789")]


async def test_bytes_after_a_whole_answer_do_not_join_it(
    raw_upstream, make_proxy: MakeProxy
) -> None:
    """Bytes an upstream sends after a whole answer never become part of it."""

    async def answer_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-First: 1\r\n\r\nok"
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nX-Second: 2\r\n\r\nstray"
        )
        await writer.drain()
        await reader.read()
        writer.close()

    proxy = await make_proxy(await raw_upstream(answer_twice))
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /a HTTP/1.1", "Host: h"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    response = parse_response(head)
    assert response.status == 200, head
    assert response.header("Content-Length") == ["2"], head
    assert response.header("X-Second") == [], head


async def test_max_connections_holds_for_a_burst_of_connections(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """The connection cap holds for connections accepted in one burst."""
    proxy = await make_proxy(upstream.url, max_connections=2)
    opened = await asyncio.gather(
        *(asyncio.open_connection(proxy.host, proxy.port) for _ in range(20))
    )
    await asyncio.sleep(0.3)
    refused = 0
    for reader, writer in opened:
        try:
            data = await asyncio.wait_for(reader.read(200), 0.2)
        except TimeoutError:
            data = b""
        refused += data.startswith(b"HTTP/1.1 503")
        writer.close()
    assert refused == 18


async def test_pipelined_answers_respect_the_clients_backpressure(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """A client that pipelines and never reads stops being read: memory stays flat."""
    proxy = await make_proxy(upstream.url)
    assert proxy.runner is not None
    lane = proxy.runner.app[LANE]  # looked at, not driven
    assert lane is not None
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    one = request_bytes("GET /api/sessions/not-an-id HTTP/1.1", "Host: h")
    batch = one * 1000
    buffered = 0
    for _ in range(60):  # about 3 MB of requests, about 25 MB of answers
        writer.write(batch)
        try:
            await asyncio.wait_for(writer.drain(), 1)
        except TimeoutError:
            break  # the hop stopped reading: backpressure works
        [connection] = lane.connections
        buffered = connection._transport.get_write_buffer_size()
    writer.transport.abort()
    assert buffered < 1 << 20, f"{buffered} bytes of answers held in the hop's memory"


async def test_a_request_naming_host_in_connection_still_reaches_the_upstream_with_a_host(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """A Connection header naming Host cannot strip the Host the upstream needs."""
    proxy = await make_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request_bytes("GET /a HTTP/1.1", "Host: h", "Connection: host"))
    answer = parse_response(await _read_one(reader))
    writer.close()
    assert answer.status == 200
    [seen] = upstream.seen
    assert seen.header("Host") != []


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs unshare (root)"
)
async def test_workers_start_when_the_supervisor_is_pid_1() -> None:
    """Workers start when the supervisor is PID 1, as a container's entrypoint is."""
    port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        "unshare",
        "--pid",
        "--kill-child",
        "--mount-proc",
        *CLI,
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--database-url",
        "postgresql://nobody@127.0.0.1:9/none",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        "--workers",
        "2",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        exited = await asyncio.wait_for(process.wait(), 4)
    except TimeoutError:
        exited = None
    finally:
        if process.returncode is None:
            process.kill()  # unshare --kill-child takes the namespace with it
            await process.wait()
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    assert exited is None, stderr
    assert "worker died" not in stderr, stderr


async def test_include_deleted_is_read_from_the_query_alike_for_get_and_head(
    upstream: Upstream, make_proxy: MakeProxy, db: str, conn
) -> None:
    """`include_deleted` is read from the query the same way for GET and HEAD (blank values too)."""
    sid = "exec_20251230_020944_4ad060d9"
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')", sid)
    await conn.execute("UPDATE sessions SET state = 'DELETED' WHERE id = $1", sid)

    async def not_found(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "session_not_found"}, status=404)

    upstream.respond = not_found
    proxy = await make_proxy(upstream.url, database_url=db)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        request_bytes(
            f"GET /api/sessions/{sid}?include_deleted=&include_deleted=true HTTP/1.1", "Host: h"
        )
    )
    answer = parse_response(await _read_one(reader))
    # The same lookup as HEAD.
    writer.write(
        request_bytes(
            f"HEAD /api/sessions/{sid}?include_deleted=&include_deleted=true HTTP/1.1", "Host: h"
        )
    )
    head_answer = parse_response(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
    writer.close()
    assert answer.status == head_answer.status == 404
    assert head_answer.header("X-Session-Not-Found-Reason") == ["deleted"]
    assert answer.header("X-Session-Not-Found-Reason") == ["deleted"]
