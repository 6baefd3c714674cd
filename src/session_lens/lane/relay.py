"""Relaying one request upstream and its answer back: the request's head and body
out, the answer's head and body in, a miss explained on its way.

A part of the client connection (`ClientConnection` is a `Relay`), kept apart so that
what happens between the upstream and the client reads on its own.
"""

import asyncio
import time
from urllib.parse import parse_qsl

from multidict import CIMultiDict

from ..hop import Framing, end_to_end
from ..lookups import MAX_MERGED_BODY, REASON_HEADER, MissPlan, include_deleted_asked
from ..observation import MAX_INSPECTED_BODY, Observation
from ..problems import Answer
from ..reasons import Outcome, UpstreamError
from .answer import BODYLESS, add_fields, framed, last_chunk, render
from .request import Request, Stage
from .shared import Shared
from .upstream import Upstream, UpstreamFailure

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"})


class Relay:
    """The upstream side of a client connection's requests, one at a time."""

    _lane: Shared
    _transport: asyncio.Transport | None
    _writable: asyncio.Future[None] | None
    _gone: bool
    _ahead: int
    """Body bytes read and not yet sent upstream."""
    _written: int
    _shut: bool
    """Whether the write side is shut: nothing more is written."""

    def _flow(self) -> None:
        """The connection's: reading from the client follows what can be taken."""
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        """Write to the client; what it has taken of it tells the send timeout."""
        assert self._transport is not None
        if not self._shut:
            self._written += len(data)
            self._transport.write(data)

    def _blocked(self) -> bool:
        """Whether the client is not reading what it was sent."""
        return self._writable is not None and not self._writable.done()

    def _send(self, request: Request, upstream: Upstream, data: bytes) -> None:
        """Send the request's head and what there is of its body; the rest follows."""
        request.upstream = upstream
        request.stage = Stage.SENT
        upstream.on_flow = self._flow
        if request.body or (request.done and request.chunked and not request.terminated):
            data += self._body_so_far(request, [])  # read while it was being connected
        upstream.send(data, request.method == b"HEAD", request.done)

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

    def _closes(self, request: Request) -> bool:
        """Whether the connection closes after `request`'s answer: asked for, draining, or
        answered before its body was all read (what follows it is not sure)."""
        return request.close or self._lane.drain.draining or not request.done

    def _render(self, answer: Answer, close: bool, request: Request) -> bytes:
        if request.stage is not Stage.HERE:
            request.stage = Stage.REPLYING
        head_only = request.method == b"HEAD"
        return render(answer, self._lane.clock.date(), close, head_only, request.http10)

    async def _forward(self, request: Request, data: bytes, sent: float) -> bool:
        """Relay one request and its answer; True when the connection must close after.

        `data` is the request's head and the body read by then; with `request.upstream`
        set, it went out on a kept-alive connection already (and is sent again only if
        that connection turns out closed).
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
            self._write(self._render(answer, self._closes(request), request))
            return self._closes(request)
        except BaseException:  # the client went away: so does the upstream request
            if upstream is not None:
                upstream.close()
            raise
        assert upstream is not None
        reusable = False  # not if cut short: the upstream may still be owed body bytes
        try:
            close = await self._answer(request, upstream, sent)
            reusable = _reusable_after(request)
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
        return close or mode is Framing.CLOSE

    def _opened(
        self, request: Request, upstream: Upstream
    ) -> tuple[Outcome | None, list[tuple[bytes, bytes]], set[bytes], bool]:
        """An answer's head arrived: its outcome counted, its end-to-end fields, and
        whether the client's connection closes after it."""
        exchange = request.exchange
        assert exchange is not None
        exchange.status = upstream.status
        outcome = self._lane.policy.lookups.count(exchange, upstream.status)
        framed = upstream.framing is Framing.LENGTH
        fields, named = end_to_end(upstream.fields, upstream.names, upstream.named, framed)
        return outcome, fields, named, self._closes(request)

    def _head_of(
        self,
        request: Request,
        upstream: Upstream,
        fields: list[tuple[bytes, bytes]],
        named: set[bytes],
        close: bool,
        length: bool | None = None,
    ) -> tuple[list[bytes], Framing]:
        """The answer's status line and fields for the client, and how its body goes:
        `none`, `length`, `chunked` or `close` (delimited by the end of the connection).

        The body keeps the upstream's framing if it has a length (or `length` says so);
        without one it goes chunked, or to an HTTP/1.0 client until the connection closes.
        """
        exchange = request.exchange
        assert exchange is not None
        status = upstream.status
        if length is None:
            length = upstream.framing is Framing.LENGTH
        if request.method == b"HEAD" or status in BODYLESS:
            mode = Framing.NONE
        elif length:
            mode = Framing.LENGTH
        elif request.http10:
            mode = Framing.CLOSE
        else:
            mode = Framing.CHUNKED
        out = [b"HTTP/1.1 %d " % status, upstream.reason, b"\r\n"]
        add_fields(out, fields)
        if b"date" not in named:
            out += (b"Date: ", self._lane.clock.date(), b"\r\n")
        if exchange.id_generated and b"x-request-id" not in named:
            out += (b"X-Request-ID: ", exchange.request_id.encode(), b"\r\n")
        said_chunked = (
            mode is Framing.NONE and upstream.framing is Framing.CHUNKED and not request.http10
        )
        request.stage = Stage.REPLYING
        if mode is Framing.CHUNKED or said_chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if close or mode is Framing.CLOSE:
            out.append(b"Connection: close\r\n")
        elif request.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return out, mode

    def _interim(self, request: Request, upstream: Upstream) -> None:
        """Relay the interim answers come so far (none to HTTP/1.0, RFC 9110 §15.2)."""
        if upstream.interim:
            if not request.http10 and self._transport is not None:
                self._write(b"".join(upstream.interim))
            upstream.interim.clear()

    def _write_rest(self, out: list[bytes], upstream: Upstream, mode: Framing) -> None:
        """Write `out` with the rest of a whole answer's body."""
        chunks = upstream.take()
        if mode is not Framing.NONE:
            framed(out, chunks, mode is Framing.CHUNKED)
        if mode is Framing.CHUNKED:
            last_chunk(out, upstream.trailers)
        self._write(b"".join(out))

    async def _stream(
        self,
        out: list[bytes],
        request: Request,
        upstream: Upstream,
        mode: Framing,
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
                    return mode is Framing.CLOSE
                chunks = upstream.take()
                if tap is not None:
                    _tap(tap, chunks)
                if mode is not Framing.NONE:
                    framed(out, chunks, mode is Framing.CHUNKED)
                if out:
                    self._write(b"".join(out))
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
                self._write(b"".join(out))
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
        lookups = policy.lookups
        explanation = await lookups.explain_miss(exchange, include_deleted, upstream.status, sent)
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in fields
        )
        headers[REASON_HEADER] = explanation.reason.value
        length = upstream.length if upstream.framing is Framing.LENGTH else None
        plan = lookups.miss_plan(request.method.decode(), headers, length)
        rewritten: bytes | None = None
        if plan is not None:
            try:
                raw = await _whole(upstream, MAX_MERGED_BODY if plan is MissPlan.MERGE else 0)
            except UpstreamFailure as failure:
                answer = policy.failure(exchange, failure.kind, failure, counted=True)
                self._write(self._render(answer, close, request))
                return close
            rewritten, content_type = lookups.miss_body(
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
            self._write(b"".join(out) + rewritten)
            exchange.upstream_seconds = time.perf_counter() - sent
            return close
        return await self._stream(out, request, upstream, mode, sent) or close


def _reusable_after(request: Request) -> bool:
    """Whether the upstream connection `request` went on may carry another client's.

    Not if its body was cut short (the upstream may still be owed bytes), nor after
    trailer fields: some servers (aiohttp's among them) take a request's trailers for
    fields of the next request on the connection.
    """
    return request.done and not request.trailers


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
