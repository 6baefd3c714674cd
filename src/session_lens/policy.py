"""What the hop decides about a request and its answer, whatever carries the bytes.

Counting requests in flight and done, answers of our own (refusals, upstream
failures as problem documents), and the two concerns it holds: `lookups` (session
IDs validated, misses explained) and `observer` (lifecycle events seen in traffic,
when observing). Nothing here touches a socket: the HTTP lane and the WebSocket path
both call it.
"""

import logging
import time

from .config import Config
from .drain import Drain
from .exchange import Exchange, id_header, ms_since, new_request_id
from .explain import Explainer
from .lookups import Lookups
from .metrics import Metrics
from .observation import Observer
from .problems import Answer, problem_answer
from .reasons import Kind, Outcome, StatusClass, UpstreamError
from .recorder import Recorder
from .routes import normalised

log = logging.getLogger("session_lens.proxy")

_UPSTREAM_DETAIL = {
    UpstreamError.CONNECT: "the upstream could not be reached",
    UpstreamError.RESET: "the upstream closed the connection before answering",
    UpstreamError.TIMEOUT: "the upstream did not answer in time",
    UpstreamError.PROTOCOL: "the upstream sent a malformed response",
}


class Policy:
    """The hop's rules, one instance per process, shared by every connection."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        explainer: Explainer,
        recorder: Recorder | None = None,
        drain: Drain | None = None,
    ) -> None:
        self._metrics = metrics
        self.drain = drain or Drain()
        """Whether shutdown has begun, and what is in flight: the process's one drain."""
        self.lookups = Lookups(config, metrics, explainer)
        self.observer = Observer(config, recorder, metrics, self.drain) if recorder else None
        """Lifecycle events seen in traffic; None when not observing."""
        self._merge_slashes = config.merge_slashes
        self.max_body = config.max_body_bytes
        """The largest request body accepted, if there is a limit."""

    def route_path(self, path: str) -> str:
        """The path (without its query) as routes are matched on it: normalised."""
        return normalised(path, self._merge_slashes)

    # Counting

    def exchange(self, target: str, given_id: str | None) -> Exchange:
        """A request arrived: its exchange, with the request ID it carries or a new one.

        `given_id` is a `USABLE_REQUEST_ID` or None: each path checks the one it read."""
        if given_id is None:
            return Exchange(Kind.PASSTHROUGH, target, new_request_id(), True, time.perf_counter())
        return Exchange(Kind.PASSTHROUGH, target, given_id, False, time.perf_counter())

    def begin(self) -> None:
        """Count a request in flight."""
        self.drain.begin()
        self._metrics.inflight.inc()

    def answered(self, exchange: Exchange, status: int) -> None:
        """The upstream's answer to a request began with `status`: counted as the upstream's."""
        exchange.status = status
        self._metrics.upstream_responses[exchange.kind, StatusClass.of(status)].inc()

    def finish(self, exchange: Exchange) -> None:
        """Count a request answered: in flight no more, its status and durations."""
        self.drain.finish()
        self._metrics.inflight.dec()
        kind = exchange.kind
        if exchange.status:
            self._metrics.requests[kind, StatusClass.of(exchange.status)].inc()
        took = time.perf_counter() - exchange.started
        if exchange.upstream_seconds is None:
            self._metrics.request_duration[kind, "session_lens"].observe(took)
        else:
            self._metrics.request_duration[kind, "upstream"].observe(took)
            self._metrics.upstream_duration[kind].observe(exchange.upstream_seconds)

    # Answers of our own

    def refuse(self, exchange: Exchange, status: int, detail: str) -> Answer:
        """An answer of our own to a request we will not forward (400, 413, 505...)."""
        exchange.status = status
        log.info(
            "request refused",
            extra={"request_id": exchange.request_id, "status": status, "detail": detail},
        )
        return problem_answer(status, detail, id_header(exchange), request_id=exchange.request_id)

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
            id_header(exchange),
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
                "duration_ms": ms_since(exchange.started),
            },
        )
