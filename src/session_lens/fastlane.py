"""The fast lane: plain HTTP/1.1 requests relayed at the protocol level.

aiohttp's server and client cost hundreds of microseconds a request, more than
the rest of the hop together. Most of a session service's traffic is small,
well-formed HTTP/1.1, and for that traffic this module reads the request head
itself, strictly. A head it does not fully recognise — another version, HEAD,
`Transfer-Encoding`, `Upgrade`, `Expect`, a body over 64 KiB, a folded or bare-LF
line, a target not in origin form, a lifecycle route — is handed over with its
connection and every byte read so far to aiohttp's server, which answers it and
everything after it on that connection as before.

Recognised requests go upstream over a pool of keep-alive connections whose
responses llhttp parses (httptools), and their answers come back with
backpressure both ways: a slow client pauses the upstream's socket.
"""

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import httptools
from aiohttp import web
from multidict import CIMultiDict

from .config import Config
from .proxy import (
    HOP_BY_HOP,
    MAX_MERGED_BODY,
    REASON_HEADER,
    Answer,
    Exchange,
    MissPlan,
    Proxy,
    include_deleted_asked,
    new_request_id,
    problem_answer,
)
from .reasons import Kind, Outcome, UpstreamError

log = logging.getLogger("session_lens.proxy")

MAX_HEAD = 16384
"""Larger request heads go to aiohttp, which applies its limits to them."""
MAX_BODY = 65536
"""Larger request bodies go to aiohttp, which streams them."""
MAX_RESPONSE_HEAD = 1 << 20
HIGH_WATER = 1 << 18
"""Response bytes buffered from the upstream before its socket is paused."""
IDLE_UPSTREAM = 30.0
"""Idle upstream connections are closed after this long."""
IDLE_CLIENT = 75.0
"""Idle client connections are closed after this long, as aiohttp does."""
SWEEP_EVERY = 1.0
DRAIN_IDLE = 0.5
"""Draining, how long a kept-alive connection may stay idle before it is closed.

Closed at once, a client sending its next request at that moment would lose it
(a POST is not sent again); given this long, a busy client's next request comes,
and is answered with `Connection: close`."""

_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|PATCH|DELETE|OPTIONS) (/[!-~]*) HTTP/1\.1")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t !-~\x80-\xff]*)")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
_HANDED_OVER = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_NEVER_NAMED = frozenset({b"upgrade", b"content-length", b"host"})
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
_IDEMPOTENT = frozenset({b"GET", b"PUT", b"DELETE", b"OPTIONS"})
_BODYLESS = frozenset({204, 304})


class Head:
    """A request head the fast lane recognised, and what it needs of it."""

    __slots__ = ("close", "fields", "forwarded", "host", "length", "method", "request_id", "target")

    def __init__(self, method: bytes, target: bytes) -> None:
        self.method = method
        self.target = target
        self.fields: list[tuple[bytes, bytes]] = []
        """End-to-end fields, in order, as sent."""
        self.host: bytes | None = None
        self.length = 0
        self.close = False
        self.request_id: bytes | None = None
        self.forwarded: dict[bytes, list[bytes]] = {}


def parse_head(block: bytes) -> Head | None:
    """The head in `block` (without its blank line), or None to hand it to aiohttp."""
    lines = block.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    head = Head(line[1], line[2])
    fields: list[tuple[bytes, bytes, bytes]] = []
    named: set[bytes] = set()
    lengths = 0
    first_id: bytes | None = None
    for raw in lines[1:]:
        found = _FIELD.fullmatch(raw)
        if found is None:  # bare LF, obs-fold, a control character, no colon...
            return None
        name, value = found[1], found[2].strip(b" \t")
        lowered = name.lower()
        if lowered in _HANDED_OVER:
            return None
        if lowered == b"content-length":
            lengths += 1
            if lengths > 1 or _DIGITS.fullmatch(value) is None:
                return None
            head.length = int(value)
        elif lowered == b"host":
            if head.host is not None:
                return None
            head.host = value
        elif lowered == b"connection":
            for token in value.lower().split(b","):
                named.add(token.strip(b" \t"))
            continue
        elif lowered == b"x-request-id":
            if not value.isascii():
                return None
            if first_id is None:
                first_id = value
        fields.append((name, value, lowered))
    if head.host is None or head.length > MAX_BODY or named & _NEVER_NAMED:
        return None  # a Connection naming what frames or routes the request: aiohttp's
    head.close = b"close" in named
    drop = _HOP_BY_HOP | named
    if first_id:
        head.request_id = first_id
    elif first_id is not None:  # empty: replaced by one of ours, as if absent
        drop = drop | {b"x-request-id"}
    for name, value, lowered in fields:
        if lowered in drop or lowered.startswith(b"proxy-"):
            continue
        if lowered in _FORWARDED:
            head.forwarded.setdefault(lowered, []).append(value)
            continue
        head.fields.append((name, value))
    return head


