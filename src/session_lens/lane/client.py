"""The client side of the lane: one connection, its requests parsed by llhttp.

Every request of HTTP/1.0 and 1.1 is read here, whatever its method, framing or
size: heads and bodies are parsed by llhttp (httptools), strictly, and relayed
in order, bodies streamed both ways with backpressure. A head llhttp refuses
gets a 400 and the connection closes. Only a WebSocket upgrade leaves the lane:
its connection goes to aiohttp's server, which relays frames.

The same client rules hold for every request on the connection: a head must
arrive within `header_read_timeout`, a body may not pass `max_body_bytes`, and
an idle connection closes after `IDLE_CLIENT` seconds.
"""

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qsl, urlsplit

import httptools
from multidict import CIMultiDict

from ..policy import (
    MAX_HEADER_BYTES,
    MAX_INSPECTED_BODY,
    MAX_MERGED_BODY,
    REASON_HEADER,
    Answer,
    Exchange,
    MissPlan,
    Observation,
    include_deleted_asked,
    problem_answer,
)
from ..reasons import Kind, Outcome, UpstreamError
from .answer import BODYLESS, add_fields, end_to_end, framed, last_chunk, render
from .upstream import Upstream, UpstreamFailure

if TYPE_CHECKING:
    from .site import Lane

log = logging.getLogger("session_lens.proxy")

MAX_HEAD = 1 << 18
"""The largest request head, all fields together."""
AHEAD = 1 << 18
"""Request bytes read ahead of the upstream (pipelined, or before it is connected)
before reading from the client pauses."""
MAX_QUEUED = 32
"""Pipelined requests parsed ahead of their turn before reading pauses."""
IDLE_CLIENT = 75.0
"""Idle client connections are closed after this long, as aiohttp does."""
DRAIN_IDLE = 0.5
"""Draining, how long a kept-alive connection may stay idle before it is closed.

Closed at once, a client sending its next request at that moment would lose it
(a POST is not sent again); given this long, a busy client's next request comes,
and is answered with `Connection: close`."""

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
_NEVER_DROPPED = frozenset({b"content-length", b"host"})
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
_DROPPED = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect"}
)
"""Request fields that go no further: hop-by-hop ones, and Expect, answered here."""
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refusal(Exception):
    """A request this hop answers itself and then closes the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Stopped(Exception):
    """Nothing more of what the client sent is parsed."""


class Request:
    """One request parsed from the client, and how far its relay has come.

    What most requests never change is a class default: a request costs only
    what it sets.
    """

    target = b""
    """As the upstream gets it: origin form, or `*`."""
    path = ""
    host: bytes | None = None
    request_id: bytes | None = None
    chunked = False
    expect = False
    close = False
    websocket = False
    refusal: _Refusal | None = None
    """An answer of our own, decided from the head: the connection closes after it."""
    discard = False
    """Answered here: the rest of the body is read and dropped."""
    size = 0
    done = False
    sent = False
    """Whether the upstream has the head (then body bytes go straight to it)."""
    terminated = False
    """Whether the chunked body's end has been written for the upstream."""
    exchange: Exchange | None = None
    upstream: Upstream | None = None
    observation: Observation | None = None
    tap: bytearray | None = None
    """The first bytes of a body kept to find a session ID in."""
    read_at = 0.0
    """When the last of its body was read."""
    replied = False
    """Whether any of an answer has gone to the client."""

    def __init__(self, method: bytes, http10: bool) -> None:
        self.method = method
        self.http10 = http10
        self.fields: list[tuple[bytes, bytes]] = []
        """End-to-end fields, in order, as sent."""
        self.forwarded: dict[bytes, list[bytes]] = {}
        self.body: list[bytes] = []
        """Body bytes read and not yet sent upstream."""
        self.trailers: list[tuple[bytes, bytes]] = []


