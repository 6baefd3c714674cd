"""An answer on its way back from the upstream to the client: its head as the client
gets it, its body streamed with backpressure, a miss explained and its body rewritten,
a lifecycle answer shown to its observation."""

import asyncio
import time

from multidict import CIMultiDict

from ..hop import BODYLESS, Framing, end_to_end
from ..lookups import MAX_MERGED_BODY, REASON_HEADER, MissPlan
from ..observation import MAX_INSPECTED_BODY, Observation
from ..problems import Answer
from ..reasons import Outcome
from .answer import add_fields, framed, last_chunk, render
from .connection import Client
from .request import Request, Stage
from .shared import Shared
from .upstream import Upstream, UpstreamFailure

# Members bound once: on Python 3.11 looking one up on its class costs a descriptor call,
# several of them a request on this path.
_NONE, _LENGTH, _CHUNKED, _CLOSE = Framing.NONE, Framing.LENGTH, Framing.CHUNKED, Framing.CLOSE
_HERE, _REPLYING = Stage.HERE, Stage.REPLYING


def closes(request: Request, lane: Shared) -> bool:
    """Whether the connection closes after `request`'s answer: asked for, draining, or
    answered before its body was all read (what follows it is not sure)."""
    return request.close or lane.drain.draining or not request.done


def own_answer(request: Request, answer: Answer, close: bool, lane: Shared) -> bytes:
    """An answer of session-lens' own to `request`, as bytes on the wire; the request is
    replying from then on (unless answered here from the start)."""
    if request.stage is not _HERE:
        request.stage = _REPLYING
    head_only = request.method == b"HEAD"
    return render(answer, lane.clock.date(), close, head_only, request.http10)


