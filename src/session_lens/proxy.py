"""Forwarding: headers, streamed bodies, WebSocket, upstream failures as 502/504.

Everything a client sends reaches the upstream unchanged except the hop-by-hop
headers, which are dropped both ways, and `X-Forwarded-*` and `X-Request-ID`,
which are appended or added. Bodies are streamed with backpressure and never
read whole. Session lookups with a malformed ID are answered here, before the
upstream is asked.
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .config import Config
from .explain import Explainer, Explanation
from .ids import MAX_ID_LENGTH, IdValidator
from .metrics import Metrics
from .reasons import Kind, Outcome, Reason, Rule, StatusClass, UpstreamError
from .recorder import Event, Recorder
from .routes import (
    Action,
    IdFrom,
    LifecycleMatch,
    LifecycleRoute,
    LifecycleTable,
    RouteMatch,
    RouteTable,
    resolve_pointer,
)
from .websocket import bridge

log = logging.getLogger("session_lens.proxy")

REQUEST_ID = "X-Request-ID"
REASON_HEADER = "X-Session-Not-Found-Reason"
PROBLEM_JSON = "application/problem+json"
LOOKUP_METHODS = frozenset({"GET", "HEAD"})
MAX_MERGED_BODY = 1 << 20
MAX_INSPECTED_BODY = 1 << 20
"""Lifecycle bodies larger than this are relayed without looking for an ID in them."""
MAX_OBSERVED_ID = 128
_STREAMED: Any = object()
OnAnswer = Callable[[aiohttp.ClientResponse], Awaitable[tuple[bytes, bool]]]
"""Larger miss bodies are relayed as they are, the reason in the header alone."""

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
# The hop answers `Expect: 100-continue` itself (aiohttp sends the 100), so the
# upstream is not asked to again: it might never answer it.
_REQUEST_ONLY = frozenset({"expect"})
# Headers the WebSocket client library writes itself for the upstream handshake.
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
# aiohttp's own limit is 8190 bytes a header line; gateways in front of session
# services pass larger cookies and tokens than that, both ways.
MAX_HEADER_BYTES = 65536

_RULE_DETAIL = {
    Rule.MISSING: "the path holds no session ID",
    Rule.TOO_LONG: f"the session ID is longer than {MAX_ID_LENGTH} characters",
    Rule.PATTERN: "the session ID does not match exec_YYYYMMDD_HHMMSS_xxxxxxxx",
    Rule.CALENDAR: "the session ID carries a date or time that does not exist",
    Rule.FUTURE: "the session ID is dated later than now plus the allowed clock skew",
}
_REASON_DETAIL = {
    Reason.INVALID_FORMAT: "the session ID is malformed",
    Reason.NEVER_EXISTED: "the session was never created",
    Reason.CREATING: "the session is being created; the lookup raced its creation",
    Reason.CREATION_FAILED: "the session's creation did not complete",
    Reason.DELETED: "the session was deleted",
    Reason.DELETED_NOT_SERVED: "the session was deleted, and the upstream ignored include_deleted",
    Reason.PURGED: "the session was hard-deleted",
    Reason.ARCHIVED: "the session was archived",
    Reason.NOT_YET_VISIBLE: "the session changed moments ago and is not visible upstream yet",
    Reason.UPSTREAM_INCONSISTENT: "the session is live, but the upstream did not find it",
    Reason.EXPIRED: "the store's own retention has dropped the partition the session was in",
    Reason.PREDATES_TRACKING: "the session is older than session-lens' records:"
    " no evidence either way",
    Reason.UNKNOWN: "no lifecycle evidence could be read in time",
}
_UPSTREAM_DETAIL = {
    UpstreamError.CONNECT: "the upstream could not be reached",
    UpstreamError.RESET: "the upstream closed the connection before answering",
    UpstreamError.TIMEOUT: "the upstream did not answer in time",
    UpstreamError.PROTOCOL: "the upstream sent a malformed response",
}


def end_to_end(headers: MultiMapping[str], extra: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones (RFC 9110 §7.6.1), order and repeats kept."""
    drop = HOP_BY_HOP | extra
    named = headers.getall(hdrs.CONNECTION, ())
    if named:
        drop = drop | {token.strip().lower() for value in named for token in value.split(",")}
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in drop and not lowered.startswith("proxy-"):
            kept.add(name, value)
    return kept


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Append `value` to a list-valued header, folding repeats into one line."""
    previous = headers.popall(name, ())
    headers[name] = ", ".join((*previous, value))


def short_id(session_id: str) -> str:
    """A session ID cut to a length fit to echo back or log."""
    return session_id if len(session_id) <= MAX_ID_LENGTH else session_id[:MAX_ID_LENGTH] + "…"


@dataclass(slots=True, frozen=True)
class Answer:
    """An answer of session-lens' own: an RFC 9457 problem document."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> web.Response:
        """The answer as an aiohttp response."""
        return web.Response(
            status=self.status,
            body=self.body,
            content_type=PROBLEM_JSON,
            headers=CIMultiDict(self.headers),
        )