class ClientConnection(asyncio.Protocol):
    """One client connection: requests parsed as they come, answered in order."""

    def __init__(self, lane: "Lane") -> None:
        self._lane = lane
        self._loop = lane.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = b""
        self._gone = False
        self._paused_reading = False
        self._writable: asyncio.Future[None] | None = None
        # Parsing
        self._in_head = False
        self._head_started = 0.0
        self._head_bytes = 0
        self._url: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] = []
        self._reading: Request | None = None
        """The request whose body is being parsed."""
        # Answering
        self._queue: deque[Request] = deque()
        """Requests parsed and not yet answered, in order; the first is being relayed."""
        self._active: Request | None = None
        self._ahead = 0
        """Body bytes read and not yet sent upstream."""
        self._advancing = False
        self._task: asyncio.Task[None] | None = None
        self._direct: tuple[Request, float, bytes] | None = None
        """A request sent on a kept-alive connection, its answer awaited without a task."""
        self._final: Answer | None = None
        """What the connection ends with once the queue is answered (400, 408)."""
        self._ended = False
        """Nothing more is read: the connection closes once what was read is answered."""
        self._upgrade: bytes | None = None
        """Bytes after a WebSocket upgrade's head, held for aiohttp."""
        self._since = 0.0
        """When the connection last went idle."""
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
        self._abandon()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _abandon(self) -> None:
        """The request being relayed goes no further, and its upstream request with it."""
        self._ended = True
        if self._task is not None:
            self._task.cancel()  # the task lets its upstream go and counts the request
            return
        active, self._active = self._active, None
        if active is not None and self._direct is not None:
            self._direct = None
            if active.upstream is not None:
                active.upstream.done(reusable=False)
            self._client_left(active)

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:  # a WebSocket's first frames, for aiohttp
            self._upgrade += data
            return
        if self._ended:
            return  # the connection ends; nothing more is read
        if not self._in_head:
            self._head_bytes = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[cast(int, upgrade.args[0]) :])
        except httptools.HttpParserError as exc:
            refusal = exc.__context__
            if isinstance(refusal, _Stopped):
                pass
            elif isinstance(refusal, _Refusal):
                self._fail(refusal.status, refusal.detail)
            else:
                self._fail(400, f"the request is malformed: {exc}")
        else:
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._fail(400, f"the request head is larger than {MAX_HEAD} bytes")
        if self._active is None or self._ahead > AHEAD or len(self._queue) > MAX_QUEUED:
            self._advance()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
        self._flow()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._advance()

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = self._loop.time()
        self._url = []
        self._fields = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise _Refusal(400, f"a header field is larger than {MAX_HEADER_BYTES} bytes")
        value = value.rstrip(b" \t")
        if self._in_head:
            self._fields.append((name, value))
        elif self._reading is not None:
            self._reading.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        request = self._head()
        self._queue.append(request)
        if request.refusal is not None:  # answered from its head: nothing after it is read
            self._ended = True
            raise _Stopped
        self._reading = request

    def on_body(self, body: bytes) -> None:
        request = self._reading
        if request is None:
            raise _Stopped
        request.size += len(body)
        request.read_at = self._loop.time()
        limit = self._lane.policy.max_body
        if limit is not None and request.size > limit:
            self._over_limit(request)
            return
        if request.tap is not None and len(request.tap) <= MAX_INSPECTED_BODY:
            request.tap += body
        if request.discard:
            return  # answered here: the body is read and dropped
        if request.sent and request.upstream is not None:
            out: list[bytes] = []
            framed(out, [body], request.chunked)
            request.upstream.write(b"".join(out))
            return
        request.body.append(body)
        self._ahead += len(body)

    def on_message_complete(self) -> None:
        request = self._reading
        if request is None:
            raise _Stopped
        self._reading = None
        request.done = True
        if request.observation is not None:
            self._inspect(request)
        if request.sent and request.upstream is not None:
            request.upstream.write(self._body_so_far(request, []), last=True)

    def _inspect(self, request: Request) -> None:
        """Show a lifecycle request's whole body to its observation."""
        if request.observation is not None and request.tap is not None:
            whole = len(request.tap) <= MAX_INSPECTED_BODY
            request.observation.request_body(bytes(request.tap), whole)
            request.tap = None

    # Heads

    def _head(self) -> Request:
        """The request whose head was just parsed, with what it needs of it."""
        parser = self._parser
        version = parser.get_http_version()
        request = Request(parser.get_method(), version == "1.0")
        try:
            self._read_fields(request)
            self._read_target(request, b"".join(self._url))
            if version not in ("1.0", "1.1"):
                raise _Refusal(505, f"HTTP/{version} is not served; HTTP/1.1 is")
            if not request.http10 and request.host is None:
                raise _Refusal(400, "the request has no Host header")
        except _Refusal as refusal:
            request.refusal = refusal
        if request.refusal is not None:
            request.close = True
            return request
        request.close = request.close or not parser.should_keep_alive()
        if self._lane.policy.observes and request.method in (b"POST", b"PUT", b"PATCH"):
            request.tap = bytearray()  # kept in case it is a lifecycle request
        return request

    def _read_fields(self, request: Request) -> None:
        named: set[bytes] = set()
        upgrade = b""
        lowered_fields = [(name.lower(), name, value) for name, value in self._fields]
        for lowered, _name, value in lowered_fields:
            if lowered == b"host":
                if request.host is not None:
                    raise _Refusal(400, "the request has more than one Host header")
                request.host = value
            elif lowered == b"transfer-encoding":
                codings = [coding.strip(b" \t") for coding in value.lower().split(b",")]
                if codings[-1] != b"chunked":  # no telling where the body ends (RFC 9112 §6.3)
                    raise _Refusal(400, "the Transfer-Encoding does not end in chunked")
                if len(codings) > 1 or request.chunked:
                    raise _Refusal(501, "transfer codings other than chunked are not relayed")
                request.chunked = True
            elif lowered == b"content-length":  # llhttp has checked it is one number
                limit = self._lane.policy.max_body
                if limit is not None and int(value) > limit:
                    request.refusal = _Refusal(413, "")
            elif lowered == b"connection":
                named.update(token.strip(b" \t") for token in value.lower().split(b","))
            elif lowered == b"upgrade":
                upgrade = value.lower()
            elif lowered == b"expect":
                if value.lower() != b"100-continue":
                    raise _Refusal(417, "the only expectation met is 100-continue")
                request.expect = True
            elif lowered == b"x-request-id" and request.request_id is None:
                request.request_id = value
        request.close = b"close" in named
        request.websocket = (
            request.method == b"GET" and upgrade == b"websocket" and b"upgrade" in named
        )
        drop = _DROPPED | (named - _NEVER_DROPPED)  # framing and routing stay, whatever is named
        if request.request_id == b"" or b"x-request-id" in named:  # replaced, as if absent
            request.request_id = None
            drop = drop | {b"x-request-id"}
        fields = request.fields
        for lowered, name, value in lowered_fields:
            if lowered in drop or lowered.startswith(b"proxy-"):
                continue
            if lowered in _FORWARDED:
                request.forwarded.setdefault(lowered, []).append(value)
                continue
            fields.append((name, value))

    def _read_target(self, request: Request, target: bytes) -> None:
        if target.startswith(b"/"):
            request.target = target
        elif target == b"*" and request.method == b"OPTIONS":
            request.target = target
            return
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            # Absolute form (RFC 9112 §3.2.2): its authority is the host, the rest the path.
            parts = urlsplit(target.decode("ascii", "replace"))
            request.target = (parts.path or "/").encode() + (
                b"?" + parts.query.encode() if parts.query else b""
            )
            host = parts.netloc.rpartition("@")[2].encode()
            request.fields = [(n, v) for n, v in request.fields if n.lower() != b"host"]
            request.fields.insert(0, (b"Host", host))
            request.host = host
        else:
            raise _Refusal(400, "the request target must be a path")
        request.path = request.target.partition(b"?")[0].decode("latin-1")

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped at an upgrade: a WebSocket goes to aiohttp, CONNECT is refused,
        and any other upgrade is a plain request whose Upgrade header goes no further."""
        request = self._queue[-1] if self._queue else None
        if request is not None and request.websocket and request.refusal is None:
            self._upgrade = self._websocket_head(request) + rest
            self._flow()
            return
        if request is None or request.method == b"CONNECT":
            self._fail(400, "the request target must be a path")
            return
        self._parser = httptools.HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    def _websocket_head(self, request: Request) -> bytes:
        """The upgrade request again, as aiohttp's server is to read it."""
        out = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        if request.host is not None:  # the absolute form's authority, if it had one
            out += (b"Host: ", request.host, b"\r\n")
        add_fields(out, [(n, v) for n, v in self._fields if n.lower() != b"host"])
        out.append(b"\r\n")
        return b"".join(out)

    def _fail(self, status: int, detail: str) -> None:
        """End the connection with `status` once the requests before are answered."""
        if self._final is not None:
            return
        log.info(
            "request refused",
            extra={"peer": self._peer.decode(), "status": status, "detail": detail},
        )
        answer = problem_answer(status, detail)
        self._in_head = False
        self._ended = True
        reading, self._reading = self._reading, None
        if reading is not None and reading is self._active:
            self._end_now(reading, answer)  # its body is broken while it is relayed
            return
        if reading is not None:
            self._queue.remove(reading)  # its body is broken: it is never relayed
        self._final = answer

    def _end_now(self, request: Request, answer: Answer | None) -> None:
        """`request`, being relayed, cannot go on: `answer` (None when its answer has
        begun), and the connection closes; the upstream must not take a cut body for a
        whole one."""
        transport = self._transport
        exchange = request.exchange
        assert transport is not None and exchange is not None
        if answer is not None and not request.replied and not transport.is_closing():
            exchange.status = answer.status
            transport.write(self._render(answer, True, request))
        if request.upstream is not None:
            request.upstream.close()
        self._queue.clear()
        transport.close()
        self._abandon()

    # Client rules

    def _over_limit(self, request: Request) -> None:
        """A body went past `max_body_bytes`: 413 if nothing was answered yet, and the end."""
        self._ended = True  # nothing after it is read
        self._reading = None
        if request is self._active:
            assert request.exchange is not None
            answer = None if request.replied else self._lane.policy.too_large(request.exchange)
            self._end_now(request, answer)
        else:
            request.refusal = _Refusal(413, "")
            request.close = True
        raise _Stopped

    def close_if_idle(self, longer_than: float = 0.0) -> None:
        if self._queue or self._in_head or self._transport is None:
            return
        if self._loop.time() - self._since >= longer_than:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def check(self, now: float) -> None:
        """Close a connection idle too long, or answer 408 to a head too slow to arrive."""
        if self._transport is None or self._upgrade is not None:
            return
        reading = self._reading
        if self._in_head and not self._paused_reading:
            if now - self._head_started > self._lane.header_timeout:
                log.info("request head timed out", extra={"peer": self._peer.decode()})
                self._fail(408, "the request head did not arrive in time")
                self._advance()
        elif reading is not None and reading.sent and not self._paused_reading:
            if now - max(reading.read_at, self._head_started) > self._lane.body_timeout:
                log.info("request body timed out", extra={"peer": self._peer.decode()})
                self._fail(408, "the request body did not arrive in time")
        elif not self._queue and now - self._since > IDLE_CLIENT:
            self._transport.close()

    def _blocked(self) -> bool:
        """Whether the client is not reading what it was sent."""
        return self._writable is not None and not self._writable.done()

    def _flow(self) -> None:
        """Read from the client unless it does not read its answers, the upstream does not
        take the body, or plenty has been read ahead."""
        transport = self._transport
        if transport is None or self._gone or transport.get_protocol() is not self:
            return
        active = self._active
        writable = self._writable
        pause = (
            (writable is not None and not writable.done())
            or self._ahead > AHEAD
            or len(self._queue) > MAX_QUEUED
            or self._upgrade is not None
            or (active is not None and active.upstream is not None and active.upstream.write_paused)
        )
        if pause != self._paused_reading:
            self._paused_reading = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()
                self._head_started = self._loop.time()  # a head's time runs while it is read

    # Answering, in order

    def _advance(self) -> None:
        """Start on the first request not yet answered, if nothing is being relayed."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while self._active is None and self._queue and not self._gone:
                if self._writable is not None and not self._writable.done():
                    break  # the client does not read: the next answer waits
                request = self._queue[0]
                if request.websocket and self._upgrade is not None and request is self._queue[-1]:
                    self._hand_over()
                    return
                self._active = request
                self._start(request)
            idle = self._active is None and not self._queue and not self._gone
            if idle and self._final is not None and self._transport is not None:
                self._transport.write(render(self._final, self._lane.clock.date(), True))
                self._transport.close()
                return
        finally:
            self._advancing = False
        self._flow()

    def _hand_over(self) -> None:
        """Give the connection, with the upgrade request, to aiohttp's server."""
        transport = self._transport
        assert transport is not None and self._upgrade is not None
        self._queue.clear()
        self._lane.connections.discard(self)
        protocol = self._lane.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._upgrade = self._upgrade, None
        protocol.data_received(data)
        if self._paused_reading:
            transport.resume_reading()

    def _start(self, request: Request) -> None:
        """Answer `request` here, or send it upstream: on a kept-alive connection at once,
        else from a task."""
        lane = self._lane
        policy = lane.policy
        given = request.request_id
        target = request.target.decode("latin-1")
        exchange = policy.exchange(target, given.decode("utf-8", "replace") if given else None)
        request.exchange = exchange
        policy.begin()
        answer: Answer | None = None
        if request.refusal is not None:
            refusal = request.refusal
            if refusal.status == 413:
                answer = policy.too_large(exchange)
            else:
                answer = policy.refuse(exchange, refusal.status, refusal.detail)
        else:
            method = request.method.decode()
            observation = None
            if policy.observes:
                observation = policy.observe(exchange, method, request.path)
                request.observation = observation
            if observation is None or not observation.reads_request:
                request.tap = None
            elif request.done:
                self._inspect(request)
            if observation is None:
                answer = policy.lookup(exchange, method, request.path)
        if answer is not None:
            assert self._transport is not None
            self._drop_body(request)
            self._transport.write(self._render(answer, self._closes(request), request))
            self._after(request, self._closes(request))
            return
        data = self._upstream_request(request)
        if request.expect and not request.done and not request.size and not request.http10:
            assert self._transport is not None
            self._transport.write(_CONTINUE)
        upstream = lane.pool.idle()
        if upstream is None or request.observation is not None:
            self._task = self._loop.create_task(self._relay(request, data))
            return
        self._direct = (request, time.perf_counter(), data)
        self._send(request, upstream, data)
        upstream.listener = self._heard

    def _upstream_request(self, request: Request) -> bytes:
        """The request head as the upstream gets it, with the body read so far."""
        exchange = request.exchange
        assert exchange is not None
        out = self._lane.request_head(request, self._peer, exchange.request_id.encode())
        return self._body_so_far(request, out)

    def _body_so_far(self, request: Request, out: list[bytes]) -> bytes:
        """`out` with the body read and not yet sent (and its end, if it ended)."""
        if not request.body and not request.chunked:
            return b"".join(out)
        framed(out, request.body, request.chunked)
        if request.done and request.chunked and not request.terminated:
            request.terminated = True
            last_chunk(out, request.trailers)
        self._ahead -= sum(len(chunk) for chunk in request.body)
        request.body = []
        self._flow()
        return b"".join(out)

    def _send(self, request: Request, upstream: Upstream, data: bytes) -> None:
        """Send the request's head and what there is of its body; the rest follows."""
        request.upstream = upstream
        request.sent = True
        upstream.on_flow = self._flow
        if request.body or (request.done and request.chunked and not request.terminated):
            data += self._body_so_far(request, [])  # read while it was being connected
        upstream.send(data, request.method == b"HEAD", request.done)

    def _drop_body(self, request: Request) -> None:
        """`request` is answered here: what was read of its body, and what comes, goes."""
        request.discard = True
        self._ahead -= sum(len(chunk) for chunk in request.body)
        request.body = []

    def _closes(self, request: Request) -> bool:
        """Whether the connection closes after `request`'s answer: asked for, draining, or
        answered before its body was all read (what follows it is not sure)."""
        return request.close or self._lane.draining or not request.done

    def _render(self, answer: Answer, close: bool, request: Request) -> bytes:
        request.replied = True
        head_only = request.method == b"HEAD"
        return render(answer, self._lane.clock.date(), close, head_only, request.http10)

    def _heard(self) -> None:
        """The upstream read something for the request sent without a task."""
        assert self._direct is not None
        request, sent, data = self._direct
        upstream = request.upstream
        assert upstream is not None and request.exchange is not None
        if upstream.failure is None and not upstream.headed:
            self._interim(request, upstream)
            return  # a head in pieces, or an interim answer
        upstream.listener = None
        self._direct = None
        whole = upstream.failure is None and upstream.complete and request.done
        if not whole or self._lane.policy.is_miss(request.exchange, upstream.status):
            self._task = self._loop.create_task(self._relay(request, data, sent))
            return
        try:
            close = self._answer_whole(request, upstream, sent)
        finally:
            upstream.done()
        self._after(request, close)

    async def _relay(self, request: Request, data: bytes, sent: float = 0.0) -> None:
        exchange = request.exchange
        assert exchange is not None
        try:
            close = await self._forward(request, data, sent)
        except asyncio.CancelledError:
            self._client_left(request)
            return
        self._after(request, close)

    def _client_left(self, request: Request) -> None:
        exchange = request.exchange
        assert exchange is not None
        if request.observation is not None:
            request.observation.unanswered()
        self._lane.policy.finish(exchange)
        log.debug("client went away", extra={"request_id": exchange.request_id})

    def _after(self, request: Request, close: bool) -> None:
        """A request answered: counted, then the connection closes or takes the next one."""
        exchange = request.exchange
        assert exchange is not None
        self._lane.policy.finish(exchange)
        self._task = None
        self._active = None
        if self._queue and self._queue[0] is request:
            self._queue.popleft()
        transport = self._transport
        if not request.done and self._reading is request:
            close = True  # answered before its body was all read: nothing after it is sure
        if close or transport is None:  # draining, it said so; or it is closed when idle
            self._ended = True
            self._queue.clear()
            if transport is not None:
                transport.close()
            return
        self._since = self._loop.time()
        if self._queue or self._final is not None or self._paused_reading:
            self._advance()

    async def _forward(self, request: Request, data: bytes, sent: float) -> bool:
        """Relay one request and its answer; True when the connection must close after.

        Without `data`, the request went out on a kept-alive connection already.
        """
        lane = self._lane
        policy = lane.policy
        exchange = request.exchange
        transport = self._transport
        assert transport is not None and exchange is not None
        upstream = request.upstream
        reused = upstream is not None
        if upstream is None:
            sent = time.perf_counter()
        try:
            for attempt in (1, 2):
                if upstream is None:
                    upstream, reused = await lane.pool.acquire()
                    self._send(request, upstream, data)
                try:
                    while not upstream.headed:
                        self._interim(request, upstream)
                        await upstream.wait()
                    self._interim(request, upstream)
                    break
                except UpstreamFailure as failure:
                    upstream.close()
                    # A kept-alive connection the upstream closed just as it was
                    # reused: an idempotent request sent whole is safe to send again, once.
                    retry = (
                        reused
                        and failure.kind is UpstreamError.RESET
                        and not failure.received
                        and request.method in _IDEMPOTENT
                        and request.done
                        and not request.size
                        and not request.chunked
                    )
                    if attempt == 2 or not retry:
                        raise
                    upstream = None
        except UpstreamFailure as failure:
            if request.observation is not None:
                request.observation.unanswered("the upstream did not answer")
            answer = policy.failure(exchange, failure.kind, failure)
            transport.write(self._render(answer, self._closes(request), request))
            return self._closes(request)
        except BaseException:  # the client went away: so does the upstream request
            if upstream is not None:
                upstream.close()
            raise
        assert upstream is not None
        reusable = False  # not if cut short: the upstream may still be owed body bytes
        try:
            close = await self._answer(request, upstream, sent)
            reusable = request.done
            return close
        finally:
            upstream.done(reusable)

    async def _answer(self, request: Request, upstream: Upstream, sent: float) -> bool:
        exchange = request.exchange
        assert exchange is not None
        outcome, fields, named, close = self._opened(request, upstream)
        if outcome is Outcome.NOT_FOUND:
            return await self._miss(request, upstream, fields, sent, close)
        observation = request.observation
        tap = None
        if observation is not None:
            location = next((v for n, v in fields if n.lower() == b"location"), b"")
            if observation.answer(upstream.status, location.decode("latin-1")):
                tap = bytearray()
        out, mode = self._head_of(request, upstream, fields, named, close)
        try:
            close = await self._stream(out, request, upstream, mode, sent, tap) or close
        except asyncio.CancelledError:
            if observation is not None and tap is not None:
                # The client left; what the upstream confirmed is still to be recorded.
                await self._read_for(observation, upstream, tap)
            raise
        if observation is not None and tap is not None:
            whole = upstream.complete and len(tap) <= MAX_INSPECTED_BODY
            observation.answer_body(bytes(tap), whole)
        return close

    async def _read_for(self, observation: Observation, upstream: Upstream, tap: bytearray) -> None:
        """Read the rest of an answer's body for the ID in it, within the read timeout."""
        whole = False
        try:
            async with asyncio.timeout(self._lane.body_timeout):
                while not upstream.complete and len(tap) <= MAX_INSPECTED_BODY:
                    _tap(tap, upstream.take())
                    await upstream.wait()
                _tap(tap, upstream.take())
                whole = upstream.complete and len(tap) <= MAX_INSPECTED_BODY
        except (TimeoutError, UpstreamFailure):
            pass
        observation.answer_body(bytes(tap), whole)

    def _answer_whole(self, request: Request, upstream: Upstream, sent: float) -> bool:
        """`_answer` for an answer all here, not a miss: written back at once."""
        _, fields, named, close = self._opened(request, upstream)
        out, mode = self._head_of(request, upstream, fields, named, close)
        self._write_rest(out, upstream, mode)
        assert request.exchange is not None
        request.exchange.upstream_seconds = time.perf_counter() - sent
        return close or mode == "close"

    def _opened(
        self, request: Request, upstream: Upstream
    ) -> tuple[Outcome | None, list[tuple[bytes, bytes]], set[bytes], bool]:
        """An answer's head arrived: its outcome counted, its end-to-end fields, and
        whether the client's connection closes after it."""
        exchange = request.exchange
        assert exchange is not None
        exchange.status = upstream.status
        outcome = self._lane.policy.count_lookup(exchange, upstream.status)
        framed = upstream.framing == b"length"
        fields, named = end_to_end(upstream.fields, upstream.names, upstream.named, framed)
        close = request.close or self._lane.draining or not request.done  # as _closes
        return outcome, fields, named, close

    def _head_of(
        self,
        request: Request,
        upstream: Upstream,
        fields: list[tuple[bytes, bytes]],
        named: set[bytes],
        close: bool,
        length: bool | None = None,
    ) -> tuple[list[bytes], str]:
        """The answer's status line and fields for the client, and how its body goes:
        `none`, `length`, `chunked` or `close` (delimited by the end of the connection).

        The body keeps the upstream's framing if it has a length (or `length` says so);
        without one it goes chunked, or to an HTTP/1.0 client until the connection closes.
        """
        exchange = request.exchange
        assert exchange is not None
        status = upstream.status
        if length is None:
            length = upstream.framing == b"length"
        if request.method == b"HEAD" or status in BODYLESS:
            mode = "none"
        elif length:
            mode = "length"
        elif request.http10:
            mode = "close"
        else:
            mode = "chunked"
        out = [b"HTTP/1.1 %d " % status, upstream.reason, b"\r\n"]
        for name, value in fields:
            out += (name, b": ", value, b"\r\n")
        if b"date" not in named:
            out += (b"Date: ", self._lane.clock.date(), b"\r\n")
        if exchange.id_generated and b"x-request-id" not in named:
            out += (b"X-Request-ID: ", exchange.request_id.encode(), b"\r\n")
        said_chunked = mode == "none" and upstream.framing == b"chunked" and not request.http10
        request.replied = True
        if mode == "chunked" or said_chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if close or mode == "close":
            out.append(b"Connection: close\r\n")
        elif request.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return out, mode

    def _interim(self, request: Request, upstream: Upstream) -> None:
        """Relay the interim answers come so far (none to HTTP/1.0, RFC 9110 §15.2)."""
        if upstream.interim:
            if not request.http10 and self._transport is not None:
                self._transport.write(b"".join(upstream.interim))
            upstream.interim.clear()

    def _write_rest(self, out: list[bytes], upstream: Upstream, mode: str) -> None:
        """Write `out` with the rest of a whole answer's body."""
        assert self._transport is not None
        chunks = upstream.take()
        if mode != "none":
            framed(out, chunks, mode == "chunked")
        if mode == "chunked":
            last_chunk(out, upstream.trailers)
        self._transport.write(b"".join(out))

    async def _stream(
        self,
        out: list[bytes],
        request: Request,
        upstream: Upstream,
        mode: str,
        sent: float,
        tap: bytearray | None = None,
    ) -> bool:
        """Write `out` and then the body as it comes; True when the connection must close."""
        transport = self._transport
        exchange = request.exchange
        assert transport is not None and exchange is not None
        try:
            while True:
                if upstream.complete:
                    if tap is not None:
                        _tap(tap, upstream.chunks)
                    self._write_rest(out, upstream, mode)
                    exchange.upstream_seconds = time.perf_counter() - sent
                    return mode == "close"
                chunks = upstream.take()
                if tap is not None:
                    _tap(tap, chunks)
                if mode != "none":
                    framed(out, chunks, mode == "chunked")
                if out:
                    transport.write(b"".join(out))
                    out = []
                if self._blocked():
                    assert self._writable is not None
                    await self._writable
                    if self._gone:
                        return True
                await upstream.wait()
        except UpstreamFailure as failure:
            # The head may be out: the only honest answer left is a cut connection.
            self._lane.policy.log_upstream_error(exchange, failure.kind, failure, partial=True)
            if out:
                transport.write(b"".join(out))
            transport.close()
            return True

    async def _miss(
        self,
        request: Request,
        upstream: Upstream,
        fields: list[tuple[bytes, bytes]],
        sent: float,
        close: bool,
    ) -> bool:
        """A lookup the upstream did not find: explained, then relayed or rewritten."""
        policy = self._lane.policy
        exchange = request.exchange
        assert exchange is not None
        query = request.target.partition(b"?")[2].decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        include_deleted = include_deleted_asked(
            next((value for key, value in pairs if key == "include_deleted"), "")
        )
        explanation = await policy.explain_miss(exchange, include_deleted, upstream.status, sent)
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in fields
        )
        headers[REASON_HEADER] = explanation.reason.value
        length = upstream.length if upstream.framing == b"length" else None
        plan = policy.miss_plan(request.method.decode(), headers, length)
        rewritten: bytes | None = None
        if plan is not None:
            try:
                raw = await _whole(upstream, MAX_MERGED_BODY if plan is MissPlan.MERGE else 0)
            except UpstreamFailure as failure:
                answer = policy.failure(exchange, failure.kind, failure, counted=True)
                assert self._transport is not None
                self._transport.write(self._render(answer, close, request))
                return close
            rewritten, content_type = policy.miss_body(
                plan, upstream.status, exchange, explanation, raw
            )
            if content_type is not None:  # a document of our own: none of the upstream's
                headers["Content-Type"] = content_type
                for name in ("Content-Encoding", "ETag", "Content-MD5"):
                    headers.popall(name, None)
            headers.popall("Content-Length", None)
            headers["Content-Length"] = str(len(rewritten))
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        named = {name.lower() for name, _ in fields}
        has_length = True if rewritten is not None else None
        out, mode = self._head_of(request, upstream, fields, named, close, has_length)
        if rewritten is not None:
            assert self._transport is not None
            self._transport.write(b"".join(out) + rewritten)
            exchange.upstream_seconds = time.perf_counter() - sent
            return close
        return await self._stream(out, request, upstream, mode, sent) or close


def _tap(tap: bytearray, chunks: list[bytes]) -> None:
    for chunk in chunks:
        if len(tap) > MAX_INSPECTED_BODY:
            return
        tap += chunk


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


__all__ = ["ClientConnection", "Kind"]
