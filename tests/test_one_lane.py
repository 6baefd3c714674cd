"""One lane for all HTTP/1.x: every request gets the same timeouts, limits and bytes as sent.

The former known limits (HEAD, chunked and large bodies, trailers, `OPTIONS *`, HTTP/1.0,
header case and Latin-1 bytes, 304s with a length, https upstreams) are each compared with
what the upstream itself wrote or received, on raw sockets.
"""

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme
from aiohttp import web

from .conftest import (
    MakeProxy,
    ProxyUnderTest,
    RawHandler,
    RawResponse,
    Seen,
    Upstream,
    parse_response,
    read_head,
)
from .test_failures import no_tracebacks
from .test_proxy import request_bytes

RawUpstream = Callable[[RawHandler], Awaitable[str]]

CRLF = b"\r\n"
END_OF_HEAD = b"\r\n\r\n"
UNKNOWN_ID = "exec_20251230_020944_0a1b2c3d"
DATE = b"Date: Tue, 01 Dec 2026 00:00:00 GMT"
SLOW_HEAD = b"GET /next HTTP/1.1\r\nHost: h\r\n"
"""The start of a head whose end never comes."""
MIB = 1 << 20
OVER_THE_LIMIT = 70_000
"""Past `max_body_bytes="64KiB"`, the smallest limit the setting accepts."""


# --- messages as they cross the wire ------------------------------------------------


def head_lines(head: bytes) -> list[bytes]:
    """The start line and the field lines of a head, without the blank line."""
    return head.removesuffix(END_OF_HEAD).split(CRLF)


def field_name(line: bytes) -> bytes:
    return line.partition(b":")[0].strip().lower()


def field_values(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.partition(b":")[2].strip() for line in head_lines(head)[1:] if field_name(line) == name
    ]


def is_chunked(head: bytes) -> bool:
    return b"chunked" in b",".join(field_values(head, b"transfer-encoding")).lower()


@dataclass
class Wire:
    """One message as it crossed the wire: its head, then its body with any chunk framing."""

    head: bytes
    body: bytes

    @property
    def lines(self) -> list[bytes]:
        return head_lines(self.head)

    @property
    def response(self) -> RawResponse:
        return parse_response(self.head + self.body)


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body as sent: sizes, data, the last chunk and the trailer section."""
    raw = b""
    while True:
        size_line = await reader.readuntil(CRLF)
        raw += size_line
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        raw += await reader.readexactly(size + 2)
    while True:
        line = await reader.readuntil(CRLF)
        raw += line
        if line == CRLF:
            return raw


def dechunk(raw: bytes) -> tuple[bytes, list[bytes]]:
    """The data and the trailer lines of a chunked body."""
    data, rest = b"", raw
    while True:
        size_line, _, rest = rest.partition(CRLF)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return data, [line for line in rest.split(CRLF) if line]
        data, rest = data + rest[:size], rest[size + 2 :]


async def read_body(reader: asyncio.StreamReader, head: bytes, until_close: bool) -> bytes:
    """A body framed by `head`; without framing, a response's runs to the close."""
    if is_chunked(head):
        return await read_chunked(reader)
    lengths = field_values(head, b"content-length")
    if lengths:
        return await reader.readexactly(int(lengths[0]))
    return await reader.read() if until_close else b""


async def read_response(
    reader: asyncio.StreamReader, head_request: bool = False, timeout: float = 5
) -> Wire:
    """One response, read exactly as far as its framing says."""

    async def read() -> Wire:
        head = await reader.readuntil(END_OF_HEAD)
        status = int(head.split(b" ", 2)[1])
        if head_request or status < 200 or status in (204, 304):
            return Wire(head, b"")
        return Wire(head, await read_body(reader, head, until_close=True))

    return await asyncio.wait_for(read(), timeout)