class UpstreamFailure(Exception):
    """The upstream failed one way or another before its answer was whole."""

    def __init__(self, kind: UpstreamError, detail: str, received: bool = True) -> None:
        super().__init__(detail)
        self.kind = kind
        self.received = received
        """Whether any byte of an answer had arrived."""


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, one request at a time."""

    def __init__(self, pool: "Pool") -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self.listener: Callable[[], None] | None = None
        """Told, without a task, when an answer's bytes have been read (or it failed)."""
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.framing = b""  # b"length", b"chunked" or b"close"
        self.length: int | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.headed = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.failure: UpstreamFailure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_bytes = 0
        self._informational = False
        self._paused = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # Requests

    def send(self, data: bytes) -> None:
        """Write one request; its answer is read into this object."""
        assert self.transport is not None
        self._reset()
        self.busy = True
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(
            self._last_read + self._pool.read_timeout, self._check_timeout
        )
        self.transport.write(data)

    async def wait(self) -> None:
        """Until something happens: the head, more body, the end or a failure."""
        if self.failure is not None:
            raise self.failure
        if self.chunks or self.complete:  # it happened while nobody was waiting
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.failure is not None:
            raise self.failure

    def take(self) -> list[bytes]:
        """The body bytes buffered so far; reading resumes if it was paused."""
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_read = self._loop.time()
            self.transport.resume_reading()
        return chunks

    def done(self) -> None:
        """The answer was relayed: back to the pool if the connection can be reused."""
        self.busy = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.complete and self.failure is None and self.keep_alive:
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: UpstreamFailure) -> None:
        if self.failure is None and not self.complete:
            self.failure = failure
            self._wake()
            if self.listener is not None:
                self.listener()

    def _check_timeout(self) -> None:
        self._timer = None
        if self.complete or self.failure is not None:
            return
        now = self._loop.time()
        deadline = self._last_read + self._pool.read_timeout
        if self._paused or now < deadline:  # a paused socket is the client's slowness
            self._timer = self._loop.call_at(max(deadline, now + 0.1), self._check_timeout)
            return
        self._fail(UpstreamFailure(UpstreamError.TIMEOUT, "no answer in time", self.received))
        self.close()

    # Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.headed and self.framing == b"close" and not self.complete:
            self.complete = True  # a close-delimited body ends with the connection
            self._wake()
            if self.listener is not None:
                self.listener()
            return
        if self.headed:  # a body shorter than its framing promised
            self._fail(UpstreamFailure(UpstreamError.PROTOCOL, "the body was cut short"))
            return
        detail = f"{type(exc).__name__}: {exc}" if exc else "the connection was closed"
        self._fail(UpstreamFailure(UpstreamError.RESET, detail, self.received))

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: whatever this is, the connection is spoilt
            self.close()
            return
        self.received = True
        self._last_read = self._loop.time()
        if not self.headed:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD:
                self._fail(UpstreamFailure(UpstreamError.PROTOCOL, "response head too large"))
                self.close()
                return
        try:
            self._parser.feed_data(data)
            if self.listener is not None:
                self.listener()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamFailure(UpstreamError.PROTOCOL, "an upgrade nobody asked for"))
            self.close()
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            self._fail(UpstreamFailure(UpstreamError.PROTOCOL, f"malformed response: {exc}"))
            self.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: nothing to trust here
            raise ValueError("bytes after a whole answer")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints...): not relayed
            self._informational = True
            return
        self.status = status
        framing = b"close"
        for name, value in self.fields:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                codings = value.lower().rsplit(b",", 1)
                framing = b"chunked" if codings[-1].strip() == b"chunked" else b"close"
            elif lowered == b"content-length" and framing != b"chunked":
                framing = b"length"
                self.length = int(value)
        if status in _BODYLESS:
            framing = b"length"
        self.framing = framing
        self.headed = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self.fields = []
            self.reason = b""
            self._head_bytes = 0
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()


