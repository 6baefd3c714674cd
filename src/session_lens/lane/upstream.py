"""The upstream side of the lane: keep-alive connections, plain or TLS, whose answers
llhttp parses, one request at a time each."""

import asyncio
from collections.abc import Callable
from typing import cast

import httptools

from ..hop import Framing, Target, answer_framing
from ..reasons import UpstreamError
from .answer import interim_head

MAX_RESPONSE_HEAD = 1 << 20
HIGH_WATER = 1 << 18
"""Response bytes buffered from the upstream before its socket is paused."""
IDLE_UPSTREAM = 30.0
"""Idle upstream connections are closed after this long."""
_NONE, _CLOSE = Framing.NONE, Framing.CLOSE
"""Bound once: on Python 3.11 looking a member up on its class costs a descriptor call."""


class UpstreamFailure(Exception):
    """The upstream failed one way or another before its answer was whole."""

    def __init__(self, kind: UpstreamError, detail: str, received: bool = True) -> None:
        super().__init__(detail)
        self.kind = kind
        self.received = received
        """Whether any byte of an answer had arrived."""


class _Headed(Exception):
    """The head of an answer that has no body (to HEAD) is all there is: parsing stops."""


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
        self.on_flow: Callable[[], None] | None = None
        """Told when the upstream stops or starts taking what is written to it."""
        self.write_paused = False
        self.sending = False
        """The request's body is still on its way: the upstream may wait for it."""
        self._reset(False)

    def _reset(self, head_only: bool) -> None:
        self.status = 0
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.names: list[bytes] = []
        self.named: set[bytes] = set()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.interim: list[bytes] = []
        """Interim answers (103 Early Hints...) not yet relayed, as they came."""
        self.framing = _NONE
        self.length: int | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.headed = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.failure: UpstreamFailure | None = None
        self.head_only = head_only
        """The request was a HEAD: the answer has a head only, whatever it says."""
        self._waiter: asyncio.Future[None] | None = None
        self._head_bytes = 0
        self._informational = False
        self._paused = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # Requests

    def send(self, data: bytes, head_only: bool = False, whole: bool = True) -> None:
        """Write a request (or, unless `whole`, its head and the body so far); its answer
        is read into this. The read timeout runs from the end of the request."""
        assert self.transport is not None
        self._reset(head_only)
        self.busy = True
        self.sending = not whole
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(
            self._last_read + self._pool.read_timeout, self._check_timeout
        )
        self.transport.write(data)

    def write(self, data: bytes, last: bool = False) -> None:
        """More of the request's body; `last` when it ends the request."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        if last:
            self.sending = False
            self._last_read = self._loop.time()

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

    def done(self, reusable: bool = True) -> None:
        """The answer was relayed: back to the pool if the connection can be reused."""
        self.busy = False
        self.listener = None
        self.on_flow = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reusable and self.complete and self.failure is None and self.keep_alive:
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

    def _tell(self) -> None:
        if self.listener is not None:
            self.listener()

    def _fail(self, failure: UpstreamFailure) -> None:
        if self.failure is None and not self.complete:
            self.failure = failure
            self._wake()
            self._tell()

    def _check_timeout(self) -> None:
        self._timer = None
        if self.complete or self.failure is not None:
            return
        now = self._loop.time()
        deadline = self._last_read + self._pool.read_timeout
        if self._paused or self.sending or now < deadline:  # then the client is the slow one
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
        if self.write_paused:
            self.resume_writing()
        clean = exc is None and self.failure is None
        if self.headed and self.framing is _CLOSE and not self.complete and clean:
            self.complete = True  # a close-delimited body ends with the connection
            self._wake()
            self._tell()
            return
        self._fail(_lost(self.headed, exc, self.received))

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.on_flow is not None:
            self.on_flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_flow is not None:
            self.on_flow()

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
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamFailure(UpstreamError.PROTOCOL, "an upgrade nobody asked for"))
            self.close()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Headed):
                # An answer to HEAD ends with its head; anything after it spoils the connection.
                self._parser = httptools.HttpResponseParser(self)
                self.keep_alive = self.keep_alive and data.endswith(b"\r\n\r\n")
                self.complete = True
                self._wake()
            else:
                self.keep_alive = False
                self._fail(UpstreamFailure(UpstreamError.PROTOCOL, f"malformed response: {exc}"))
                self.close()
                return
        if self.listener is not None:
            self.listener()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: nothing to trust here
            raise ValueError("bytes after a whole answer")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headed:
            self.trailers.append((name, value))
        else:
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: relayed as it comes, but 100 and 101
            self._informational = True
            if status not in (100, 101):
                self.interim.append(interim_head(status, self.reason, self.fields))
                self._wake()
            return
        self.status = status
        self.framing, self.length, self.names, self.named = answer_framing(status, self.fields)
        self.headed = True
        if self.head_only:
            self.keep_alive = self._parser.should_keep_alive()
            raise _Headed
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


def _lost(headed: bool, exc: Exception | None, received: bool) -> UpstreamFailure:
    """What a connection lost before its answer was whole means: a body shorter than
    its framing promised once the head came, else a reset."""
    if headed:
        return UpstreamFailure(UpstreamError.PROTOCOL, "the body was cut short")
    detail = f"{type(exc).__name__}: {exc}" if exc else "the connection was closed"
    return UpstreamFailure(UpstreamError.RESET, detail, received)


class Pool:
    """Keep-alive connections to the upstream, newest idle first."""

    def __init__(self, target: Target, connect_timeout: float, read_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._target = target
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[Upstream] = []
        self._all: set[Upstream] = set()

    def idle(self) -> Upstream | None:
        """A kept-alive connection ready at once, if there is one."""
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection
        return None

    async def acquire(self) -> tuple[Upstream, bool]:
        """A connection, and whether it was used before."""
        reused = self.idle()
        if reused is not None:
            return reused, True
        target = self._target
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await self.loop.create_connection(
                    lambda: Upstream(self),
                    target.host,
                    target.port,
                    ssl=target.tls,
                    server_hostname=target.host if target.tls is not None else None,
                )
        except TimeoutError:
            raise UpstreamFailure(UpstreamError.TIMEOUT, "connect timed out", False) from None
        except OSError as exc:  # refused, unreachable, or a TLS handshake that failed
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