def problem_answer(
    status: int, detail: str, headers: Iterable[tuple[str, str]] = (), **members: Any
) -> Answer:
    """An RFC 9457 problem document."""
    body = {"title": _phrase(status), "status": status, "detail": detail, **members}
    return Answer(status, json.dumps(body).encode(), tuple(headers))


def problem(
    status: int, detail: str, headers: Iterable[tuple[str, str]] = (), **members: Any
) -> web.Response:
    """An RFC 9457 problem document as an aiohttp response."""
    return problem_answer(status, detail, headers, **members).response()


class MissPlan(Enum):
    """How the body of a miss is rewritten."""

    PROBLEM = "problem"
    MERGE = "merge"


def new_request_id() -> str:
    """A request ID: not a secret, only unique, so no os.urandom per request."""
    return f"{random.getrandbits(128):032x}"


def include_deleted_asked(value: str) -> bool:
    """Whether an `include_deleted` query value asks for deleted sessions."""
    return value.lower() in ("true", "1")


class RelayedResponse(web.StreamResponse):
    """A response that adds no `Server` or `Content-Type` the upstream did not send.

    Its headers wait for the first body bytes, so both leave in one write.
    """

    _send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        absent = [name for name in _NEVER_ADDED if name not in self.headers]
        await super()._prepare_headers()
        for name in absent:
            self.headers.popall(name, None)


class RelayedWebSocket(web.WebSocketResponse):
    """The client's side of a relayed WebSocket, adding no `Server` header either."""

    async def _prepare_headers(self) -> None:
        absent = [name for name in _NEVER_ADDED if name not in self.headers]
        await super()._prepare_headers()
        for name in absent:
            self.headers.popall(name, None)


_NEVER_ADDED = (hdrs.SERVER, hdrs.CONTENT_TYPE)


@dataclass(slots=True)
class Exchange:
    """What one request has become so far, for counting and logging."""

    kind: Kind
    target: str
    """The request target in origin form: path and query, as sent."""
    request_id: str
    id_generated: bool
    started: float
    match: RouteMatch | None = None
    status: int = 0
    upstream_seconds: float | None = None
    body_too_large: bool = False