class Pool:
    """Keep-alive connections to the upstream, newest idle first."""

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[Upstream] = []
        self._all: set[Upstream] = set()

    def idle(self) -> Upstream | None:
        """A kept-alive connection ready at once, if there is one."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def acquire(self) -> tuple[Upstream, bool]:
        """A connection, and whether it was used before."""
        reused = self.idle()
        if reused is not None:
            return reused, True
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await self.loop.create_connection(
                    lambda: Upstream(self), self._host, self._port
                )
        except TimeoutError:
            raise UpstreamFailure(UpstreamError.TIMEOUT, "connect timed out", False) from None
        except OSError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise UpstreamFailure(UpstreamError.CONNECT, detail, False) from None
        self._all.add(connection)
        return connection, False

    def release(self, connection: Upstream) -> None:
        connection.idle_since = self.loop.time()
        self._idle.append(connection)

    def forget(self, connection: Upstream) -> None:
        self._all.discard(connection)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than `IDLE_UPSTREAM`."""
        stale = [c for c in self._idle if c.closed or now - c.idle_since > IDLE_UPSTREAM]
        if stale:
            self._idle = [c for c in self._idle if c not in stale]
            for connection in stale:
                connection.close()

    def close(self) -> None:
        for connection in list(self._all):
            connection.close()
        self._idle.clear()


