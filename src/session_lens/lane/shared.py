"""What the lane's connections share, apart from the listener that owns them: the
policy, the upstream pool, the clock, the client rules, and how a request's head is
written for the upstream."""

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..config import Config
from ..hop import Target, appended
from ..policy import Policy
from .answer import Clock, add_fields
from .request import Request
from .upstream import Pool


class Accepted(Protocol):
    """A client connection, as the listener that accepted it sees it."""

    def check(self, now: float) -> None: ...
    def close_if_idle(self, longer_than: float = 0.0) -> None: ...
    def abort(self) -> None: ...


class Shared:
    """What the lane's connections share: the policy, the upstream pool, the clock."""

    def __init__(self, policy: Policy, config: Config, target: Target) -> None:
        self.policy = policy
        self.clock = Clock()
        self._target = target
        self._config = config
        self._pool: Pool | None = None
        self.loop = asyncio.get_event_loop()
        self.connections: set[Accepted] = set()
        self.fallback: Callable[[], asyncio.Protocol] = _no_fallback
        """aiohttp's server, for WebSocket upgrades."""
        self.fallback_connections: Callable[[], int] = lambda: 0
        self.drain = policy.drain
        """The process's drain: once it has begun, no connection is kept alive."""
        self.header_timeout = config.header_read_timeout.total_seconds()
        self.body_timeout = config.upstream_read_timeout.total_seconds()
        """The longest silence within a request body on its way upstream."""
        self.send_timeout = config.send_timeout.total_seconds()
        self.lingering_timeout = config.lingering_timeout.total_seconds()
        self.max_connections = config.max_connections

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(
                self._target,
                self._config.upstream_connect_timeout.total_seconds(),
                self._config.upstream_read_timeout.total_seconds(),
            )
        return self._pool

    def hand_over(self, connection: Accepted, transport: asyncio.Transport, data: bytes) -> None:
        """Give a client's connection, with what was read of it, to aiohttp's server."""
        self.connections.discard(connection)
        protocol = self.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)
        transport.resume_reading()  # paused while the upgrade waited its turn

    def request_head(self, request: Request, peer: bytes, request_id: bytes) -> list[bytes]:
        """The request head as the upstream gets it: hop-by-hop fields out, X-Forwarded-* in."""
        upstream = self._target
        target = request.target if request.target == b"*" else upstream.prefix + request.target
        out = [request.method, b" ", target, b" HTTP/1.1\r\n"]
        if request.host is None:  # HTTP/1.0 may leave it out; 1.1 may not
            out += (b"Host: ", upstream.authority, b"\r\n")
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
                out += (b"X-Forwarded-For: ", appended(forwarded.get(b"x-forwarded-for", ()), peer))
                out.append(b"\r\n")
            proto = appended(forwarded.get(b"x-forwarded-proto", ()), b"http")
            out += (b"X-Forwarded-Proto: ", proto, b"\r\n")
            if request.host is not None:
                host = appended(forwarded.get(b"x-forwarded-host", ()), request.host)
                out += (b"X-Forwarded-Host: ", host, b"\r\n")
        if request.request_id is None:
            out += (b"X-Request-ID: ", request_id, b"\r\n")
        if request.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(b"\r\n")
        return out


def _no_fallback() -> asyncio.Protocol:
    raise RuntimeError("the lane has no server for WebSocket upgrades")
