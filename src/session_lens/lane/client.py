"""The client side of the lane: one connection, its requests answered in order.

Every request of HTTP/1.0 and 1.1 is read here, whatever its method, framing or
size: the reader parses heads and bodies with llhttp (httptools), strictly; the relay
answers each request or sends it upstream, in order, bodies streamed both ways with
backpressure; the writer is what goes back. A head llhttp refuses gets a 400 and the
connection closes. Only a WebSocket upgrade leaves the lane: its connection goes to
aiohttp's server, which relays frames.

The same client rules hold for every request on the connection: a head must
arrive within `header_read_timeout`, a body may not pass `max_body_bytes`, an
answer must be taken within `send_timeout`, and an idle connection closes after
`IDLE_CLIENT` seconds. A connection closed before all of its request was read
lingers: the answer is written, the write side shut, and what the client still
sends is read and dropped for up to `lingering_timeout`, so that it reads the
answer rather than a reset.
"""

import asyncio
import logging
from collections import deque
from typing import cast

from ..problems import Answer, problem_answer
from .answer import render
from .reader import Reader
from .relay import Relay
from .request import Request, too_large
from .respond import own_answer
from .shared import Shared
from .writer import Writer

log = logging.getLogger("session_lens.proxy")

AHEAD = 1 << 18
"""Request bytes read ahead of the upstream (pipelined, or before it is connected)
before reading from the client pauses."""
MAX_QUEUED = 32
"""Pipelined requests parsed ahead of their turn before reading pauses."""
IDLE_CLIENT = 75.0
"""Idle client connections are closed after this long, as aiohttp does."""