class Lane:
    """What the fast lane shares across connections: the proxy, the pool, the clock."""

    def __init__(self, proxy: Proxy, config: Config) -> None:
        parts = urlsplit(config.upstream)
        self.proxy = proxy
        self._host = parts.hostname or ""
        self._port = parts.port or 80
        self._prefix = parts.path.encode()
        self._config = config
        self._pool: Pool | None = None
        self.connections: set[HopProtocol] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._date = b""
        self._date_at = 0
        self.draining = False
        self.header_timeout = config.header_read_timeout.total_seconds()
        self.max_connections = config.max_connections
        self._refusal_logged = 0.0

    @staticmethod
    def serves(config: Config) -> bool:
        """Whether the fast lane can carry this configuration's traffic (plain http)."""
        return urlsplit(config.upstream).scheme == "http"

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(
                self._host,
                self._port,
                self._config.upstream_connect_timeout.total_seconds(),
                self._config.upstream_read_timeout.total_seconds(),
            )
        return self._pool

    def date(self) -> bytes:
        """Today's `Date` header value, formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    def upstream_request(self, head: Head, body: bytes, peer: bytes, request_id: bytes) -> bytes:
        """The request as the upstream gets it: hop-by-hop fields out, X-Forwarded-* in."""
        out = [head.method, b" ", self._prefix, head.target, b" HTTP/1.1\r\n"]
        for name, value in head.fields:
            out += (name, b": ", value, b"\r\n")
        forwarded = head.forwarded
        if peer:
            out += (b"X-Forwarded-For: ", _folded(forwarded.get(b"x-forwarded-for"), peer))
        out += (b"X-Forwarded-Proto: ", _folded(forwarded.get(b"x-forwarded-proto"), b"http"))
        assert head.host is not None
        out += (b"X-Forwarded-Host: ", _folded(forwarded.get(b"x-forwarded-host"), head.host))
        if head.request_id is None:
            out += (b"X-Request-ID: ", request_id, b"\r\n")
        out += (b"\r\n", body)
        return b"".join(out)

    def accept(self, fallback: web.Server) -> asyncio.Protocol:
        """A new client connection: the fast lane's, or refused over `max_connections`."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if len(self.connections) + len(fallback.connections) < self.max_connections:
            return HopProtocol(self, fallback)
        now = time.monotonic()
        if now - self._refusal_logged > 10:  # a flood must not flood the log too
            self._refusal_logged = now
            log.warning("connection limit reached", extra={"max_connections": self.max_connections})
        return _Refused(self.date())

    def drain(self) -> None:
        """Stop keeping connections alive: each closes after its next answer, or idle."""
        self.draining = True
        for connection in list(self.connections):
            connection.close_if_idle(DRAIN_IDLE)

    async def drained(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for every connection to close, idle ones closed."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for connection in list(self.connections):
                connection.close_if_idle(DRAIN_IDLE)

    def close(self) -> None:
        """Close every connection, client and upstream."""
        self.draining = True
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._pool is not None:
            self._pool.close()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = loop.time()
            if self._pool is not None:
                self._pool.sweep(now)
            for connection in list(self.connections):
                connection.check_idle(now)


def _folded(previous: list[bytes] | None, value: bytes) -> bytes:
    if previous:
        return b", ".join((*previous, value)) + b"\r\n"
    return value + b"\r\n"


class HopProtocol(asyncio.Protocol):
    """One client connection in the fast lane, until it is handed to aiohttp."""

    def __init__(self, lane: Lane, fallback: web.Server) -> None:
        self._lane = lane
        self._fallback = fallback
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._peer = b""
        self._paused_reading = False
        self._writable: asyncio.Future[None] | None = None
        self._since = 0.0
        """When the connection last went idle or a head began arriving."""
        self._gone = False
        self._busy = False
        """A request of this connection is being relayed."""
        self._pending: tuple[Head, str, int] | None = None
        """A head read whole, its path and its length, while its body arrives."""
        self._direct: tuple[Head, Exchange, Upstream, bytes, float] | None = None
        """A request sent on a kept-alive connection, its answer awaited without a task."""
        lane.connections.add(self)  # counted from accept on: a burst cannot pass the cap

    # Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer = str(peer[0]).encode()
        self._since = self._loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._lane.connections.discard(self)
        if self._direct is not None:  # the client went away: so does the upstream request
            _, exchange, upstream, _, _ = self._direct
            self._direct = None
            upstream.listener = None
            upstream.close()
            self._lane.proxy.finish(exchange)
            log.debug("client went away", extra={"request_id": exchange.request_id})
        if self._task is not None:
            self._task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._buffer:
            self._since = self._loop.time()
        self._buffer += data
        if not self._busy:
            self._next()
        self._flow()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
        self._flow()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self._busy and self._buffer:
            self._next()
        self._flow()

    def _blocked(self) -> bool:
        """Whether the client is not reading what it was sent."""
        return self._writable is not None and not self._writable.done()

    def _flow(self) -> None:
        """Read from the client unless it does not read its answers, or has sent plenty ahead."""
        transport = self._transport
        if transport is None or self._gone or transport.get_protocol() is not self:
            return
        ahead = len(self._buffer) > MAX_HEAD + MAX_BODY and (self._busy or self._pending is None)
        pause = self._blocked() or ahead
        if pause != self._paused_reading:
            self._paused_reading = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # Connection management

    def close_if_idle(self, longer_than: float = 0.0) -> None:
        if self._busy or self._buffer or self._transport is None:
            return
        if self._loop.time() - self._since >= longer_than:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def check_idle(self, now: float) -> None:
        """Close a connection idle too long, or one whose head is too slow to arrive."""
        if self._busy or self._transport is None:
            return
        if self._buffer and self._pending is None:  # a head arriving (a body may take its time)
            if now - self._since > self._lane.header_timeout:
                self._answer_and_close(408, "the request head did not arrive in time")
        elif now - self._since > IDLE_CLIENT:
            self._transport.close()

    def _answer_and_close(self, status: int, detail: str) -> None:
        assert self._transport is not None
        log.info("request head timed out", extra={"peer": self._peer.decode()})
        self._transport.write(self._render(problem_answer(status, detail), close=True))
        self._buffer.clear()
        self._transport.close()

    # Requests

    def _next(self) -> None:
        """Start on the request at the front of the buffer, if it is all here."""
        transport = self._transport
        assert transport is not None
        while self._buffer and not self._gone and not self._blocked():
            if self._pending is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    buffer = self._buffer
                    if len(buffer) > MAX_HEAD or buffer.count(b"\n") != buffer.count(b"\r\n"):
                        self._hand_over()  # too long, or lines ending in a bare LF
                    return
                head = parse_head(bytes(self._buffer[:end])) if end <= MAX_HEAD else None
                if head is None:
                    self._hand_over()
                    return
                path = head.target.partition(b"?")[0].decode()
                proxy = self._lane.proxy
                limit = proxy.max_body
                too_large = limit is not None and head.length > limit
                if too_large or proxy.lifecycle_match(head.method.decode(), path):
                    self._hand_over()  # aiohttp answers 413s and records lifecycle events
                    return
                self._pending = (head, path, end + 4 + head.length)
            head, path, total = self._pending
            if len(self._buffer) < total:
                return  # the body is on its way
            self._pending = None
            body = bytes(self._buffer[total - head.length : total])
            del self._buffer[:total]
            exchange = self._answer_here(head, path)
            if exchange is not None:
                self._busy = True
                self._start(head, body, exchange)
                return
            if head.close or self._lane.draining:
                transport.close()
                return
        self._since = self._loop.time()

    def _hand_over(self) -> None:
        """Give the connection, and what it has sent so far, to aiohttp's server."""
        transport = self._transport
        assert transport is not None
        self._lane.connections.discard(self)
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            protocol.data_received(data)
        if self._paused_reading:
            transport.resume_reading()

    def _exchange(self, head: Head, kind: Kind) -> Exchange:
        given = head.request_id
        request_id = given.decode() if given is not None else new_request_id()
        return Exchange(kind, head.target.decode(), request_id, given is None, time.perf_counter())

    def _answer_here(self, head: Head, path: str) -> Exchange | None:
        """Answer a malformed session ID at once (enforce mode), else the exchange to relay."""
        match = self._lane.proxy.routes.match(path) if head.method == b"GET" else None
        if match is None:
            return self._exchange(head, Kind.PASSTHROUGH)
        exchange = self._exchange(head, Kind.LOOKUP)
        exchange.match = match
        proxy = self._lane.proxy
        answer = proxy.reject(exchange)
        if answer is None:  # valid, or observe mode
            return exchange
        proxy.begin()
        exchange.status = answer.status
        assert self._transport is not None
        self._transport.write(self._render(answer, head.close or self._lane.draining))
        proxy.finish(exchange)
        return None

    def _render(self, answer: Answer, close: bool) -> bytes:
        return render(answer, self._lane.date(), close)

    def _start(self, head: Head, body: bytes, exchange: Exchange) -> None:
        """Send the request upstream: on a kept-alive connection at once, else from a task.

        Most answers arrive whole in one read; those are written back from the
        upstream's callback, with no task, no future and no turn of the loop.
        """
        lane = self._lane
        lane.proxy.begin()
        data = lane.upstream_request(head, body, self._peer, exchange.request_id.encode())
        upstream = lane.pool.idle()
        if upstream is None:
            self._task = self._loop.create_task(self._relay(head, exchange, data))
            return
        self._direct = (head, exchange, upstream, data, time.perf_counter())
        upstream.listener = self._heard
        upstream.send(data)

    def _heard(self) -> None:
        """The upstream read something for the request sent without a task."""
        assert self._direct is not None
        head, exchange, upstream, data, sent = self._direct
        if upstream.failure is None and not upstream.headed:
            return  # a head in pieces
        upstream.listener = None
        self._direct = None
        whole = upstream.failure is None and upstream.complete
        if not whole or self._lane.proxy.is_miss(exchange, upstream.status):
            relay = self._relay(head, exchange, data, upstream, sent)
            self._task = self._loop.create_task(relay)
            return
        try:
            close = self._answer_whole(head, exchange, upstream, sent)
        finally:
            upstream.done()
        self._after(exchange, close)

    async def _relay(
        self,
        head: Head,
        exchange: Exchange,
        data: bytes,
        upstream: Upstream | None = None,
        sent: float = 0.0,
    ) -> None:
        try:
            close = await self._forward(head, exchange, data, upstream, sent)
        except asyncio.CancelledError:
            self._lane.proxy.finish(exchange)
            log.debug("client went away", extra={"request_id": exchange.request_id})
            return
        self._after(exchange, close)

    def _after(self, exchange: Exchange, close: bool) -> None:
        """A request answered: counted, then the connection closes or takes the next one."""
        self._lane.proxy.finish(exchange)
        self._task = None
        self._busy = False
        transport = self._transport
        if close or self._lane.draining or transport is None:
            if transport is not None:
                transport.close()
            return
        self._since = self._loop.time()
        if self._buffer:
            self._next()
        self._flow()

    async def _forward(
        self,
        head: Head,
        exchange: Exchange,
        data: bytes,
        upstream: Upstream | None = None,
        sent: float = 0.0,
    ) -> bool:
        """Relay one request and its answer; True when the connection must close after.

        `upstream` is a kept-alive connection the request went out on already.
        """
        lane = self._lane
        proxy = lane.proxy
        transport = self._transport
        assert transport is not None
        reused = upstream is not None
        if upstream is None:
            sent = time.perf_counter()
        try:
            for attempt in (1, 2):
                if upstream is None:
                    upstream, reused = await lane.pool.acquire()
                    upstream.send(data)
                try:
                    while not upstream.headed:
                        await upstream.wait()
                    break
                except UpstreamFailure as failure:
                    upstream.close()
                    # A kept-alive connection the upstream closed just as it was
                    # reused: an idempotent request is safe to send again, once.
                    retry = (
                        reused
                        and failure.kind is UpstreamError.RESET
                        and not failure.received
                        and head.method in _IDEMPOTENT
                    )
                    if attempt == 2 or not retry:
                        raise
                    upstream = None
        except UpstreamFailure as failure:
            answer = proxy.failure(exchange, failure.kind, failure)
            transport.write(self._render(answer, head.close or lane.draining))
            return head.close
        except BaseException:  # the client went away: so does the upstream request
            if upstream is not None:
                upstream.close()
            raise
        assert upstream is not None
        try:
            return await self._answer(head, exchange, upstream, sent)
        finally:
            upstream.done()

    async def _answer(
        self, head: Head, exchange: Exchange, upstream: Upstream, sent: float
    ) -> bool:
        outcome, fields, named, close = self._opened(head, exchange, upstream)
        if outcome is Outcome.NOT_FOUND:
            return await self._miss(head, exchange, upstream, fields, sent, close)
        out, chunked = self._head_of(exchange, upstream, fields, named, close)
        return await self._stream(out, exchange, upstream, chunked, sent) or close

    def _answer_whole(
        self, head: Head, exchange: Exchange, upstream: Upstream, sent: float
    ) -> bool:
        """`_answer` for an answer all here, not a miss: written back at once."""
        _, fields, named, close = self._opened(head, exchange, upstream)
        out, chunked = self._head_of(exchange, upstream, fields, named, close)
        self._write_rest(out, upstream, chunked)
        exchange.upstream_seconds = time.perf_counter() - sent
        return close

    def _opened(
        self, head: Head, exchange: Exchange, upstream: Upstream
    ) -> tuple[Outcome | None, list[tuple[bytes, bytes]], set[bytes], bool]:
        """An answer's head arrived: its outcome counted, its end-to-end fields, and
        whether the client's connection closes after it."""
        exchange.status = upstream.status
        outcome = self._lane.proxy.count_lookup(exchange, upstream.status)
        fields, named = _end_to_end(upstream.fields, upstream.framing == b"chunked")
        return outcome, fields, named, head.close or self._lane.draining

    def _head_of(
        self,
        exchange: Exchange,
        upstream: Upstream,
        fields: list[tuple[bytes, bytes]],
        named: set[bytes],
        close: bool,
        chunked: bool | None = None,
    ) -> tuple[list[bytes], bool]:
        """The answer's status line and fields for the client, and whether it goes chunked
        (as the upstream's framing says, unless `chunked` says otherwise)."""
        lane = self._lane
        status = upstream.status
        have_date = b"date" in named
        have_id = b"x-request-id" in named
        if chunked is None:
            chunked = upstream.framing != b"length"
        out = [b"HTTP/1.1 %d " % status, upstream.reason, b"\r\n"]
        for name, value in fields:
            out += (name, b": ", value, b"\r\n")
        if not have_date:
            out += (b"Date: ", lane.date(), b"\r\n")
        if exchange.id_generated and not have_id:
            out += (b"X-Request-ID: ", exchange.request_id.encode(), b"\r\n")
        if chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if close:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        return out, chunked

    def _write_rest(self, out: list[bytes], upstream: Upstream, chunked: bool) -> None:
        """Write `out` with the rest of a whole answer's body."""
        assert self._transport is not None
        _framed(out, upstream.take(), chunked)
        if chunked:
            out.append(b"0\r\n\r\n")
        self._transport.write(b"".join(out))

    async def _stream(
        self, out: list[bytes], exchange: Exchange, upstream: Upstream, chunked: bool, sent: float
    ) -> bool:
        """Write `out` and then the body as it comes; True when the connection must close."""
        transport = self._transport
        assert transport is not None
        try:
            while True:
                if upstream.complete:
                    self._write_rest(out, upstream, chunked)
                    exchange.upstream_seconds = time.perf_counter() - sent
                    return False
                _framed(out, upstream.take(), chunked)
                if out:
                    transport.write(b"".join(out))
                    out = []
                if self._writable is not None and not self._writable.done():
                    await self._writable
                    if self._gone:
                        return True
                await upstream.wait()
        except UpstreamFailure as failure:
            # The head may be out: the only honest answer left is a cut connection.
            self._lane.proxy.log_upstream_error(exchange, failure.kind, failure, partial=True)
            if out:
                transport.write(b"".join(out))
            transport.close()
            return True

    async def _miss(
        self,
        head: Head,
        exchange: Exchange,
        upstream: Upstream,
        fields: list[tuple[bytes, bytes]],
        sent: float,
        close: bool,
    ) -> bool:
        """A lookup the upstream did not find: explained, then relayed or rewritten."""
        proxy = self._lane.proxy
        query = head.target.partition(b"?")[2].decode()
        pairs = parse_qsl(query, keep_blank_values=True)
        include_deleted = include_deleted_asked(
            next((value for key, value in pairs if key == "include_deleted"), "")
        )
        explanation = await proxy.explain_miss(exchange, include_deleted, upstream.status, sent)
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in fields
        )
        headers[REASON_HEADER] = explanation.reason.value
        length = upstream.length if upstream.framing == b"length" else None
        plan = proxy.miss_plan("GET", headers, length)
        chunked: bool | None = None  # as the upstream framed it
        rewritten: bytes | None = None
        if plan is not None:
            try:
                raw = await _whole(upstream, MAX_MERGED_BODY if plan is MissPlan.MERGE else 0)
            except UpstreamFailure as failure:
                answer = proxy.failure(exchange, failure.kind, failure)
                assert self._transport is not None
                self._transport.write(self._render(answer, close))
                return close
            rewritten = proxy.miss_body(plan, upstream.status, headers, exchange, explanation, raw)
            headers.popall("Content-Length", None)
            headers["Content-Length"] = str(len(rewritten))
            chunked = False
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        named = {name.lower() for name, _ in fields}
        out, chunked = self._head_of(exchange, upstream, fields, named, close, chunked)
        if rewritten is not None:
            assert self._transport is not None
            self._transport.write(b"".join(out) + rewritten)
            exchange.upstream_seconds = time.perf_counter() - sent
            return close
        return await self._stream(out, exchange, upstream, chunked, sent) or close