class Proxy:
    """The proxy's request handler; one per app, holding the upstream client."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        explainer: Explainer,
        recorder: Recorder | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._explainer = explainer
        self._recorder = recorder
        self._lifecycle_routes = LifecycleTable(config.lifecycle_routes) if recorder else None
        self._miss_statuses = frozenset(config.miss_statuses)
        self._max_body = config.max_body_bytes
        self._miss_body_mode = config.not_found_body
        self._routes = RouteTable(config.session_routes)
        self._validator = IdValidator(config.max_future_skew, config.id_timezone)
        self._enforce = config.validation == "enforce"
        self._upstream = config.upstream
        self._client: aiohttp.ClientSession | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self.draining = asyncio.Event()
        """Set once shutdown has begun: open WebSockets are closed, /readyz says so."""

    async def open(self) -> None:
        """Open the pooled, keep-alive upstream client."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._config.upstream_connect_timeout.total_seconds(),
            sock_read=self._config.upstream_read_timeout.total_seconds(),
        )
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=(
                hdrs.ACCEPT,
                hdrs.ACCEPT_ENCODING,
                hdrs.USER_AGENT,
                hdrs.CONTENT_TYPE,
            ),
            trust_env=False,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
        )

    async def drain(self, grace: float) -> None:
        """Close open WebSockets and wait up to `grace` seconds for requests in flight."""
        self.draining.set()
        if self._inflight:
            self._idle.clear()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("grace period over", extra={"cut_requests": self._inflight})

    async def close(self) -> None:
        """Close the upstream client and its pooled connections."""
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> aiohttp.ClientSession:
        """The upstream client; only between `open` and `close`."""
        assert self._client is not None, "Proxy.open() was not awaited"
        return self._client

    @property
    def routes(self) -> RouteTable:
        """The session routes lookups are matched against."""
        return self._routes

    @property
    def max_body(self) -> int | None:
        """The largest request body accepted, if there is a limit."""
        return self._max_body

    def lifecycle_match(self, method: str, path: str) -> bool:
        """Whether `method path` is a lifecycle route whose answers are recorded."""
        table = self._lifecycle_routes
        return table is not None and table.match(method, path) is not None

    def begin(self) -> None:
        """Count a request in flight."""
        self._inflight += 1
        self._metrics.inflight.inc()

    def finish(self, exchange: Exchange) -> None:
        """Count a request answered: in flight no more, its status and durations."""
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()
        self._metrics.inflight.dec()
        kind = exchange.kind
        if exchange.status:
            self._metrics.requests[kind, StatusClass.of(exchange.status)].inc()
        self._metrics.request_duration[kind].observe(time.perf_counter() - exchange.started)
        if exchange.upstream_seconds is not None:
            self._metrics.upstream_duration[kind].observe(exchange.upstream_seconds)

    @property
    def idle(self) -> bool:
        """Whether no request is in flight."""
        return not self._inflight

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request: validate a lookup, then forward it."""
        started = time.perf_counter()
        self.begin()
        given_id = request.headers.get(REQUEST_ID)
        request_id = given_id or new_request_id()
        target = request.raw_path
        if not target.startswith("/"):  # absolute form (RFC 9112 §3.2.2): keep path and query
            target = request.rel_url.raw_path_qs
        exchange = Exchange(Kind.PASSTHROUGH, target, request_id, not given_id, started)
        try:
            length = request.content_length
            if self._max_body is not None and length is not None and length > self._max_body:
                return self._too_large(request, exchange)
            if not target.startswith("/"):  # `OPTIONS *` and the like
                exchange.status = 400
                return problem(400, "the request target must be a path", request_id=request_id)
            path = target.partition("?")[0]
            if self._lifecycle_routes is not None:
                found = self._lifecycle_routes.match(request.method, path)
                if found is not None:
                    exchange.kind = Kind.LIFECYCLE
                    return await self._lifecycle(request, exchange, found)
            if request.method in LOOKUP_METHODS:
                exchange.match = self._routes.match(path)
                if exchange.match is not None:
                    exchange.kind = Kind.LOOKUP
                    rejection = self.reject(exchange)
                    if rejection is not None:
                        exchange.status = rejection.status
                        return rejection.response()
            if _is_websocket(request):
                return await self._websocket(request, exchange)
            return await self._forward(request, exchange)
        finally:
            self.finish(exchange)

    def reject(self, exchange: Exchange) -> Answer | None:
        """The answer to a malformed ID in enforce mode; None to forward the request."""
        match, request_id = exchange.match, exchange.request_id
        assert match is not None
        rule = self._validator.check(match.session_id)
        if rule is None:
            return None
        exemplar = self._metrics.exemplar(match.session_id, request_id)
        self._metrics.invalid_ids[match.route, rule].inc(exemplar=exemplar)
        self._metrics.lookups[match.route, Outcome.INVALID].inc()
        self._metrics.not_found[match.route, Reason.INVALID_FORMAT].inc(exemplar=exemplar)
        log.info(
            "invalid session id",
            extra={
                "request_id": request_id,
                "route": match.route,
                "outcome": Outcome.INVALID.value,
                "reason": Reason.INVALID_FORMAT.value,
                "rule": rule.value,
                "session_id": short_id(match.session_id),
                "enforced": self._enforce,
                "duration_ms": _ms_since(exchange.started),
            },
        )
        if not self._enforce:
            return None
        headers = [(REASON_HEADER, Reason.INVALID_FORMAT.value)]
        if exchange.id_generated:
            headers.append((REQUEST_ID, request_id))
        return problem_answer(
            self._config.invalid_status,
            _RULE_DETAIL[rule],
            headers,
            reason=Reason.INVALID_FORMAT.value,
            rule=rule.value,
            session_id=short_id(match.session_id),
            request_id=request_id,
        )

    def _upstream_headers(
        self, request: web.Request, exchange: Exchange, drop: frozenset[str] = _REQUEST_ONLY
    ) -> CIMultiDict[str]:
        headers = end_to_end(request.headers, drop)
        if request.remote:
            _append(headers, "X-Forwarded-For", request.remote)
        _append(headers, "X-Forwarded-Proto", request.scheme)
        host = request.headers.get(hdrs.HOST)
        if host:
            _append(headers, "X-Forwarded-Host", host)
        if exchange.id_generated:
            headers[REQUEST_ID] = exchange.request_id
        return headers

    def _url(self, exchange: Exchange) -> URL:
        return URL(self._upstream + exchange.target, encoded=True)

    async def _forward(
        self,
        request: web.Request,
        exchange: Exchange,
        data: Any = _STREAMED,
        on_answer: OnAnswer | None = None,
    ) -> web.StreamResponse:
        """Send the request upstream and relay its answer; a miss is explained on the way."""
        headers = self._upstream_headers(request, exchange)
        if data is _STREAMED:
            data = request.content if request.body_exists else None
            if data is not None and self._max_body is not None:
                data = _limited(request.content, self._max_body, exchange)
        sent = time.perf_counter()
        try:
            upstream = await self.client.request(
                request.method,
                self._url(exchange),
                headers=headers,
                data=data,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, BodyTooLarge) as exc:
            if exchange.body_too_large:
                return self._too_large(request, exchange)
            return self._failed(request, exchange, exc)
        try:
            headers = end_to_end(upstream.headers)
            if exchange.id_generated:
                headers.setdefault(REQUEST_ID, exchange.request_id)
            exchange.status = upstream.status
            head, whole = b"", False
            if on_answer is not None:
                head, whole = await on_answer(upstream)
            elif self.count_lookup(exchange, upstream.status) is Outcome.NOT_FOUND:
                include_deleted = include_deleted_asked(request.query.get("include_deleted", ""))
                explanation = await self.explain_miss(
                    exchange, include_deleted, upstream.status, sent
                )
                headers[REASON_HEADER] = explanation.reason.value
                plan = self.miss_plan(request.method, headers, upstream.content_length)
                if plan is not None:
                    raw = await upstream.read() if plan is MissPlan.MERGE else b""
                    status = upstream.status
                    head = self.miss_body(plan, status, headers, exchange, explanation, raw)
                    whole = True
            return await self._relay(request, exchange, upstream, headers, sent, head, whole)
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        exchange: Exchange,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        sent: float,
        head: bytes = b"",
        whole: bool = False,
    ) -> web.StreamResponse:
        """Stream the upstream's answer back; `head` was read already (all of it if `whole`)."""
        if whole:
            headers[hdrs.CONTENT_LENGTH] = str(len(head))
        response = RelayedResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await response.prepare(request)
        content = upstream.content
        try:
            if whole:
                await response.write_eof(head)
            else:
                # What has arrived with the headers goes out with them, in one write;
                # a body that is all here (most small JSON answers) ends there too.
                chunk = head + content.read_nowait()
                while not content.at_eof():
                    await response.write(chunk)
                    chunk = await content.readany()
                await response.write_eof(chunk)
        except (ConnectionError, TimeoutError, aiohttp.ClientError) as exc:
            upstream.close()
            if _client_gone(request):
                log.debug("client went away", extra={"request_id": exchange.request_id})
            else:
                # Headers may be out: the only honest answer left is a cut connection.
                self.log_upstream_error(exchange, _upstream_error(exc), exc, partial=True)
                _hang_up(request)
            return response
        exchange.upstream_seconds = time.perf_counter() - sent
        return response

    async def _lifecycle(
        self, request: web.Request, exchange: Exchange, match: LifecycleMatch
    ) -> web.StreamResponse:
        """Forward a lifecycle request and record what the upstream confirmed."""
        assert self._recorder is not None
        route, session_id = match.route, match.session_id
        data: Any = _STREAMED
        if route.id_from is IdFrom.REQUEST and request.body_exists:
            head, whole = await _read_some(request.content, MAX_INSPECTED_BODY)
            if whole:
                data = head
                session_id = _id_at(head, route.pointer)
            else:  # too large to look into: forwarded as it comes, not recorded
                data = _prefixed(head, request.content)
                log.warning(
                    "lifecycle request body too large to find the ID in",
                    extra={"request_id": exchange.request_id, "route": route.name},
                )
        answered = False

        async def on_answer(upstream: aiohttp.ClientResponse) -> tuple[bytes, bool]:
            nonlocal session_id, answered
            answered = True
            ok = 200 <= upstream.status < 300
            failed = route.action is Action.CREATE and upstream.status >= 500
            head, whole = b"", False
            if route.id_from is IdFrom.RESPONSE and (ok or failed):
                head, whole = await _read_some(upstream.content, MAX_INSPECTED_BODY)
                if whole:
                    session_id = _id_at(head, route.pointer) or session_id
            elif route.id_from is IdFrom.LOCATION and ok:
                session_id = _id_in_location(upstream.headers.get(hdrs.LOCATION, ""))
            if session_id and (ok or failed):
                detail = None if ok else f"the upstream answered {upstream.status}"
                self._record(route, session_id, exchange, ok, detail)
            return head, whole

        try:
            response = await self._forward(request, exchange, data, on_answer)
        except asyncio.CancelledError:
            if not answered and route.action is Action.CREATE and session_id:
                why = (
                    "cut at the end of the shutdown grace period"
                    if self.draining.is_set()
                    else "the client went away first"
                )
                self._record(route, session_id, exchange, False, why)
            raise
        if not answered and route.action is Action.CREATE and session_id:
            self._record(route, session_id, exchange, False, "the upstream did not answer")
        return response

    def _record(
        self,
        route: LifecycleRoute,
        session_id: str,
        exchange: Exchange,
        ok: bool,
        detail: str | None,
    ) -> None:
        assert self._recorder is not None
        usable = _usable_id(session_id)
        if usable is None:
            log.warning(
                "lifecycle event without a usable session id",
                extra={"request_id": exchange.request_id, "route": route.name},
            )
            return
        request_id = _usable_id(exchange.request_id) or "(unprintable)"
        self._recorder.record(Event.new(usable, route.action, request_id, ok, detail))

    def _too_large(self, request: web.Request, exchange: Exchange) -> web.Response:
        """413 for a body over `max_body_bytes`; the connection closes, the rest unread."""
        exchange.status = 413
        log.info(
            "request body too large",
            extra={"request_id": exchange.request_id, "limit": self._max_body},
        )
        headers = [(REQUEST_ID, exchange.request_id)] if exchange.id_generated else []
        response = problem(
            413,
            f"the request body is larger than {self._max_body} bytes",
            headers,
            request_id=exchange.request_id,
        )
        response.force_close()
        return response

    def is_miss(self, exchange: Exchange, status: int) -> bool:
        """Whether `status` answers a lookup with "not found", so the miss is explained."""
        return exchange.match is not None and status in self._miss_statuses

    def count_lookup(self, exchange: Exchange, status: int) -> Outcome | None:
        match = exchange.match
        if match is None:
            return None
        if 200 <= status < 300:
            outcome = Outcome.FOUND
        elif status in self._miss_statuses:
            outcome = Outcome.NOT_FOUND
        elif status >= 500:
            outcome = Outcome.UPSTREAM_ERROR
        else:
            outcome = Outcome.OTHER
        self._metrics.lookups[match.route, outcome].inc()
        return outcome

    async def explain_miss(
        self, exchange: Exchange, include_deleted: bool, status: int, sent: float
    ) -> Explanation:
        """Classify a miss, count it and log it with the evidence behind the reason."""
        match = exchange.match
        assert match is not None
        exemplar = self._metrics.exemplar(match.session_id, exchange.request_id)
        explanation = await self._explainer.explain_miss(
            match.session_id, include_deleted, exemplar
        )
        self._metrics.not_found[match.route, explanation.reason].inc(exemplar=exemplar)
        log.info(
            "session not found",
            extra={
                "request_id": exchange.request_id,
                "route": match.route,
                "outcome": Outcome.NOT_FOUND.value,
                "reason": explanation.reason.value,
                "session_id": match.session_id,
                "include_deleted": include_deleted,
                "status": status,
                "lifecycle": explanation.lifecycle(),
                "classifier_error": explanation.error,
                "note": explanation.note,
                "upstream_ms": _ms_since(sent),
                "duration_ms": _ms_since(exchange.started),
            },
        )
        return explanation

    def miss_plan(
        self, method: str, headers: MultiMapping[str], length: int | None
    ) -> "MissPlan | None":
        """How a miss's body is rewritten, by `not_found_body`; None relays the upstream's."""
        if self._miss_body_mode == "passthrough" or method == "HEAD":
            return None
        if self._miss_body_mode == "problem":
            return MissPlan.PROBLEM
        mergeable = (
            length is not None
            and length <= MAX_MERGED_BODY
            and _is_json(headers.get(hdrs.CONTENT_TYPE, ""))
            and headers.get(hdrs.CONTENT_ENCODING, "identity").lower() == "identity"
        )
        return MissPlan.MERGE if mergeable else None

    def miss_body(
        self,
        plan: "MissPlan",
        status: int,
        headers: CIMultiDict[str],
        exchange: Exchange,
        explanation: Explanation,
        raw: bytes,
    ) -> bytes:
        """The body a miss goes out with; `raw` is the upstream's whole body when merging."""
        match = exchange.match
        assert match is not None
        members = {
            "reason": explanation.reason.value,
            "session_id": match.session_id,
            "lifecycle": explanation.lifecycle(),
        }
        if plan is MissPlan.PROBLEM:
            headers[hdrs.CONTENT_TYPE] = PROBLEM_JSON
            document = {
                "title": _phrase(status),
                "status": status,
                "detail": _REASON_DETAIL[explanation.reason],
                **members,
                "request_id": exchange.request_id,
            }
            return json.dumps(document).encode()
        try:
            document = json.loads(raw)
        except ValueError:
            return raw
        if not isinstance(document, dict):
            return raw
        if members.keys() & document.keys():
            document["session_lens"] = members  # never overwrite what the upstream said
        else:
            document.update(members)
        return json.dumps(document).encode()

    def _failed(self, request: web.Request, exchange: Exchange, exc: BaseException) -> web.Response:
        """The 502 or 504 that stands in for an answer the upstream never gave."""
        if _client_gone(request):
            # The client left mid-request; nobody is there to answer.
            log.debug("client went away", extra={"request_id": exchange.request_id})
            return web.Response(status=499)
        return self.failure(exchange, _upstream_error(exc), exc).response()

    def failure(self, exchange: Exchange, kind: UpstreamError, exc: BaseException) -> Answer:
        """The 502 or 504 for an upstream that failed `kind`'s way; counted and logged."""
        status = 504 if kind is UpstreamError.TIMEOUT else 502
        exchange.status = status
        if exchange.match is not None:
            self._metrics.lookups[exchange.match.route, Outcome.UPSTREAM_ERROR].inc()
        self.log_upstream_error(exchange, kind, exc)
        headers = [(REQUEST_ID, exchange.request_id)] if exchange.id_generated else []
        return problem_answer(
            status,
            _UPSTREAM_DETAIL[kind],
            headers,
            upstream_error=kind.value,
            request_id=exchange.request_id,
        )

    def log_upstream_error(
        self, exchange: Exchange, kind: UpstreamError, exc: BaseException, partial: bool = False
    ) -> None:
        self._metrics.upstream_errors[kind].inc()
        log.warning(
            "upstream error",
            extra={
                "request_id": exchange.request_id,
                "route": exchange.match.route if exchange.match else None,
                "kind": exchange.kind.value,
                "upstream_error": kind.value,
                "error": f"{type(exc).__name__}: {exc}",
                "response_started": partial,
                "duration_ms": _ms_since(exchange.started),
            },
        )

    async def _websocket(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """Relay a WebSocket both ways: text, binary, ping, pong and close codes."""
        headers = self._upstream_headers(request, exchange, _WS_HANDSHAKE | _REQUEST_ONLY)
        protocols = [
            p.strip()
            for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for p in value.split(",")
            if p.strip()
        ]
        sent = time.perf_counter()
        try:
            upstream = await self.client.ws_connect(
                self._url(exchange),
                headers=headers,
                protocols=protocols,
                autoclose=False,
                autoping=False,
                max_msg_size=0,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The upstream answered, but not with 101: its status and headers go back.
            # (aiohttp does not read the body of a refused upgrade.)
            exchange.status = exc.status
            refusal = RelayedResponse(
                status=exc.status, headers=end_to_end(exc.headers or CIMultiDict())
            )
            refusal.headers.popall(hdrs.CONTENT_LENGTH, None)
            refusal.content_length = 0
            if exchange.id_generated:
                refusal.headers.setdefault(REQUEST_ID, exchange.request_id)
            return refusal
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._failed(request, exchange, exc)
        client = RelayedWebSocket(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            autoping=False,
            max_msg_size=0,
            compress=False,
        )
        # What the upstream said with its 101 (cookies, say) goes to the client too.
        handshake = getattr(upstream, "_response", None)
        if handshake is not None:
            client.headers.extend(end_to_end(handshake.headers, _WS_HANDSHAKE))
        try:
            await client.prepare(request)
            exchange.status = 101
            await bridge(client, upstream, self.draining)
        finally:
            await upstream.close()
            await client.close()
            exchange.upstream_seconds = time.perf_counter() - sent
        return client


def _is_websocket(request: web.Request) -> bool:
    """Whether the request asks for a WebSocket upgrade (RFC 6455 §4.1)."""
    return (
        request.method == "GET"
        and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and "upgrade" in request.headers.get(hdrs.CONNECTION, "").lower()
    )


async def _read_some(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to about `limit` bytes of a body, and whether that was all of it.

    A read that fails returns what came so far as not whole: the relay that goes
    on reading meets the same failure and answers it.
    """
    parts: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            chunk = await content.readany()
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        pass
    return b"".join(parts), False


async def _prefixed(head: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """A body whose first bytes were read already."""
    if head:
        yield head
    async for chunk in rest.iter_any():
        yield chunk


def _id_at(body: bytes, pointer: str) -> str | None:
    """The session ID at a JSON pointer in a body, if there is a usable one."""
    try:
        found = resolve_pointer(json.loads(body), pointer)
    except (ValueError, RecursionError):
        return None
    if isinstance(found, bool) or not isinstance(found, str | int):
        return None
    return _usable_id(str(found))


def _id_in_location(location: str) -> str | None:
    """The last segment of a Location header's path; none when the path ends in '/'."""
    try:
        path = URL(location).raw_path
    except ValueError:
        return None
    return _usable_id(path.rpartition("/")[2])


class BodyTooLarge(Exception):
    """A streamed request body went past `max_body_bytes`."""


async def _limited(
    content: aiohttp.StreamReader, limit: int, exchange: Exchange
) -> AsyncIterator[bytes]:
    """A request body, cut off (and the request failed) past `limit` bytes."""
    total = 0
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > limit:
            exchange.body_too_large = True
            raise BodyTooLarge(limit)
        yield chunk


def _usable_id(text: str) -> str | None:
    """The ID if it is one a lifecycle table can hold, else None."""
    usable = 0 < len(text) <= MAX_OBSERVED_ID and text.isprintable() and text.isascii()
    return text if usable else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Not Found"


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _hang_up(request: web.Request) -> None:
    """Close the client's connection, so a cut-off body cannot pass for a whole one."""
    if request.transport is not None:
        request.transport.close()


def _upstream_error(exc: BaseException) -> UpstreamError:
    """Which way the upstream failed, from the client library's exception."""
    if isinstance(exc, asyncio.TimeoutError):  # ServerTimeoutError is one too
        return UpstreamError.TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError.CONNECT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamError.RESET
    return UpstreamError.PROTOCOL
