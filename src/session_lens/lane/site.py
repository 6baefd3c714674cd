"""The listener whose connections start in the lane, and their lives: accepted, swept,
drained, closed."""

import asyncio
import logging
import os
import socket
import time
from typing import Any, cast

from aiohttp import web

from ..config import Config
from ..hop import Target
from ..policy import Policy
from ..problems import problem_answer
from .answer import render
from .client import ClientConnection
from .shared import Shared

log = logging.getLogger("session_lens.proxy")

SWEEP_EVERY = 0.5
REFUSED_LINGER = 1.0
REFUSED_LINGERING = 256
DRAIN_IDLE = 0.5
"""Draining, how long a kept-alive connection may stay idle before it is closed.

Closed at once, a client sending its next request at that moment would lose it
(a POST is not sent again); given this long, a busy client's next request comes,
and is answered with `Connection: close`."""


class Lane(Shared):
    """The lane's shared state, with the connections' lives: accepted, swept, drained."""

    def __init__(self, policy: Policy, config: Config, target: Target) -> None:
        super().__init__(policy, config, target)
        self._sweeper: asyncio.Task[None] | None = None
        self._refusal_logged = 0.0

    def accept(self) -> asyncio.Protocol:
        """A new client connection: the lane's, or refused over `max_connections`."""
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        if len(self.connections) + self.fallback_connections() < self.max_connections:
            return ClientConnection(self)
        now = time.monotonic()
        if now - self._refusal_logged > 10:  # a flood must not flood the log too
            self._refusal_logged = now
            log.warning("connection limit reached", extra={"max_connections": self.max_connections})
        return Refused(self.clock.date())

    def close_idle(self) -> None:
        """Draining, close the connections idle now: each other closes after its next
        answer, or once idle."""
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
        self.drain.start()
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._pool is not None:
            self._pool.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = self.loop.time()
            if self._pool is not None:
                self._pool.sweep(now)
            for connection in list(self.connections):
                connection.check(now)


_TOO_MANY = problem_answer(503, "too many connections are open; try again", [("Retry-After", "1")])


class Refused(asyncio.Protocol):
    """A connection over the limit: a 503, then a short linger and a close.

    Closed at once, a connection whose request has already arrived is reset, and
    the reset can take the 503 with it; so the answer is written, the write side
    shut, and what the client sends read and dropped until it closes, for at most
    `REFUSED_LINGER` seconds and 64 KiB. At most `REFUSED_LINGERING` linger at
    once: past that, in a flood, they are closed at once, holding no descriptor.
    """

    lingering = 0

    __slots__ = ("_date", "_dropped", "_timer", "_transport")

    def __init__(self, date: bytes) -> None:
        self._date = date
        self._dropped = 0
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = self._transport = cast(asyncio.Transport, transport)
        writer.write(render(_TOO_MANY, self._date, close=True))
        if Refused.lingering >= REFUSED_LINGERING or not writer.can_write_eof():
            writer.close()
            return
        Refused.lingering += 1
        writer.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, writer.close)

    def data_received(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > 1 << 16 and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            Refused.lingering -= 1


class HopSite(web.BaseSite):
    """A TCP site whose connections start in the lane; aiohttp's server takes the
    WebSocket upgrades.

    Stopping it takes in the connections the kernel has already queued on the
    listener before closing it: closed with them queued, it would reset them, and
    with SO_REUSEPORT the kernel queues connections to every listener of the port
    until it closes (a rolling restart would lose them).
    """

    __slots__ = ("_bound", "_lane", "_listener", "_owner", "_server_args")

    def __init__(
        self,
        runner: web.BaseRunner,
        lane: Lane,
        host: str | None,
        port: int,
        *,
        backlog: int = 128,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._owner = runner
        self._lane = lane
        # loop.create_server's arguments, as TCPSite would pass them.
        self._server_args: dict[str, Any] = {
            "host": host, "port": port, "backlog": backlog, "reuse_port": reuse_port
        }  # fmt: skip
        self._listener: asyncio.Server | None = None
        self._bound: int | None = None

    @property
    def port(self) -> int:
        """The port listened on once started (the one asked for before)."""
        return self._bound if self._bound is not None else int(self._server_args["port"])

    @property
    def name(self) -> str:
        """The URL listened at, as aiohttp names its sites."""
        host = self._server_args["host"] or "0.0.0.0"  # noqa: S104  # a name: aiohttp's for all
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen, with the lane taking the connections and aiohttp's server the upgrades."""
        await super().start()
        fallback = self._owner.server
        assert fallback is not None
        lane = self._lane
        lane.fallback = fallback
        lane.fallback_connections = lambda: len(fallback.connections)
        self._listener = await asyncio.get_running_loop().create_server(
            lane.accept, **self._server_args
        )
        self._bound = self._listener.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening; the connections already queued are taken in, not reset."""
        listener, self._listener = self._listener, None
        if listener is None:
            await super().stop()
            return
        queued: list[socket.socket] = []
        for sock in listener.sockets:
            queued += _queued(sock.fileno())
        listener.close()  # no await since the queue was read: nothing can slip in between
        await super().stop()
        loop = asyncio.get_running_loop()
        for sock in queued:
            await loop.connect_accepted_socket(self._lane.accept, sock)


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
