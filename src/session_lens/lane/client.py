"""The client side of the lane: one connection, its requests parsed by llhttp.

Every request of HTTP/1.0 and 1.1 is read here, whatever its method, framing or
size: heads and bodies are parsed by llhttp (httptools), strictly, and relayed
in order, bodies streamed both ways with backpressure. A head llhttp refuses
gets a 400 and the connection closes. Only a WebSocket upgrade leaves the lane:
its connection goes to aiohttp's server, which relays frames.

The same client rules hold for every request on the connection: a head must
arrive within `header_read_timeout`, a body may not pass `max_body_bytes`, an
answer must be taken within `send_timeout`, and an idle connection closes after
`IDLE_CLIENT` seconds. A connection closed before all of its request was read
lingers: the answer is written, the write side shut, and what the client still
sends is read and dropped for up to `lingering_timeout`, so that it reads the
answer rather than a reset.
"""

import asyncio
import fcntl
import logging
import struct
import termios
import time
from collections import deque
from typing import cast

import httptools

from ..hop import MAX_HEADER_BYTES
from ..observation import MAX_INSPECTED_BODY
from ..problems import Answer, problem_answer
from .answer import add_fields, framed, render
from .relay import Relay
from .request import Refusal, Request, Stage, read_head, too_large
from .shared import Shared

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
LINGER_BYTES = 1 << 26
"""The most a client may still send once its connection is closing, read and dropped."""
DRAIN_IDLE = 0.5
"""Draining, how long a kept-alive connection may stay idle before it is closed.

Closed at once, a client sending its next request at that moment would lose it
(a POST is not sent again); given this long, a busy client's next request comes,
and is answered with `Connection: close`."""

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PRIOR_KNOWLEDGE = "Pause on PRI/Upgrade"
"""What llhttp says of `PRI * HTTP/2.0`, an HTTP/2 client's first line."""
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
"""The ioctl that reads a socket's unacknowledged bytes (SIOCOUTQ, the same number)."""


def _body_head(request: Request) -> bytes:
    """A head that has llhttp read `request`'s body next, and expect what it expected
    after it."""
    out = [b"POST / HTTP/1.1\r\n"]
    if request.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    else:
        out.append(b"Content-Length: %d\r\n" % request.length)
    if request.close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _unsent_in_kernel(transport: asyncio.Transport) -> int:
    """The bytes of a TCP socket's send queue its peer has not acknowledged (Linux's
    SIOCOUTQ); 0 where that cannot be read."""
    sock = transport.get_extra_info("socket")
    if sock is None or _OUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    unsent: int = struct.unpack("i", raw)[0]
    return unsent


class _Stopped(Exception):
    """Nothing more of what the client sent is parsed."""


