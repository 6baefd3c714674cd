"""One request at a time of a client connection: answered here, or sent upstream — on
a kept-alive connection at once and its answer awaited without a task, else from a
task — its body following as it is read, its answer handed to the responder."""

import asyncio
import logging
import time

from ..observation import MAX_INSPECTED_BODY
from ..problems import Answer
from ..reasons import UpstreamError
from .answer import framed, last_chunk
from .connection import Client
from .request import Request, Stage
from .respond import Responder, closes, own_answer
from .shared import Shared
from .upstream import Upstream, UpstreamFailure

log = logging.getLogger("session_lens.proxy")

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Members bound once: on Python 3.11 looking one up on its class costs a descriptor call,
# several of them a request on this path.
_HERE, _SENT, _REPLYING = Stage.HERE, Stage.SENT, Stage.REPLYING


class Relay:
    """The requests of one client connection, each answered here or relayed upstream."""

    def __init__(self, lane: Shared, client: Client) -> None:
        self._lane = lane
        self._client = client
        self._responder = Responder(lane, client)
        self._task: asyncio.Task[None] | None = None
        self._direct: tuple[Request, float, bytes] | None = None
        """A request sent on a kept-alive connection, its answer awaited without a task."""

    def start(self, request: Request) -> None:
        """Answer `request` here, or send it upstream."""
        policy = self._lane.policy
        given = request.request_id
        target = request.target.decode("latin-1")
        # `given` passed USABLE_REQUEST_ID_BYTES when the head was read: ASCII.
        exchange = policy.exchange(target, given.decode("ascii") if given else None)
        request.exchange = exchange
        policy.begin()
        answer: Answer | None = None
        if request.refusal is not None:
            answer = policy.refuse(exchange, request.refusal.status, request.refusal.detail)
        else:
            method = request.method.decode()
            path = policy.route_path(request.path)
            observation = None
            if policy.observer is not None:
                observation = policy.observer.observe(exchange, method, path)
                request.observation = observation
            if observation is None or not observation.reads_request:
                request.tap = None
            elif request.done:
                _inspect(request)
            if observation is None:
                answer = policy.lookups.lookup(exchange, method, path)
        if answer is None:
            self._send_upstream(request)
            return
        request.stage = _HERE  # what was read of its body, and what comes, goes
        self._client.ahead -= sum(len(chunk) for chunk in request.body)
        request.body = []
        close = closes(request, self._lane)
        self._client.out.write(own_answer(request, answer, close, self._lane))
        self._client.after(request, close)

    def completed(self, request: Request) -> None:
        """`request`'s body is read to its end: shown to its observation, and its end sent
        upstream if the head went already."""
        if request.observation is not None:
            _inspect(request)
        if request.upstream is not None:
            request.upstream.write(self.body_so_far(request, []), last=True)

    def body_so_far(self, request: Request, out: list[bytes]) -> bytes:
        """`out` with the body read and not yet sent (and its end, if it ended)."""
        if not request.body and not request.chunked:
            return b"".join(out)
        framed(out, request.body, request.chunked)
        if request.done and request.chunked and not request.terminated:
            request.terminated = True
            last_chunk(out, request.trailers)
        self._client.ahead -= sum(len(chunk) for chunk in request.body)
        request.body = []
        self._client.flow()
        return b"".join(out)

    def abandon(self, active: Request | None) -> bool:
        """The client is gone: the request being relayed goes no further, and its upstream
        request with it. True when a task does that (and counts it)."""
        if self._task is not None:
            self._task.cancel()
            return True
        if active is not None and self._direct is not None:
            self._direct = None
            if active.upstream is not None:
                active.upstream.done(reusable=False)
            self._client_left(active)
        return False

    def _send_upstream(self, request: Request) -> None:
        exchange = request.exchange
        assert exchange is not None
        head = self._lane.request_head(request, self._client.peer, exchange.request_id.encode())
        data = self.body_so_far(request, head)
        if request.expect and not request.done and not request.size and not request.http10:
            self._client.out.write(_CONTINUE)
        upstream = self._lane.pool.idle()
        if upstream is None:
            self._task = self._lane.loop.create_task(self._relay(request, data))
            return
        self._direct = (request, time.perf_counter(), data)
        self._send(request, upstream, data)
        upstream.listener = self._heard

    def _send(self, request: Request, upstream: Upstream, data: bytes) -> None:
        """Send the request's head and what there is of its body; the rest follows."""
        request.upstream = upstream
        request.stage = _SENT
        upstream.on_flow = self._client.flow
        if request.body or (request.done and request.chunked and not request.terminated):
            data += self.body_so_far(request, [])  # read while it was being connected
        upstream.send(data, request.method == b"HEAD", request.done)

    def _heard(self) -> None:
        """The upstream read something for the request sent without a task."""
        assert self._direct is not None
        request, sent, data = self._direct
        upstream = request.upstream
        assert upstream is not None and request.exchange is not None
        if upstream.failure is None and not upstream.headed:
            self._responder.interim(request, upstream)
            return  # a head in pieces, or an interim answer
        upstream.listener = None
        self._direct = None
        whole = upstream.failure is None and upstream.complete and request.done
        if not whole or self._lane.policy.lookups.is_miss(request.exchange, upstream.status):
            self._task = self._lane.loop.create_task(self._relay(request, data, sent))
            return
        try:
            close = self._responder.answer_whole(request, upstream, sent)
        finally:
            upstream.done(reusable=_reusable_after(request))
        self._client.after(request, close)

    async def _relay(self, request: Request, data: bytes, sent: float = 0.0) -> None:
        try:
            close = await self._forward(request, data, sent)
        except asyncio.CancelledError:
            self._client_left(request)
            return
        except Exception:  # a fault of ours: said, and the request ends all the same
            self._task = None
            self._failed(request)
            return
        self._task = None
        self._client.after(request, close)

    def _failed(self, request: Request) -> None:
        """Relaying `request` raised: a 500 and a close if none of its answer went out,
        else the connection cut (a truncated answer must not pass for a whole one)."""
        exchange = request.exchange
        assert exchange is not None
        log.exception("relaying a request failed", extra={"request_id": exchange.request_id})
        if request.stage is _REPLYING:
            self._client.out.transport.abort()
            self._client_left(request)
            return
        answer = self._lane.policy.refuse(exchange, 500, "session-lens failed to relay the answer")
        self._client.out.write(own_answer(request, answer, True, self._lane))
        self._client.after(request, True)

    def _client_left(self, request: Request) -> None:
        exchange = request.exchange
        assert exchange is not None
        if request.observation is not None:
            request.observation.unanswered()
        self._lane.policy.finish(exchange)
        log.debug("client went away", extra={"request_id": exchange.request_id})

    async def _forward(self, request: Request, data: bytes, sent: float) -> bool:
        """Relay one request and its answer; True when the connection must close after.

        `data` is the request's head and the body read by then; with `request.upstream`
        set, it went out on a kept-alive connection already (and is sent again only if
        that connection turns out closed).
        """
        exchange = request.exchange
        assert exchange is not None
        if request.upstream is None:
            sent = time.perf_counter()
        try:
            upstream = await self._headed(request, data)
        except UpstreamFailure as failure:
            if request.observation is not None:
                request.observation.unanswered("the upstream did not answer")
            answer = self._lane.policy.failure(exchange, failure.kind, failure)
            close = closes(request, self._lane)
            self._client.out.write(own_answer(request, answer, close, self._lane))
            return close
        reusable = False  # not if cut short: the upstream may still be owed body bytes
        try:
            close = await self._responder.answer(request, upstream, sent)
            reusable = _reusable_after(request)
            return close
        finally:
            upstream.done(reusable)

    async def _headed(self, request: Request, data: bytes) -> Upstream:
        """The upstream connection whose answer to `request` has its head: a kept-alive
        connection the upstream closed just as it was reused is replaced, and an
        idempotent request sent whole sent again on the new one, once."""
        upstream = request.upstream
        reused = upstream is not None
        retried = False
        while True:
            if upstream is None:
                upstream, reused = await self._lane.pool.acquire()
                self._send(request, upstream, data)
            try:
                while not upstream.headed:
                    self._responder.interim(request, upstream)
                    await upstream.wait()
                self._responder.interim(request, upstream)
                return upstream
            except UpstreamFailure as failure:
                upstream.close()
                if retried or not (reused and _retryable(request, failure)):
                    raise
                retried, upstream = True, None
            except BaseException:  # the client went away: so does the upstream request
                upstream.close()
                raise


def _retryable(request: Request, failure: UpstreamFailure) -> bool:
    """Whether `request`, sent on a reused connection that `failure` ended, is safe to
    send again: idempotent, whole, without a body, and nothing of an answer came."""
    return (
        failure.kind is UpstreamError.RESET
        and not failure.received
        and request.method in _IDEMPOTENT
        and request.done
        and not request.size
        and not request.chunked
    )


def _reusable_after(request: Request) -> bool:
    """Whether the upstream connection `request` went on may carry another client's.

    Not if its body was cut short (the upstream may still be owed bytes), nor after
    trailer fields: some servers (aiohttp's among them) take a request's trailers for
    fields of the next request on the connection.
    """
    return request.done and not request.trailers


def _inspect(request: Request) -> None:
    """Show a lifecycle request's whole body to its observation."""
    if request.observation is not None and request.tap is not None:
        whole = len(request.tap) <= MAX_INSPECTED_BODY
        request.observation.request_body(bytes(request.tap), whole)
        request.tap = None
