"""The lane's shared state, and the listener whose connections start in it."""

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from aiohttp import web

from ..config import Config
from ..policy import Policy, problem_answer
from .answer import Clock, add_fields, render
from .client import DRAIN_IDLE, ClientConnection
from .upstream import Pool

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger("session_lens.proxy")

SWEEP_EVERY = 0.5


class Lane:
    """What the lane's connections share: the policy, the upstream pool, the clock."""

    def __init__(self, policy: Policy, config: Config) -> None:
        parts = urlsplit(config.upstream)
        self.policy = policy
        self.clock = Clock()
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._authority = parts.netloc.rpartition("@")[2].encode()
        self._prefix = parts.path.rstrip("/").encode()
        self._config = config
        self._pool: Pool | None = None
        self.loop = asyncio.get_event_loop()
        self.connections: set[ClientConnection] = set()
        self.fallback: Callable[[], asyncio.Protocol] = _no_fallback
        """aiohttp's server, for WebSocket upgrades."""
        self.fallback_connections: Callable[[], int] = lambda: 0
        self._sweeper: asyncio.Task[None] | None = None
        self.draining = False
        self.header_timeout = config.header_read_timeout.total_seconds()
        self.body_timeout = config.upstream_read_timeout.total_seconds()
        """The longest silence within a request body on its way upstream."""
        self.send_timeout = config.send_timeout.total_seconds()
        self.lingering_timeout = config.lingering_timeout.total_seconds()
        self.max_connections = config.max_connections
        self._refusal_logged = 0.0

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            tls = None
            if self._tls:
                ca = self._config.upstream_ca_file
                tls = ssl.create_default_context(cafile=str(ca) if ca else None)
            self._pool = Pool(
                self._host,
                self._port,
                self._config.upstream_connect_timeout.total_seconds(),
                self._config.upstream_read_timeout.total_seconds(),
                tls,
            )
        return self._pool

    def request_head(self, request: "Request", peer: bytes, request_id: bytes) -> list[bytes]:
        """The request head as the upstream gets it: hop-by-hop fields out, X-Forwarded-* in."""
        target = request.target if request.target == b"*" else self._prefix + request.target
        out = [request.method, b" ", target, b" HTTP/1.1\r\n"]
        if request.host is None:  # HTTP/1.0 may leave it out; 1.1 may not
            out += (b"Host: ", self._authority, b"\r\n")
        add_fields(out, request.fields)
        forwarded = request.forwarded
        if not forwarded:  # as most requests come: nothing to append to
            if peer:
                out += (b"X-Forwarded-For: ", peer, b"\r\n")
            out.append(b"X-Forwarded-Proto: http\r\n")
            if request.host is not None:
                out += (b"X-Forwarded-Host: ", request.host, b"\r\n")
        else:
            if peer:
                out += (b"X-Forwarded-For: ", _folded(forwarded.get(b"x-forwarded-for"), peer))
            proto = _folded(forwarded.get(b"x-forwarded-proto"), b"http")
            out += (b"X-Forwarded-Proto: ", proto)
            if request.host is not None:
                host = _folded(forwarded.get(b"x-forwarded-host"), request.host)
                out += (b"X-Forwarded-Host: ", host)
        if request.request_id is None:
            out += (b"X-Request-ID: ", request_id, b"\r\n")
        if request.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(b"\r\n")
        return out

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
        return _Refused(self.clock.date())

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
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = self.loop.time()
            if self._pool is not None:
                self._pool.sweep(now)
            for connection in list(self.connections):
                connection.check(now)


def _folded(previous: list[bytes] | None, value: bytes) -> bytes:
    if previous:
        return b", ".join((*previous, value)) + b"\r\n"
    return value + b"\r\n"


def _no_fallback() -> asyncio.Protocol:
    raise RuntimeError("the lane has no server for WebSocket upgrades")


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
    """A TCP site whose connections start in the lane; aiohttp's server takes the
    WebSocket upgrades.

    Stopping it takes in the connections the kernel has already queued on the
    listener before closing it: closed with them queued, it would reset them, and
    with SO_REUSEPORT the kernel queues connections to every listener of the port
    until it closes (a rolling restart would lose them).
    """

    __slots__ = ("_lane",)

    def __init__(self, runner: web.BaseRunner, lane: Lane, *args: Any, **kwargs: Any):
        super().__init__(runner, *args, **kwargs)
        self._lane = lane

    async def start(self) -> None:
        await web.BaseSite.start(self)
        fallback = self._runner.server
        assert fallback is not None
        lane = self._lane
        lane.fallback = fallback
        lane.fallback_connections = lambda: len(fallback.connections)
        self._server = await asyncio.get_running_loop().create_server(
            lane.accept,
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