def _framed(out: list[bytes], chunks: list[bytes], chunked: bool) -> None:
    """Append body chunks to `out`, each framed as a chunk when the answer goes chunked."""
    if not chunked:
        out += chunks
        return
    for chunk in chunks:
        out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")


async def _whole(upstream: Upstream, keep: int) -> bytes:
    """The rest of an answer's body: its first `keep` bytes kept, the others read and dropped."""
    parts: list[bytes] = []
    size = 0
    while True:
        for chunk in upstream.take():
            if size < keep:
                parts.append(chunk)
            size += len(chunk)
        if upstream.complete:
            return b"".join(parts)[:keep]
        await upstream.wait()


def _end_to_end(
    fields: list[tuple[bytes, bytes]], chunked: bool
) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    """A response's fields without hop-by-hop ones, and the names of those kept, lowered.

    A chunked answer's Content-Length says nothing true: it goes too.
    """
    drop = set(_HOP_BY_HOP)
    for name, value in fields:
        if name.lower() == b"connection":
            drop.update(token.strip(b" \t") for token in value.lower().split(b","))
    if chunked:
        drop.add(b"content-length")
    else:  # the answer's framing, whatever its Connection header names
        drop.discard(b"content-length")
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()
    for name, value in fields:
        lowered = name.lower()
        if lowered in drop or lowered.startswith(b"proxy-"):
            continue
        kept.append((name, value))
        named.add(lowered)
    return kept, named