class ClientConnection(asyncio.Protocol):
    """One client connection: requests parsed as they come, answered in order."""

    out: Writer
    """What goes back to the client, from `connection_made` on."""

    def __init__(self, lane: Shared) -> None:
        self._lane = lane
        self._relay = Relay(lane, self)
        self._reader = Reader(lane, self, self._relay.completed)
        self._transport: asyncio.Transport | None = None
        self.peer = b""
        self.gone = False
        """Whether the client has closed the connection."""
        self._paused_reading = False
        self._queue: deque[Request] = deque()
        """Requests parsed and not yet answered, in order; the first is being relayed."""
        self._active: Request | None = None
        self.ahead = 0
        """Body bytes read and not yet sent upstream."""
        self._advancing = False
        self._final: Answer | None = None
        """What the connection ends with once the queue is answered (400, 408)."""
        self._ended = False
        """Nothing more is read: the connection closes once what was read is answered."""
        self._upgrade: bytes | None = None
        """Bytes after a WebSocket upgrade's head, held for aiohttp."""
        self._since = 0.0
        """When the connection last went idle."""
        self._silent = True
        """Nothing has come yet: closed after `header_read_timeout`, not the idle time."""
        lane.connections.add(self)  # counted from accept on: a burst cannot pass the cap

    # Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.out = Writer(self._lane, self._transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0]).encode()
        self._since = self._lane.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._lane.connections.discard(self)
        self._abandon()
        self.out.lost()

    def data_received(self, data: bytes) -> None:
        self._silent = False
        if self._upgrade is not None:  # a WebSocket's first frames, for aiohttp
            self._upgrade += data
            return
        if self._ended:  # the connection ends: what comes is dropped
            self.out.dropped(len(data))
            return
        self._reader.parse(data)
        if self._active is None or self.ahead > AHEAD or len(self._queue) > MAX_QUEUED:
            self._advance()

    def pause_writing(self) -> None:
        self.out.pause()
        self.flow()

    def resume_writing(self) -> None:
        self.out.resume()
        self._advance()

    # What the reader finds

    def parsed(self, request: Request) -> None:
        self._queue.append(request)
        if request.refusal is not None:  # answered from its head: nothing after it is read
            self._ended = True

    def websocket(self, data: bytes) -> None:
        self._upgrade = data
        self.flow()

    def fail(self, status: int, detail: str) -> None:
        """End the connection with `status` once the requests before are answered."""
        if self._final is not None:
            return
        log.info(
            "request refused",
            extra={"peer": self.peer.decode(), "status": status, "detail": detail},
        )
        answer = problem_answer(status, detail)
        self._ended = True
        reading = self._reader.stop()
        if reading is not None and reading is self._active:
            self._end_now(reading, answer)  # its body is broken while it is relayed
            return
        if reading is not None:
            self._queue.remove(reading)  # its body is broken: it is never relayed
        self._final = answer

    def over_limit(self, request: Request) -> None:
        """A body went past `max_body_bytes`: 413 if nothing was answered yet, and the end."""
        self._ended = True  # nothing after it is read
        refusal = too_large(self._lane.policy.max_body)
        if request is not self._active:
            request.refusal = refusal
            request.close = True
        elif request.replied:
            self._end_now(request, None)
        else:
            assert request.exchange is not None
            status, detail = refusal.status, refusal.detail
            self._end_now(request, self._lane.policy.refuse(request.exchange, status, detail))

    def _end_now(self, request: Request, answer: Answer | None) -> None:
        """`request`, being relayed, cannot go on: `answer` (None when its answer has
        begun), and the connection closes; the upstream must not take a cut body for a
        whole one."""
        exchange = request.exchange
        assert exchange is not None
        if answer is not None and not request.replied and not self.out.transport.is_closing():
            exchange.status = answer.status
            self.out.write(own_answer(request, answer, True, self._lane))
        if request.upstream is not None:
            request.upstream.close()
        self._queue.clear()
        self._close(linger=True)
        self._abandon()

    def _abandon(self) -> None:
        """The request being relayed goes no further, and its upstream request with it."""
        self._ended = True
        if not self._relay.abandon(self._active):
            self._active = None

    # Client rules

    def close_if_idle(self, longer_than: float = 0.0) -> None:
        if self._transport is None:
            return
        idle = self._idle_for(self._lane.loop.time())
        if idle is not None and idle >= longer_than:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def check(self, now: float) -> None:
        """Close a connection idle too long or whose client stopped taking its answers, or
        answer 408 to a head or a body too slow to arrive."""
        if self._transport is None or self._upgrade is not None:
            return
        if self.out.cut_if_stalled(now, self.peer):
            return
        late = None if self._paused_reading else self._reader.late(now)
        if late is not None:
            log.info(f"request {late} timed out", extra={"peer": self.peer.decode()})
            self.fail(408, f"the request {late} did not arrive in time")
            self._advance()
        elif (self._idle_for(now) or 0.0) > (
            self._lane.header_timeout if self._silent else IDLE_CLIENT
        ):
            self._transport.close()

    def _idle_for(self, now: float) -> float | None:
        """How long the connection has been idle; None while it is not: something queued,
        a head being read, or lingering (a lingering connection closes by itself)."""
        if self._queue or self._reader.in_head or self.out.lingering is not None:
            return None
        return now - self._since

    def _close(self, linger: bool) -> None:
        """Close once what was written is out, lingering if `linger` (see `Writer.close`)."""
        self._ended = True
        self._upgrade = None  # a WebSocket upgrade queued behind goes with the connection
        if self.out.close(linger, self.gone) and self._paused_reading:
            self._paused_reading = False
            self.out.transport.resume_reading()

    def flow(self) -> None:
        """Read from the client unless it does not read its answers, the upstream does not
        take the body, or plenty has been read ahead."""
        transport = self._transport
        if transport is None or self.gone or transport.get_protocol() is not self:
            return
        if self.out.lingering is not None:
            return  # closing: everything is read, and dropped
        active = self._active
        pause = (
            self.out.blocked
            or self.ahead > AHEAD
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
                self._reader.head_started = (
                    self._lane.loop.time()
                )  # a head's time runs while it is read

    # Answering, in order

    def _advance(self) -> None:
        """Start on the first request not yet answered, if nothing is being relayed."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while self._active is None and self._queue and not self.gone:
                if self.out.blocked:
                    break  # the client does not read: the next answer waits
                request = self._queue[0]
                if request.websocket and self._upgrade is not None and request is self._queue[-1]:
                    self._hand_over()
                    return
                self._active = request
                self._relay.start(request)
            idle = self._active is None and not self._queue and not self.gone
            if idle and self._final is not None and self._transport is not None:
                final, self._final = self._final, None
                self.out.write(render(final, self._lane.clock.date(), True))
                self._close(linger=True)
                return
        finally:
            self._advancing = False
        self.flow()

    def _hand_over(self) -> None:
        """Give the connection, with the upgrade request, to aiohttp's server."""
        assert self._transport is not None and self._upgrade is not None
        self._queue.clear()
        data, self._upgrade = self._upgrade, None
        self._lane.hand_over(self, self._transport, data)

    def after(self, request: Request, close: bool) -> None:
        """A request answered: counted, then the connection closes or takes the next one."""
        exchange = request.exchange
        assert exchange is not None
        self._lane.policy.finish(exchange)
        self._active = None
        if self._queue and self._queue[0] is request:
            self._queue.popleft()
        if close or self._transport is None:  # draining, it said so; or it is closed when idle
            unread = not request.done or bool(self._queue) or self._reader.in_head
            self._queue.clear()
            self._close(linger=unread)
            return
        self._since = self._lane.loop.time()
        if self._queue or self._final is not None or self._paused_reading:
            self._advance()