async def read_final(reader: asyncio.StreamReader) -> Wire:
    """The final response, past any interim (1xx) ones."""
    while True:
        answer = await read_response(reader)
        if answer.response.status >= 200:
            return answer


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connected(port: int) -> AsyncIterator[Connection]:
    """A client connection, closed whatever happens on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> Wire:
    """Send one request, read its answer (without a body when the request is a HEAD)."""
    writer.write(request)
    return await read_response(reader, head_request=request.startswith(b"HEAD "))


async def ask(port: int, request: bytes) -> Wire:
    """One request on a connection of its own."""
    async with connected(port) as (reader, writer):
        return await exchange(reader, writer, request)


LEAD = request_bytes("HEAD /lead HTTP/1.1", "Host: h", "X-Request-ID: fixed")
"""A first request that the old code handed, with its connection, to aiohttp."""


@pytest.fixture(params=[False, True], ids=["fresh", "after-a-head"])
def after_a_head(request: pytest.FixtureRequest) -> bool:
    """Whether the requests under test follow a HEAD on their connection."""
    return bool(request.param)


async def through(proxy: ProxyUnderTest, requests: list[bytes], after_a_head: bool) -> list[Wire]:
    """`requests` one after the other on one connection to the proxy, and their answers."""
    async with connected(proxy.port) as (reader, writer):
        if after_a_head:
            assert (await exchange(reader, writer, LEAD)).response.status == 200
        return [await exchange(reader, writer, request) for request in requests]


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def direct_and_proxied(
    upstream_url: str, proxy: ProxyUnderTest, request: bytes, after_a_head: bool
) -> tuple[Wire, Wire]:
    """The upstream's own answer to `request`, then the answer through the proxy."""
    direct = await ask(port_of(upstream_url), request)
    [proxied] = await through(proxy, [request], after_a_head)
    return direct, proxied


def without(head: bytes, drop: frozenset[bytes]) -> list[bytes]:
    """The start line and the field lines of `head`, but those named in `drop`."""
    lines = head_lines(head)
    return [lines[0], *(line for line in lines[1:] if field_name(line) not in drop)]


def assert_relayed(direct: Wire, proxied: Wire, added: frozenset[bytes] = frozenset()) -> None:
    """The proxied answer's status line and field lines are the upstream's, byte for byte.

    Only what a proxy adds or owns is left out: `Connection` and `Keep-Alive` (hop by
    hop), `Date` and `X-Request-ID` when the upstream sent none, and `added`.
    """
    upstream_names = {field_name(line) for line in direct.lines[1:]}
    absent = {name for name in (b"date", b"x-request-id") if name not in upstream_names}
    own = frozenset({b"connection", b"keep-alive", *added, *absent})
    assert without(proxied.head, own) == without(direct.head, own)


_FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
_HOP = frozenset({b"connection", b"keep-alive", b"te"})


def assert_forwarded_as_sent(sent: bytes, received: bytes) -> None:
    """The upstream got the request line and field lines the client sent, byte for byte.

    Only hop-by-hop fields and the `X-Forwarded-*` ones the proxy appends are left out.
    """
    sent_head = sent.partition(END_OF_HEAD)[0]
    assert without(received, _HOP | _FORWARDING) == without(sent_head, _HOP)


# --- upstreams ----------------------------------------------------------------------


@dataclass
class Received:
    """One request as a scripted upstream read it off the wire."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return head_lines(self.head)[0]


@dataclass
class Scripted:
    """A raw upstream that answers each request head with the exact bytes `answer` gives."""

    answer: Callable[[bytes], bytes]
    received: list[Received] = field(default_factory=list)

    @property
    def request_lines(self) -> list[bytes]:
        """The request lines received, the lead's left out."""
        lead = head_lines(LEAD)[0]
        return [r.request_line for r in self.received if r.request_line != lead]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_head(reader)
                body = await read_body(reader, head, until_close=False)
                self.received.append(Received(head, body))
                answer = self.answer(head)
                if head.startswith(b"HEAD "):  # the head of the answer a GET would get
                    answer = answer.partition(END_OF_HEAD)[0] + END_OF_HEAD
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def scripted(
    raw_upstream: RawUpstream, answer: Callable[[bytes], bytes]
) -> tuple[str, Scripted]:
    upstream = Scripted(answer)
    return await raw_upstream(upstream.handle), upstream