def render(answer: Answer, date: bytes, close: bool) -> bytes:
    """An answer of session-lens' own, as bytes on the wire."""
    out = [
        b"HTTP/1.1 %d %s\r\n" % (answer.status, HTTPStatus(answer.status).phrase.encode()),
        b"Content-Type: application/problem+json\r\nContent-Length: %d\r\n" % len(answer.body),
        b"Date: " + date + b"\r\n",
    ]
    for name, value in answer.headers:
        out.append(f"{name}: {value}\r\n".encode())
    if close:
        out.append(b"Connection: close\r\n")
    out += (b"\r\n", answer.body)
    return b"".join(out)


_TOO_MANY = problem_answer(503, "too many connections are open; try again", [("Retry-After", "1")])


class _Refused(asyncio.Protocol):
    """A connection over the limit: a 503 and a close, nothing read."""

    def __init__(self, date: bytes) -> None:
        self._date = date

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)
        writer.write(render(_TOO_MANY, self._date, close=True))
        writer.close()


class HopSite(web.TCPSite):
    """A TCP site whose connections start in the fast lane (without a lane: aiohttp's).

    Stopping it takes in the connections the kernel has already queued on the
    listener before closing it: closed with them queued, it would reset them, and
    with SO_REUSEPORT the kernel queues connections to every listener of the port
    until it closes (a rolling restart would lose them).
    """

    __slots__ = ("_lane",)

    def __init__(self, runner: web.BaseRunner, lane: Lane | None, *args: Any, **kwargs: Any):
        super().__init__(runner, *args, **kwargs)
        self._lane = lane

    async def start(self) -> None:
        if self._lane is None:
            await super().start()
            return
        await web.BaseSite.start(self)
        fallback = self._runner.server
        assert fallback is not None
        lane = self._lane
        self._server = await asyncio.get_running_loop().create_server(
            lambda: lane.accept(fallback),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server = self._server
        if server is None:
            await super().stop()
            return
        queued: list[socket.socket] = []
        for listener in cast(asyncio.Server, server).sockets:
            queued += _queued(listener.fileno())
        server.close()  # no await since the queue was read: nothing can slip in between
        await super().stop()
        fallback = self._runner.server
        assert fallback is not None
        lane = self._lane
        loop = asyncio.get_running_loop()
        for sock in queued:
            factory = fallback if lane is None else (lambda: lane.accept(fallback))
            await loop.connect_accepted_socket(factory, sock)


def _queued(listener: int) -> list[socket.socket]:
    """The connections waiting in a listener's accept queue, accepted."""
    accepted: list[socket.socket] = []
    with socket.socket(fileno=os.dup(listener)) as sock:
        sock.setblocking(False)
        while True:
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError:  # out of descriptors, or the listener failed: keep what we have
                return accepted
            connection.setblocking(False)
            accepted.append(connection)
