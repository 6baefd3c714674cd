"""What the hop decides about a request and its answer, whatever carries the bytes.

Validation of session IDs, counting, the explanation of misses and the bodies
they go out with, upstream failures as problem documents, and the lifecycle
events observed in traffic. Nothing here touches a socket: the HTTP lane and
the WebSocket path both call it.
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from yarl import URL

from .config import Config, NotFoundBody, Validation
from .explain import Explainer, Explanation
from .ids import MAX_ID_LENGTH
from .metrics import Metrics
from .problems import PROBLEM_JSON, Answer, phrase, problem_answer
from .reasons import Kind, Outcome, Reason, Rule, StatusClass, UpstreamError
from .recorder import Event, Recorder
from .routes import (
    Action,
    IdFrom,
    LifecycleMatch,
    LifecycleTable,
    RouteMatch,
    RouteTable,
    resolve_pointer,
)

log = logging.getLogger("session_lens.proxy")

REQUEST_ID = "X-Request-ID"
REASON_HEADER = "X-Session-Not-Found-Reason"
LOOKUP_METHODS = frozenset({"GET", "HEAD"})
MAX_MERGED_BODY = 1 << 20
"""Larger miss bodies are relayed as they are, the reason in the header alone."""
MAX_INSPECTED_BODY = 1 << 20
"""Lifecycle bodies larger than this are relayed without looking for an ID in them."""
MAX_OBSERVED_ID = 128

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


def short_id(session_id: str) -> str:
    """A session ID cut to a length fit to echo back or log."""
    return session_id if len(session_id) <= MAX_ID_LENGTH else session_id[:MAX_ID_LENGTH] + "…"


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


class Policy:
    """The hop's rules, one instance per process, shared by every connection."""

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
        self.observes = recorder is not None
        """Whether lifecycle events are observed in traffic."""
        self._miss_statuses = frozenset(config.miss_statuses)
        self._miss_body_mode = config.not_found_body
        self._validator = config.id_validator
        self._enforce = config.validation == Validation.ENFORCE
        self.routes = RouteTable(config.session_routes)
        """The session routes lookups are matched against."""
        self.max_body = config.max_body_bytes
        """The largest request body accepted, if there is a limit."""
        self._inflight = 0
        self._idle = asyncio.Event()
        self.draining = asyncio.Event()
        """Set once shutdown has begun: open WebSockets are closed, /readyz says so."""

    # Counting

    def exchange(self, target: str, given_id: str | None) -> Exchange:
        """A request arrived: its exchange, with the request ID it carries or a new one."""
        request_id = given_id or new_request_id()
        return Exchange(Kind.PASSTHROUGH, target, request_id, not given_id, time.perf_counter())

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

    # Lookups

    def lookup(self, exchange: Exchange, method: str, path: str) -> Answer | None:
        """Make `exchange` a lookup if it falls on a session route; the answer to a
        malformed ID in enforce mode, or None to forward the request."""
        if method not in LOOKUP_METHODS:
            return None
        match = self.routes.match(path)
        if match is None:
            return None
        exchange.kind = Kind.LOOKUP
        exchange.match = match
        return self.reject(exchange)

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
        exchange.status = self._config.invalid_status
        return problem_answer(
            self._config.invalid_status,
            _RULE_DETAIL[rule],
            [(REASON_HEADER, Reason.INVALID_FORMAT.value), *self._id_header(exchange)],
            reason=Reason.INVALID_FORMAT.value,
            rule=rule.value,
            session_id=short_id(match.session_id),
            request_id=request_id,
        )

    def is_miss(self, exchange: Exchange, status: int) -> bool:
        """Whether `status` answers a lookup with "not found", so the miss is explained."""
        return exchange.match is not None and status in self._miss_statuses

    def count_lookup(self, exchange: Exchange, status: int) -> Outcome | None:
        """Count the outcome of a lookup's answer; None when it is no lookup."""
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
        self, method: str, headers: Mapping[str, str], length: int | None
    ) -> "MissPlan | None":
        """How a miss's body is rewritten, by `not_found_body`; None relays the upstream's.

        `headers` are the answer's, looked up case-insensitively.
        """
        if self._miss_body_mode == NotFoundBody.PASSTHROUGH or method == "HEAD":
            return None
        if self._miss_body_mode == NotFoundBody.PROBLEM:
            return MissPlan.PROBLEM
        mergeable = (
            length is not None
            and length <= MAX_MERGED_BODY
            and _is_json(headers.get("Content-Type", ""))
            and headers.get("Content-Encoding", "identity").lower() == "identity"
        )
        return MissPlan.MERGE if mergeable else None

    def miss_body(
        self,
        plan: "MissPlan",
        status: int,
        exchange: Exchange,
        explanation: Explanation,
        raw: bytes,
    ) -> tuple[bytes, str | None]:
        """The body a miss goes out with, and its new Content-Type if it changes;
        `raw` is the upstream's whole body when merging."""
        match = exchange.match
        assert match is not None
        members = {
            "reason": explanation.reason.value,
            "session_id": match.session_id,
            "lifecycle": explanation.lifecycle(),
        }
        if plan is MissPlan.PROBLEM:
            document = {
                "title": phrase(status),
                "status": status,
                "detail": _REASON_DETAIL[explanation.reason],
                **members,
                "request_id": exchange.request_id,
            }
            return json.dumps(document).encode(), PROBLEM_JSON
        try:
            document = json.loads(raw)
        except ValueError:
            return raw, None
        if not isinstance(document, dict):
            return raw, None
        if members.keys() & document.keys():
            document["session_lens"] = members  # never overwrite what the upstream said
        else:
            document.update(members)
        return json.dumps(document).encode(), None

    # Answers of our own

    def _id_header(self, exchange: Exchange) -> list[tuple[str, str]]:
        return [(REQUEST_ID, exchange.request_id)] if exchange.id_generated else []

    def refuse(self, exchange: Exchange, status: int, detail: str) -> Answer:
        """An answer of our own to a request we will not forward (400, 413, 505...)."""
        exchange.status = status
        log.info(
            "request refused",
            extra={"request_id": exchange.request_id, "status": status, "detail": detail},
        )
        return problem_answer(
            status, detail, self._id_header(exchange), request_id=exchange.request_id
        )

    def failure(
        self, exchange: Exchange, kind: UpstreamError, exc: BaseException, counted: bool = False
    ) -> Answer:
        """The 502 or 504 for an upstream that failed `kind`'s way; counted (a lookup's
        outcome not again if `counted`) and logged."""
        status = 504 if kind is UpstreamError.TIMEOUT else 502
        exchange.status = status
        if exchange.match is not None and not counted:
            self._metrics.lookups[exchange.match.route, Outcome.UPSTREAM_ERROR].inc()
        self.log_upstream_error(exchange, kind, exc)
        return problem_answer(
            status,
            _UPSTREAM_DETAIL[kind],
            self._id_header(exchange),
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

    # Lifecycle events observed in traffic

    def observe(self, exchange: Exchange, method: str, path: str) -> "Observation | None":
        """An observation of a lifecycle request, if `method path` is a lifecycle route."""
        table = self._lifecycle_routes
        found = table.match(method, path) if table is not None else None
        if found is None:
            return None
        exchange.kind = Kind.LIFECYCLE
        return Observation(self, exchange, found)

    def record(
        self,
        exchange: Exchange,
        found: LifecycleMatch,
        session_id: str,
        ok: bool,
        detail: str | None,
    ) -> None:
        assert self._recorder is not None
        usable = _usable_id(session_id)
        if usable is None:
            log.warning(
                "lifecycle event without a usable session id",
                extra={"request_id": exchange.request_id, "route": found.route.name},
            )
            return
        request_id = _usable_id(exchange.request_id) or "(unprintable)"
        self._recorder.record(Event.new(usable, found.route.action, request_id, ok, detail))


class Observation:
    """One lifecycle request on its way: what it says of its session, recorded once the
    upstream has confirmed it (or failed a creation)."""

    __slots__ = ("_detail", "_exchange", "_found", "_ok", "_policy", "answered", "session_id")

    def __init__(self, policy: Policy, exchange: Exchange, found: LifecycleMatch) -> None:
        self._policy = policy
        self._exchange = exchange
        self._found = found
        self.session_id: str | None = found.session_id
        self.answered = False
        self._ok = False
        self._detail: str | None = None

    @property
    def reads_request(self) -> bool:
        """Whether the ID is in the request body, which is then kept while it is small."""
        return self._found.route.id_from is IdFrom.REQUEST

    def request_body(self, body: bytes, whole: bool) -> None:
        """The request body (its first bytes, unless `whole`), to find the ID in."""
        if whole:
            self.session_id = _id_at(body, self._found.route.pointer)
            return
        log.warning(
            "lifecycle request body too large to find the ID in",
            extra={"request_id": self._exchange.request_id, "route": self._found.route.name},
        )

    def answer(self, status: int, location: str | None) -> bool:
        """The upstream answered; True when the ID is to be read from the body to come
        (handed to `answer_body`), else the event is recorded now."""
        self.answered = True
        route = self._found.route
        self._ok = ok = 200 <= status < 300
        failed = route.action is Action.CREATE and status >= 500
        if not (ok or failed):
            return False
        self._detail = None if ok else f"the upstream answered {status}"
        if route.id_from is IdFrom.RESPONSE:
            return True
        if route.id_from is IdFrom.LOCATION and ok:
            self.session_id = _id_in_location(location or "")
        self._settle()
        return False

    def answer_body(self, body: bytes, whole: bool) -> None:
        """The answer's body (its first bytes, unless `whole`) after `answer` asked for it."""
        if whole:
            self.session_id = _id_at(body, self._found.route.pointer) or self.session_id
        self._settle()

    def unanswered(self, why: str | None = None) -> None:
        """No answer came: a creation counts as failed, with `why`."""
        if self.answered or self._found.route.action is not Action.CREATE:
            return
        if why is None:
            why = (
                "cut at the end of the shutdown grace period"
                if self._policy.draining.is_set()
                else "the client went away first"
            )
        self.answered = True
        self._ok, self._detail = False, why
        self._settle()

    def _settle(self) -> None:
        if self.session_id:
            self._policy.record(
                self._exchange, self._found, self.session_id, self._ok, self._detail
            )


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


def _usable_id(text: str) -> str | None:
    """The ID if it is one a lifecycle table can hold, else None."""
    usable = 0 < len(text) <= MAX_OBSERVED_ID and text.isprintable() and text.isascii()
    return text if usable else None


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