def always(response: bytes) -> Callable[[bytes], bytes]:
    return lambda head: response


def sized(
    status_line: bytes, *fields: bytes, body: bytes = b"", length: int | None = None
) -> bytes:
    """A response with a fixed Date and a Content-Length: the body's, or `length` given."""
    content_length = b"Content-Length: %d" % (len(body) if length is None else length)
    return CRLF.join([status_line, *fields, DATE, content_length]) + END_OF_HEAD + body


OK = sized(b"HTTP/1.1 200 OK", body=b"ok")


@dataclass
class TlsUpstream:
    """The recording upstream served over TLS, and the file of the CA that signed it."""

    recorder: Upstream
    url: str
    ca_file: Path


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[TlsUpstream]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    recorder = Upstream()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    recorder.url = f"https://127.0.0.1:{port}"
    yield TlsUpstream(recorder, recorder.url, ca_file)
    await runner.cleanup()


# --- header_read_timeout, whatever came before on the connection ----------------------


async def assert_slow_head_gets_408(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[Seen]
) -> None:
    """Half a head, then nothing: a 408 and a closed connection, nothing upstream."""
    writer.write(SLOW_HEAD)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 4)  # read() returns at the close
    response = parse_response(received)
    assert response.status == 408, received
    assert response.header("Connection") == ["close"]
    assert "/next" not in [s.raw_path for s in seen]


_PIPELINED = 20
FIRST_REQUESTS = {
    "head": (request_bytes("HEAD /first HTTP/1.1", "Host: h"), 1),
    "chunked-post": (
        request_bytes("POST /first HTTP/1.1", "Host: h", "Transfer-Encoding: chunked")
        + b"5\r\nhello\r\n0\r\n\r\n",
        1,
    ),
    "large-body": (
        request_bytes("POST /first HTTP/1.1", "Host: h", f"Content-Length: {MIB}", body=b"x" * MIB),
        1,
    ),
    "pipelined": (
        b"".join(request_bytes(f"GET /{n} HTTP/1.1", "Host: h") for n in range(_PIPELINED)),
        _PIPELINED,
    ),
}


@pytest.mark.parametrize("kind", FIRST_REQUESTS)
async def test_a_slow_head_after_any_request_gets_408(
    kind: str, upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, header_read_timeout="0.5s")
    first, answers = FIRST_REQUESTS[kind]
    async with connected(proxy.port) as (reader, writer):
        writer.write(first)
        statuses = [
            (await read_response(reader, head_request=first.startswith(b"HEAD "))).response.status
            for _ in range(answers)
        ]
        assert statuses == [200] * answers
        await assert_slow_head_gets_408(reader, writer, upstream.seen)
    assert len(upstream.seen) == answers


# --- https upstreams ------------------------------------------------------------------