class ClientConnection(Relay, asyncio.Protocol):
    """One client connection: requests parsed as they come, answered in order."""

    def __init__(self, lane: Shared) -> None:
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
        self._resuming: Request | None = None
        """An upgrade's request whose body a new parser is set to read."""
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
        self._lingering: asyncio.TimerHandle | None = None
        """Closing: what the client still sends is read and dropped until this fires."""
        self._lingered = 0
        self._shut = False
        self._written = 0
        """Bytes written to the client, its transport's buffer included."""
        self._taken = 0
        """Bytes the client had taken when it last took any."""
        self._taking_since = 0.0
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
        if self._lingering is not None:
            self._lingering.cancel()
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
        if self._ended:  # the connection ends: what comes is dropped
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES and self._transport is not None:
                self._transport.close()
            return
        self._parse(data)
        if self._active is None or self._ahead > AHEAD or len(self._queue) > MAX_QUEUED:
            self._advance()

    def _parse(self, data: bytes) -> None:
        """Parse what the client sent, past every upgrade's head but a WebSocket's."""
        while data:
            if not self._in_head:
                self._head_bytes = 0
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                data = self._upgraded(data[cast(int, upgrade.args[0]) :])
                continue
            except httptools.HttpParserError as exc:
                refusal = exc.__context__
                if isinstance(refusal, Refusal):
                    self._fail(refusal.status, refusal.detail)
                elif str(exc) == _PRIOR_KNOWLEDGE:  # HTTP/2's connection preface
                    self._fail(505, "HTTP/2 is not served; HTTP/1.1 is (h2c upgrades included)")
                elif not isinstance(refusal, _Stopped):
                    self._fail(400, f"the request is malformed: {exc}")
                return
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._fail(400, f"the request head is larger than {MAX_HEAD} bytes")
            return

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
            raise Refusal(400, f"a header field is larger than {MAX_HEADER_BYTES} bytes")
        value = value.rstrip(b" \t")
        if self._in_head:
            self._fields.append((name, value))
        elif self._reading is not None:
            self._reading.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._resuming is not None:  # the head made up to read an upgrade's body
            self._reading, self._resuming = self._resuming, None
            self._reading.upgrade_body = False  # its body follows, and ends it
            return
        request = read_head(self._parser, b"".join(self._url), self._fields, self._lane.policy)
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
        if request.stage is Stage.HERE:
            return  # answered here: the body is read and dropped
        if request.upstream is not None:
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
        if request.upgrade_body:
            return  # llhttp skipped its body: `_upgraded` has it read
        self._reading = None
        request.done = True
        if request.observation is not None:
            self._inspect(request)
        if request.upstream is not None:
            request.upstream.write(self._body_so_far(request, []), last=True)

    def _inspect(self, request: Request) -> None:
        """Show a lifecycle request's whole body to its observation."""
        if request.observation is not None and request.tap is not None:
            whole = len(request.tap) <= MAX_INSPECTED_BODY
            request.observation.request_body(bytes(request.tap), whole)
            request.tap = None

    # Upgrades and failures

    def _upgraded(self, rest: bytes) -> bytes:
        """llhttp stopped at an upgrade's head: a WebSocket goes to aiohttp with `rest`;
        any other upgrade is a plain HTTP/1.1 request, its body read as its body and what
        follows as the next request (its Upgrade header goes no further). What is left
        to parse."""
        request = self._queue[-1] if self._queue else None
        if request is not None and request.websocket:
            self._upgrade = self._websocket_head(request) + rest
            self._flow()
            return b""
        self._parser = httptools.HttpRequestParser(self)
        if request is not None and request.upgrade_body and request is self._reading:
            # llhttp reads no body after an upgrade's head: a head of the same framing
            # puts the new parser where the old one stopped, in the body.
            self._resuming = request
            self._parser.feed_data(_body_head(request))
        return rest

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
            self._write(self._render(answer, True, request))
        if request.upstream is not None:
            request.upstream.close()
        self._queue.clear()
        self._close(linger=True)
        self._abandon()

    # Client rules

    def _over_limit(self, request: Request) -> None:
        """A body went past `max_body_bytes`: 413 if nothing was answered yet, and the end."""
        self._ended = True  # nothing after it is read
        self._reading = None
        refusal = too_large(self._lane.policy.max_body)
        if request is self._active:
            assert request.exchange is not None
            if request.replied:
                self._end_now(request, None)
            else:
                status, detail = refusal.status, refusal.detail
                self._end_now(request, self._lane.policy.refuse(request.exchange, status, detail))
        else:
            request.refusal = refusal
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
        """Close a connection idle too long or whose client stopped taking its answers, or
        answer 408 to a head or a body too slow to arrive."""
        if self._transport is None or self._upgrade is not None or self._stalled(now):
            return
        reading = self._reading
        if self._in_head and not self._paused_reading:
            if now - self._head_started > self._lane.header_timeout:
                log.info("request head timed out", extra={"peer": self._peer.decode()})
                self._fail(408, "the request head did not arrive in time")
                self._advance()
        elif reading is not None and reading.upstream is not None and not self._paused_reading:
            if now - max(reading.read_at, self._head_started) > self._lane.body_timeout:
                log.info("request body timed out", extra={"peer": self._peer.decode()})
                self._fail(408, "the request body did not arrive in time")
        elif not self._queue and now - self._since > IDLE_CLIENT:
            self._transport.close()

    def _stalled(self, now: float) -> bool:
        """Abort the connection if its client has taken nothing for `send_timeout`: its
        requests and their upstream connections go with it."""
        transport = self._transport
        assert transport is not None
        pending = transport.get_write_buffer_size()
        if pending:  # what waits in the kernel is not taken either
            pending += _unsent_in_kernel(transport)
        taken = self._written - pending
        if not pending or taken != self._taken:
            self._taken = taken
            self._taking_since = now
            return False
        if now - self._taking_since < self._lane.send_timeout:
            return False
        log.info(
            "client took nothing in time",
            extra={"peer": self._peer.decode(), "unsent_bytes": pending},
        )
        transport.abort()
        return True

    def _close(self, linger: bool) -> None:
        """Close once what was written is out. With `linger`, when the client may still be
        sending, the write side is shut first and what comes is read and dropped for up
        to `lingering_timeout` (closed at once, the client could get a reset for its
        answer)."""
        transport = self._transport
        assert transport is not None
        self._ended = True
        if self._shut:
            return
        self._shut = True
        if not linger or self._gone or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._lingering is None:
            self._lingering = self._loop.call_later(self._lane.lingering_timeout, transport.close)
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()

    def _flow(self) -> None:
        """Read from the client unless it does not read its answers, the upstream does not
        take the body, or plenty has been read ahead."""
        transport = self._transport
        if transport is None or self._gone or transport.get_protocol() is not self:
            return
        if self._lingering is not None:
            return  # closing: everything is read, and dropped
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
                final, self._final = self._final, None
                self._write(render(final, self._lane.clock.date(), True))
                self._close(linger=True)
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
            answer = policy.refuse(exchange, request.refusal.status, request.refusal.detail)
        else:
            method = request.method.decode()
            observation = None
            if policy.observer is not None:
                observation = policy.observer.observe(exchange, method, request.path)
                request.observation = observation
            if observation is None or not observation.reads_request:
                request.tap = None
            elif request.done:
                self._inspect(request)
            if observation is None:
                answer = policy.lookups.lookup(exchange, method, request.path)
        if answer is not None:
            assert self._transport is not None
            self._drop_body(request)
            self._write(self._render(answer, self._closes(request), request))
            self._after(request, self._closes(request))
            return
        data = self._upstream_request(request)
        if request.expect and not request.done and not request.size and not request.http10:
            self._write(_CONTINUE)
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

    def _drop_body(self, request: Request) -> None:
        """`request` is answered here: what was read of its body, and what comes, goes."""
        request.stage = Stage.HERE
        self._ahead -= sum(len(chunk) for chunk in request.body)
        request.body = []

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
        if not whole or self._lane.policy.lookups.is_miss(request.exchange, upstream.status):
            self._task = self._loop.create_task(self._relay(request, data, sent))
            return
        try:
            close = self._answer_whole(request, upstream, sent)
        finally:
            upstream.done(reusable=not request.trailers)
        self._after(request, close)

    async def _relay(self, request: Request, data: bytes, sent: float = 0.0) -> None:
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
        if close or transport is None:  # draining, it said so; or it is closed when idle
            unread = not request.done or bool(self._queue) or self._in_head
            self._queue.clear()
            self._close(linger=unread)
            return
        self._since = self._loop.time()
        if self._queue or self._final is not None or self._paused_reading:
            self._advance()
