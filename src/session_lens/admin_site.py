"""The admin listener's door: the proxy's head and idle timeouts, and a connection
limit of its own, so that it can never take what the proxy needs.

aiohttp's server waits for a request head as long as the client likes; here each
connection is a `_Guarded` wrapper around aiohttp's own handler that answers 408
and closes when a head has been arriving for longer than `header_read_timeout`
(the same rule as the proxy's; the first head is timed from the connection's start,
so one that sends nothing is closed then too); the 408 is written unless an answer is (the
`arrived` middleware says when a handler runs), else the connection just closes.
Idle connections close after the proxy's idle time through aiohttp's keep-alive
timeout (see `server.admin_runner`).
"""

import asyncio
import logging
import time
from typing import cast

import httptools
from aiohttp import web
from aiohttp.typedefs import Handler

from .config import Address
from .lane.answer import Clock, render
from .lane.site import Refused
from .problems import problem_answer

log = logging.getLogger("session_lens.admin")

_LATE = problem_answer(408, "the request head did not arrive in time")
_GUARDS = web.AppKey("guards", dict[asyncio.BaseTransport, "_Guarded"])


class _Guarded(asyncio.Protocol):
    """One admin connection: aiohttp's handler, with a deadline on each request head.

    llhttp reads along only to see where each head begins and ends; aiohttp's own
    parser still reads the requests."""

    __slots__ = (
        "_answering", "_clock", "_deadline", "_guards", "_handler", "_heads", "_heard",
        "_timeout", "_transport",
    )  # fmt: skip

    def __init__(
        self,
        handler: asyncio.Protocol,
        guards: dict[asyncio.BaseTransport, "_Guarded"],
        timeout: float,
        clock: Clock,
    ) -> None:
        self._handler = handler
        self._guards = guards
        self._timeout = timeout
        self._clock = clock
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._heads: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._answering = 0
        self._heard = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._guards[transport] = self
        self._handler.connection_made(transport)
        # The first head is timed from the connection's start: one that sends nothing
        # is closed at the same deadline, not after the idle time.
        self._deadline = asyncio.get_running_loop().call_later(self._timeout, self._late)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._heads is not None:
            try:
                self._heads.feed_data(data)
            except httptools.HttpParserError:  # aiohttp answers it; nothing more to time
                self._heads = None
                self._cancel()
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guards.pop(self._transport, None)
        self._cancel()
        self._handler.connection_lost(exc)

    def answering(self, change: int) -> None:
        """A request's handler starts (+1) or has answered (-1)."""
        self._answering += change

    # llhttp callbacks

    def on_message_begin(self) -> None:
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(self._timeout, self._late)

    def on_headers_complete(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not self._heard:  # silent from the start: nothing to answer
            transport.close()
            return
        log.info("request head timed out", extra={"peer": _peer(transport)})
        if not self._answering:  # nothing of aiohttp's is being written
            transport.write(render(_LATE, self._clock.date(), close=True))
        transport.close()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


@web.middleware
async def arrived(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection's guard while a request of its is being answered."""
    guard = request.app[_GUARDS].get(request.transport) if request.transport else None
    if guard is None:  # served by another site (a test's), with no guard
        return await handler(request)
    guard.answering(+1)
    try:
        return await handler(request)
    finally:
        guard.answering(-1)


def guard_admin(app: web.Application) -> None:
    """Let `AdminSite` time `app`'s request heads (before any other middleware)."""
    app[_GUARDS] = {}
    app.middlewares.insert(0, arrived)


class AdminSite(web.BaseSite):
    """A TCP site for an admin app prepared by `guard_admin`: heads within
    `header_timeout` seconds, at most `max_connections` connections at once."""

    __slots__ = ("_address", "_clock", "_guards", "_header_timeout", "_max", "_refused_at")

    def __init__(
        self,
        runner: web.AppRunner,
        address: Address,
        *,
        header_timeout: float,
        max_connections: int,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._address = address
        self._header_timeout = header_timeout
        self._max = max_connections
        self._clock = Clock()
        self._refused_at = 0.0
        self._guards = runner.app[_GUARDS]

    @property
    def name(self) -> str:
        """The URL listened at, as aiohttp names its sites."""
        return f"http://{self._address}"

    @property
    def port(self) -> int:
        """The port listened on once started (the one asked for before)."""
        server = self._server
        if isinstance(server, asyncio.Server) and server.sockets:
            return int(server.sockets[0].getsockname()[1])
        return self._address.port

    async def start(self) -> None:
        """Listen, each connection guarded, those over the limit refused with a 503."""
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept,
            self._address.host,
            self._address.port,
            backlog=self._backlog,
            reuse_address=True,
        )

    def _accept(self) -> asyncio.Protocol:
        if len(self._guards) >= self._max:
            now = time.monotonic()
            if now - self._refused_at > 10:  # a flood must not flood the log too
                self._refused_at = now
                log.warning(
                    "admin connection limit reached", extra={"admin_max_connections": self._max}
                )
            return Refused(self._clock.date())
        server = self._runner.server
        assert server is not None
        return _Guarded(server(), self._guards, self._header_timeout, self._clock)
