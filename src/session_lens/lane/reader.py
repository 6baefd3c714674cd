"""Reading a client's requests with llhttp: heads into requests, bodies to where they
go, upgrades but a WebSocket's read through as plain requests."""

from collections.abc import Callable

import httptools

from ..hop import MAX_HEADER_BYTES
from ..observation import MAX_INSPECTED_BODY
from .answer import add_fields, framed
from .connection import Client
from .request import Refusal, Request, Stage, read_head
from .shared import Shared

MAX_HEAD = 1 << 18
"""The largest request head, all fields together."""
_HERE = Stage.HERE
"""Bound once: on Python 3.11 looking a member up on its class costs a descriptor call."""
_PRIOR_KNOWLEDGE = "Pause on PRI/Upgrade"
"""What llhttp says of `PRI * HTTP/2.0`, an HTTP/2 client's first line."""


class _Stopped(Exception):
    """Nothing more of what the client sent is parsed."""


class Reader:
    """llhttp's callbacks for one client connection, and what they make of its bytes."""

    def __init__(self, lane: Shared, client: Client, completed: Callable[[Request], None]) -> None:
        self._lane = lane
        self._loop = lane.loop
        self._client = client
        self._completed = completed
        """Told when a request's body has been read to its end."""
        self._parser = httptools.HttpRequestParser(self)
        self.in_head = False
        """Whether a head is being read."""
        self.head_started = 0.0
        """When the head being read began (or reading resumed)."""
        self._head_bytes = 0
        self._url: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] = []
        self.reading: Request | None = None
        """The request whose body is being read."""
        self._last: Request | None = None
        self._resuming: Request | None = None
        """An upgrade's request whose body a new parser is set to read."""

    def parse(self, data: bytes) -> None:
        """Parse what the client sent, past every upgrade's head but a WebSocket's."""
        while data:
            if not self.in_head:
                self._head_bytes = 0
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                offset: int = upgrade.args[0]
                data = self._upgraded(data[offset:])
                continue
            except httptools.HttpParserError as exc:
                refusal = exc.__context__
                if isinstance(refusal, Refusal):
                    self._client.fail(refusal.status, refusal.detail)
                elif str(exc) == _PRIOR_KNOWLEDGE:  # HTTP/2's connection preface
                    self._client.fail(
                        505, "HTTP/2 is not served; HTTP/1.1 is (h2c upgrades included)"
                    )
                elif not isinstance(refusal, _Stopped):
                    self._client.fail(400, f"the request is malformed: {exc}")
                return
            if self.in_head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._client.fail(400, f"the request head is larger than {MAX_HEAD} bytes")
            return

    def late(self, now: float) -> str | None:
        """What is overdue at `now`: a `head` past `header_read_timeout`, or a `body` on
        its way upstream silent for the read timeout; None if nothing is."""
        lane, reading = self._lane, self.reading
        if self.in_head:
            return "head" if now - self.head_started > lane.header_timeout else None
        if reading is not None and reading.upstream is not None:
            silent = now - max(reading.read_at, self.head_started)
            return "body" if silent > lane.body_timeout else None
        return None

    def stop(self) -> Request | None:
        """Read no more: the request whose body was being read, if one was."""
        self.in_head = False
        reading, self.reading = self.reading, None
        return reading

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_started = self._loop.time()
        self._url = []
        self._fields = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise Refusal(400, f"a header field is larger than {MAX_HEADER_BYTES} bytes")
        value = value.rstrip(b" \t")
        if self.in_head:
            self._fields.append((name, value))
        elif self.reading is not None:
            self.reading.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self._resuming is not None:  # the head made up to read an upgrade's body
            self.reading, self._resuming = self._resuming, None
            self.reading.upgrade_body = False  # its body follows, and ends it
            return
        request = read_head(self._parser, b"".join(self._url), self._fields, self._lane.policy)
        self._last = request
        self._client.parsed(request)
        if request.refusal is not None:  # answered from its head: nothing after it is read
            raise _Stopped
        self.reading = request

    def on_body(self, body: bytes) -> None:
        request = self.reading
        if request is None:
            raise _Stopped
        request.size += len(body)
        request.read_at = self._loop.time()
        limit = self._lane.policy.max_body
        if limit is not None and request.size > limit:
            self.reading = None
            self._client.over_limit(request)
            raise _Stopped
        if request.tap is not None and len(request.tap) <= MAX_INSPECTED_BODY:
            request.tap += body
        if request.stage is _HERE:
            return  # answered here: the body is read and dropped
        if request.upstream is not None:
            out: list[bytes] = []
            framed(out, [body], request.chunked)
            request.upstream.write(b"".join(out))
            return
        request.body.append(body)
        self._client.ahead += len(body)

    def on_message_complete(self) -> None:
        request = self.reading
        if request is None:
            raise _Stopped
        if request.upgrade_body:
            return  # llhttp skipped its body: `_upgraded` has it read
        self.reading = None
        request.done = True
        self._completed(request)

    # Upgrades

    def _upgraded(self, rest: bytes) -> bytes:
        """llhttp stopped at an upgrade's head: a WebSocket goes to aiohttp with `rest`;
        any other upgrade is a plain HTTP/1.1 request, its body read as its body and what
        follows as the next request (its Upgrade header goes no further). What is left
        to parse."""
        request = self._last
        if request is not None and request.websocket:
            self._client.websocket(self._websocket_head(request) + rest)
            return b""
        self._parser = httptools.HttpRequestParser(self)
        if request is not None and request.upgrade_body and request is self.reading:
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