class Responder:
    """The answers to one client connection's requests, one at a time."""

    def __init__(self, lane: Shared, client: Client) -> None:
        self._lane = lane
        self._client = client

    async def answer(self, request: Request, upstream: Upstream, sent: float) -> bool:
        """Relay the answer whose head has come, a miss explained; True when the
        connection must close after it."""
        exchange = request.exchange
        assert exchange is not None
        outcome, fields, named, close = self._opened(request, upstream)
        if outcome is Outcome.NOT_FOUND:
            return await self._miss(request, upstream, fields, sent, close)
        observation = request.observation
        tap = None
        if observation is not None and _shown(observation, upstream.status, fields):
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

    def answer_whole(self, request: Request, upstream: Upstream, sent: float) -> bool:
        """`answer` for an answer all here, not a miss: written back at once (shown first
        to the request's observation, the body too when the ID is in it)."""
        _, fields, named, close = self._opened(request, upstream)
        observation = request.observation
        if observation is not None and _shown(observation, upstream.status, fields):
            body = b"".join(upstream.chunks)
            observation.answer_body(body, len(body) <= MAX_INSPECTED_BODY)
        out, mode = self._head_of(request, upstream, fields, named, close)
        self._write_rest(out, upstream, mode)
        assert request.exchange is not None
        request.exchange.upstream_seconds = time.perf_counter() - sent
        return close or mode is _CLOSE

    def _opened(
        self, request: Request, upstream: Upstream
    ) -> tuple[Outcome | None, list[tuple[bytes, bytes]], set[bytes], bool]:
        """An answer's head arrived: its outcome counted, its end-to-end fields, and
        whether the client's connection closes after it."""
        exchange = request.exchange
        assert exchange is not None
        self._lane.policy.answered(exchange, upstream.status)
        outcome = self._lane.policy.lookups.count(exchange, upstream.status)
        framed = upstream.framing is _LENGTH
        fields, named = end_to_end(upstream.fields, upstream.names, upstream.named, framed)
        return outcome, fields, named, closes(request, self._lane)

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
            length = upstream.framing is _LENGTH
        if request.method == b"HEAD" or status in BODYLESS:
            mode = _NONE
        elif length:
            mode = _LENGTH
        elif request.http10:
            mode = _CLOSE
        else:
            mode = _CHUNKED
        out = [b"HTTP/1.1 %d " % status, upstream.reason, b"\r\n"]
        add_fields(out, fields)
        if b"date" not in named:
            out += (b"Date: ", self._lane.clock.date(), b"\r\n")
        if exchange.id_generated and b"x-request-id" not in named:
            out += (b"X-Request-ID: ", exchange.request_id.encode(), b"\r\n")
        said_chunked = (
            mode is _NONE and not length and upstream.framing is _CHUNKED and not request.http10
        )
        request.stage = _REPLYING
        if mode is _CHUNKED or said_chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if close or mode is _CLOSE:
            out.append(b"Connection: close\r\n")
        elif request.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return out, mode

    def interim(self, request: Request, upstream: Upstream) -> None:
        """Relay the interim answers come so far (none to HTTP/1.0, RFC 9110 §15.2)."""
        if upstream.interim:
            if not request.http10:
                self._client.out.write(b"".join(upstream.interim))
            upstream.interim.clear()

    def _write_rest(self, out: list[bytes], upstream: Upstream, mode: Framing) -> None:
        """Write `out` with the rest of a whole answer's body."""
        chunks = upstream.take()
        if mode is not _NONE:
            framed(out, chunks, mode is _CHUNKED)
        if mode is _CHUNKED:
            last_chunk(out, upstream.trailers)
        self._client.out.write(b"".join(out))

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
        writer = self._client.out
        exchange = request.exchange
        assert exchange is not None
        try:
            while True:
                if upstream.complete:
                    if tap is not None:
                        _tap(tap, upstream.chunks)
                    self._write_rest(out, upstream, mode)
                    exchange.upstream_seconds = time.perf_counter() - sent
                    return mode is _CLOSE
                chunks = upstream.take()
                if tap is not None:
                    _tap(tap, chunks)
                if mode is not _NONE:
                    framed(out, chunks, mode is _CHUNKED)
                if out:
                    writer.write(b"".join(out))
                    out = []
                if writer.blocked:
                    assert writer.writable is not None
                    await writer.writable
                    if self._client.gone:
                        return True
                await upstream.wait()
        except UpstreamFailure as failure:
            # The head may be out: the only honest answer left is a cut connection.
            self._lane.policy.log_upstream_error(exchange, failure.kind, failure, partial=True)
            if out:
                writer.write(b"".join(out))
            writer.transport.close()
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
        lookups = policy.lookups
        explanation = await lookups.explain_miss(exchange, query, upstream.status, sent)
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in fields
        )
        reason = lookups.reason_header(explanation)
        if reason is not None:
            headers[REASON_HEADER] = reason
        length = upstream.length if upstream.framing is _LENGTH else None
        plan = lookups.miss_plan(headers, length)
        head_only = request.method == b"HEAD"
        rewritten: bytes | None = None
        raw: bytes | None = None
        if plan is not None:
            try:
                raw = await self._miss_body(request, upstream, plan)
            except UpstreamFailure as failure:
                answer = policy.failure(exchange, failure.kind, failure, counted=True)
                self._client.out.write(own_answer(request, answer, close, self._lane))
                return close
        if plan is not None and raw is not None:
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
            self._client.out.write(b"".join(out) + (b"" if head_only else rewritten))
            exchange.upstream_seconds = time.perf_counter() - sent
            return close
        return await self._stream(out, request, upstream, mode, sent) or close

    async def _miss_body(
        self, request: Request, upstream: Upstream, plan: MissPlan
    ) -> bytes | None:
        """The upstream's body of a miss, as much as `plan` needs of it (the rest read and
        dropped); None when a HEAD's cannot be had, and its answer is relayed as it is.

        A HEAD answer has no body: to merge the reason into it as into GET's, the upstream
        is asked for GET's, so that the head (its Content-Length above all) is GET's."""
        if plan is not MissPlan.MERGE:
            return b"" if upstream.head_only else await _whole(upstream, 0)
        if not upstream.head_only:
            return await _whole(upstream, MAX_MERGED_BODY)
        return await self._body_as_got(request, upstream.status)

    async def _body_as_got(self, request: Request, status: int) -> bytes | None:
        """The body the upstream answers a GET of a HEAD's target with, if that answer is
        the same miss with a length within MAX_MERGED_BODY; None otherwise."""
        exchange = request.exchange
        assert exchange is not None
        if request.chunked or request.length:  # a HEAD with a body: not sent twice
            return None
        head = self._lane.request_head(request, self._client.peer, exchange.request_id.encode())
        head[0] = b"GET"
        try:
            got, _ = await self._lane.pool.acquire()
        except UpstreamFailure:
            return None
        whole = False
        try:
            got.send(b"".join(head))
            while not got.headed:
                await got.wait()
            fits = got.framing is _LENGTH and (got.length or 0) <= MAX_MERGED_BODY
            if got.status != status or not fits:
                return None
            body = await _whole(got, MAX_MERGED_BODY)
            whole = True
            return body
        except UpstreamFailure:
            return None
        finally:
            got.done(reusable=whole)


def _shown(observation: Observation, status: int, fields: list[tuple[bytes, bytes]]) -> bool:
    """Show an answer's head to its observation; True when it wants the body too."""
    location = next((v for n, v in fields if n.lower() == b"location"), b"")
    return observation.answer(status, location.decode("latin-1"))


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