async def test_an_https_upstream_signed_by_upstream_ca_file_is_relayed_and_slow_heads_get_408(
    tls_upstream: TlsUpstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(
        tls_upstream.url, upstream_ca_file=str(tls_upstream.ca_file), header_read_timeout="0.5s"
    )
    seen = tls_upstream.recorder.seen
    async with connected(proxy.port) as (reader, writer):
        got = await exchange(reader, writer, request_bytes("GET /plain HTTP/1.1", "Host: h"))
        posted = await exchange(
            reader,
            writer,
            request_bytes("POST /upload HTTP/1.1", "Host: h", "Transfer-Encoding: chunked")
            + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        assert (got.response.status, got.response.json().get("path")) == (200, "/plain")
        assert (posted.response.status, posted.response.json().get("path")) == (200, "/upload")
        assert [(s.method, s.raw_path, s.body) for s in seen] == [
            ("GET", "/plain", b""),
            ("POST", "/upload", b"hello world"),
        ]
        await assert_slow_head_gets_408(reader, writer, seen)


async def test_an_https_upstream_not_trusted_is_a_502_without_a_traceback(
    tls_upstream: TlsUpstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(tls_upstream.url)  # the system's CAs: trustme's is not one
    with caplog.at_level(logging.INFO, logger="session_lens"):
        answer = await ask(proxy.port, request_bytes("GET /secret HTTP/1.1", "Host: h"))
    response = answer.response
    assert response.status == 502
    assert response.header("Content-Type") == ["application/problem+json"]
    assert response.json()["upstream_error"] == "connect"  # the handshake failed
    assert tls_upstream.recorder.seen == []  # nothing went over the unverified connection
    no_tracebacks(caplog)


# --- the former known limits, byte for byte -------------------------------------------


@pytest.mark.parametrize(
    ("request_field", "response_field"),
    [(b"x-MiXeD-case: 1", b"x-UPSTREAM-Case: v"), (b"X-Latin: caf\xe9", b"X-Latin: caf\xe9")],
    ids=["case", "latin-1"],
)
async def test_header_bytes_pass_unchanged_both_ways(
    request_field: bytes,
    response_field: bytes,
    after_a_head: bool,
    raw_upstream: RawUpstream,
    make_proxy: MakeProxy,
) -> None:
    url, upstream = await scripted(
        raw_upstream, always(sized(b"HTTP/1.1 200 OK", response_field, body=b"ok"))
    )
    proxy = await make_proxy(url)
    sent = (
        b"GET /fields HTTP/1.1\r\nHost: h\r\n" + request_field + b"\r\nX-Request-ID: fixed\r\n\r\n"
    )
    direct, proxied = await direct_and_proxied(url, proxy, sent, after_a_head)
    assert response_field in proxied.lines
    assert_relayed(direct, proxied)
    assert proxied.body == b"ok"
    through_proxy = upstream.received[-1].head
    assert request_field in head_lines(through_proxy)
    assert_forwarded_as_sent(sent, through_proxy)


async def test_a_304_keeps_its_content_length_without_a_body_and_the_connection_goes_on(
    after_a_head: bool, raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    not_modified = sized(b"HTTP/1.1 304 Not Modified", b'ETag: "v1"', length=1234)

    def answer(head: bytes) -> bytes:
        return not_modified if head.startswith(b"GET /cached ") else OK

    url, upstream = await scripted(raw_upstream, answer)
    proxy = await make_proxy(url)
    cached = request_bytes(
        "GET /cached HTTP/1.1", "Host: h", 'If-None-Match: "v1"', "X-Request-ID: fixed"
    )
    direct = await ask(port_of(url), cached)
    after = request_bytes("GET /after HTTP/1.1", "Host: h", "X-Request-ID: fixed")
    proxied, next_answer = await through(proxy, [cached, after], after_a_head)
    assert proxied.response.status == 304
    assert proxied.response.header("Content-Length") == ["1234"]
    assert_relayed(direct, proxied)
    # Had the proxy sent or awaited 1234 body bytes, this answer would be garbled or late.
    assert (next_answer.response.status, next_answer.body) == (200, b"ok")
    assert upstream.request_lines == [
        b"GET /cached HTTP/1.1",
        b"GET /cached HTTP/1.1",
        b"GET /after HTTP/1.1",
    ]


async def test_a_body_less_post_reaches_the_upstream_with_no_framing_added(
    after_a_head: bool, raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    url, upstream = await scripted(raw_upstream, always(OK))
    proxy = await make_proxy(url)
    sent = request_bytes("POST /empty HTTP/1.1", "Host: h", "X-Request-ID: fixed")
    [answer] = await through(proxy, [sent], after_a_head)
    assert answer.response.status == 200
    received = upstream.received[-1].head
    assert field_values(received, b"content-length") == []
    assert field_values(received, b"transfer-encoding") == []
    assert_forwarded_as_sent(sent, received)


async def test_request_trailers_reach_the_upstream(
    after_a_head: bool, raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    url, upstream = await scripted(raw_upstream, always(OK))
    proxy = await make_proxy(url)
    signed = request_bytes(
        "POST /signed HTTP/1.1",
        "Host: h",
        "Transfer-Encoding: chunked",
        "Trailer: X-Checksum",
        "X-Request-ID: fixed",
        body=b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n",
    )
    [answer] = await through(proxy, [signed], after_a_head)
    assert answer.response.status == 200
    received = upstream.received[-1]
    assert is_chunked(received.head), received.head
    assert dechunk(received.body) == (b"hello world", [b"X-Checksum: abc"])


async def test_response_trailers_reach_an_http_1_1_client(
    after_a_head: bool, raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    url, _ = await scripted(
        raw_upstream,
        always(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
            + DATE
            + b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
        ),
    )
    proxy = await make_proxy(url)
    signed = request_bytes("GET /signed HTTP/1.1", "Host: h", "TE: trailers", "X-Request-ID: fixed")
    [answer] = await through(proxy, [signed], after_a_head)
    assert answer.response.status == 200
    assert is_chunked(answer.head), answer.head
    assert dechunk(answer.body) == (b"hello world", [b"X-Checksum: abc"])


async def test_options_asterisk_is_relayed_as_it_is(
    after_a_head: bool, raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    url, upstream = await scripted(
        raw_upstream, always(sized(b"HTTP/1.1 200 OK", b"Allow: GET, HEAD, OPTIONS"))
    )
    proxy = await make_proxy(url)
    sent = request_bytes("OPTIONS * HTTP/1.1", "Host: h", "X-Request-ID: fixed")
    direct, proxied = await direct_and_proxied(url, proxy, sent, after_a_head)
    assert_relayed(direct, proxied)
    assert upstream.request_lines == [b"OPTIONS * HTTP/1.1"] * 2
    assert_forwarded_as_sent(sent, upstream.received[-1].head)


async def test_a_head_lookup_miss_is_explained_and_its_length_kept_without_a_body(
    raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    def answer(head: bytes) -> bytes:
        return sized(b"HTTP/1.1 404 Not Found", length=20) if head.startswith(b"HEAD ") else OK

    url, upstream = await scripted(raw_upstream, answer)
    proxy = await make_proxy(url)
    lookup = request_bytes(
        f"HEAD /api/sessions/{UNKNOWN_ID} HTTP/1.1", "Host: h", "X-Request-ID: fixed"
    )
    direct = await ask(port_of(url), lookup)
    after = request_bytes("GET /after HTTP/1.1", "Host: h", "X-Request-ID: fixed")
    proxied, next_answer = await through(proxy, [lookup, after], after_a_head=False)
    response = proxied.response
    assert response.status == 404
    assert response.header("Content-Length") == ["20"]
    assert response.body == b""
    assert response.header("X-Session-Not-Found-Reason") == ["unknown"]  # no database set
    assert_relayed(direct, proxied, added=frozenset({b"x-session-not-found-reason"}))
    # Had the proxy awaited 20 body bytes, this answer would never have come.
    assert (next_answer.response.status, next_answer.body) == (200, b"ok")
    assert upstream.request_lines[1:] == [
        f"HEAD /api/sessions/{UNKNOWN_ID} HTTP/1.1".encode(),
        b"GET /after HTTP/1.1",
    ]


# --- HTTP/1.0 -------------------------------------------------------------------------


async def test_an_http_1_0_client_gets_a_chunked_answer_unchunked_up_to_the_close(
    raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> None:
    url, _ = await scripted(
        raw_upstream,
        always(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            + DATE
            + b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ),
    )
    proxy = await make_proxy(url)
    async with connected(proxy.port) as (reader, writer):
        writer.write(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0 needs no Host
        received = await asyncio.wait_for(reader.read(), 5)  # to the close, as 1.0 reads it
    response = parse_response(received)
    assert response.status == 200, received
    assert response.header("Transfer-Encoding") == []
    assert response.body == b"hello world"
    assert response.header("Content-Length") in ([], ["11"])


async def test_an_http_1_0_keep_alive_connection_serves_a_second_request(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    requests = [
        request_bytes(f"GET {path} HTTP/1.0", "Host: h", "Connection: keep-alive")
        for path in ("/one", "/two")
    ]
    answers = [wire.response for wire in await through(proxy, requests, after_a_head=False)]
    for answer in answers:
        # Without it in the answer, a 1.0 client takes the connection as closing.
        assert "keep-alive" in ",".join(answer.header("Connection")).lower()
        assert answer.header("Content-Length") != []
    assert [a.json()["path"] for a in answers] == ["/one", "/two"]
    assert [s.raw_path for s in upstream.seen] == ["/one", "/two"]


# --- client limits on every request ---------------------------------------------------


async def test_a_chunked_upload_past_max_body_bytes_is_413(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, max_body_bytes="64KiB")
    chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"z" * n) for n in (40_000, 30_000))
    answer = await ask(
        proxy.port,
        request_bytes("POST /chunked HTTP/1.1", "Host: h", "Transfer-Encoding: chunked")
        + chunks
        + b"0\r\n\r\n",
    )
    assert answer.response.status == 413


async def test_max_body_bytes_holds_after_a_head_on_the_same_connection(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, max_body_bytes="64KiB")
    big = request_bytes(
        "POST /big HTTP/1.1",
        "Host: h",
        f"Content-Length: {OVER_THE_LIMIT}",
        body=b"y" * OVER_THE_LIMIT,
    )
    [answer] = await through(proxy, [big], after_a_head=True)
    assert answer.response.status == 413
    assert [(s.method, s.raw_path) for s in upstream.seen] == [("HEAD", "/lead")]


async def test_max_connections_counts_connections_begun_with_a_head_or_a_chunked_post(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, max_connections=2)
    firsts = [
        LEAD,
        request_bytes("POST /two HTTP/1.1", "Host: h", "Transfer-Encoding: chunked")
        + b"3\r\ntwo\r\n0\r\n\r\n",
    ]
    async with AsyncExitStack() as held:
        for first in firsts:
            reader, writer = await held.enter_async_context(connected(proxy.port))
            assert (await exchange(reader, writer, first)).response.status == 200
        reader, _ = await held.enter_async_context(connected(proxy.port))
        refused = parse_response(await asyncio.wait_for(reader.read(), 5))
    assert refused.status == 503


# --- Expect: 100-continue -------------------------------------------------------------


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    async with connected(proxy.port) as (reader, writer):
        writer.write(
            request_bytes(
                "POST /upload HTTP/1.1", "Host: h", "Content-Length: 7", "Expect: 100-continue"
            )
        )
        interim = await read_response(reader, timeout=4)  # the body is held back until then
        writer.write(b"payload")
        final = await read_final(reader)
    assert interim.lines[0].startswith(b"HTTP/1.1 100 "), interim.head
    assert final.response.status == 200
    assert [(s.raw_path, s.body) for s in upstream.seen] == [("/upload", b"payload")]


# --- a malformed head after pipelined requests ----------------------------------------


async def test_a_malformed_head_is_400_after_the_pipelined_requests_before_it(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    async with connected(proxy.port) as (reader, writer):
        writer.write(
            request_bytes("GET /1 HTTP/1.1", "Host: h")
            + request_bytes("GET /2 HTTP/1.1", "Host: h")
            + request_bytes("GET / HTTP/1.1", "Host: h", "Bad Header: x")
        )
        answers = [(await read_response(reader)).response for _ in range(2)]
        rest = await asyncio.wait_for(reader.read(), 5)  # then the connection closes
    assert [(a.status, a.json()["path"]) for a in answers] == [(200, "/1"), (200, "/2")]
    assert parse_response(rest).status == 400, rest
    assert [s.raw_path for s in upstream.seen] == ["/1", "/2"]
