"""Prometheus metrics, every child resolved once at start.

Labels hold only values from the bounded enums in `reasons` and the configured
route templates, never anything taken from a request. What comes from a request
(the session ID, the request ID) goes into exemplars, which a scraper sees only
when it asks for OpenMetrics, and only the latest one per series.
"""

from collections.abc import Iterable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__
from .reasons import Kind, Outcome, Reason, Rule, StatusClass, UpstreamError
from .routes import Action

PREFIX = "session_lens_"
CLASSIFIER_ERRORS = ("timeout", "unavailable", "query", "breaker_open")
QUESTDB_ERRORS = ("timeout", "unavailable", "query", "breaker_open", "no_table")
"""The kinds of `StoreFailure` of the QuestDB store, as labels."""
EVENT_RESULTS = (
    "recorded",
    "unexpected_transition",
    "creation_failed",
    "duplicate",
    "dropped",
    "rejected",
    "before_horizon",
    "late",
    "future",
    "unidentified",
)
ANSWERED_BY = ("upstream", "session_lens")
"""Who gave a request's answer: the upstream (read to its end) or session-lens itself
(an invalid ID, a refusal, a 502 or 504, an answer cut short)."""
CLASSIFICATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip
EXEMPLAR_RUNES = 128
"""OpenMetrics' limit on an exemplar's label names and values, together."""
EXEMPLAR_SESSION_ID = 64
"""The longest session ID an exemplar carries (a valid one has 29 characters)."""
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


_LiveMode = Literal["livesum", "livemax"]
"""How a gauge's values from several processes add up (prometheus_client's modes)."""


class _Declare:
    """Declares metric families on one registry, every name under PREFIX."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, documentation, labels, registry=self._registry)

    def gauge(self, name: str, documentation: str, mode: _LiveMode, *labels: str) -> Gauge:
        return Gauge(
            PREFIX + name, documentation, labels, multiprocess_mode=mode, registry=self._registry
        )

    def histogram(
        self, name: str, documentation: str, buckets: tuple[float, ...], *labels: str
    ) -> Histogram:
        return Histogram(
            PREFIX + name, documentation, labels, buckets=buckets, registry=self._registry
        )


class Metrics:
    """Every metric session-lens exports, registered on the registry given."""

    def __init__(
        self, registry: CollectorRegistry, routes: Iterable[str], exemplars: bool = True
    ) -> None:
        routes = tuple(routes)
        self.exemplars = exemplars
        """Whether misses and malformed IDs leave their IDs in exemplars."""
        declare = _Declare(registry)
        lookups = declare.counter(
            "lookups_total", "Session lookups by route and outcome.", "route", "outcome"
        )
        not_found = declare.counter(
            "not_found_total",
            "Session lookups that found nothing, by route and reason.",
            "route",
            "reason",
        )
        invalid_ids = declare.counter(
            "invalid_ids_total",
            "Malformed session IDs, by route and the rule they broke.",
            "route",
            "rule",
        )
        requests = declare.counter(
            "requests_total", "Requests answered, by kind and status class.", "kind", "code"
        )
        request_duration = declare.histogram(
            "request_duration_seconds",
            "Time from a request's arrival to the last byte of its answer; answered_by"
            " upstream: the requests upstream_duration_seconds times, session_lens: the rest.",
            LATENCY_BUCKETS,
            "kind",
            "answered_by",
        )
        upstream_duration = declare.histogram(
            "upstream_duration_seconds",
            "Time from sending a request upstream to the last byte of its answer.",
            LATENCY_BUCKETS,
            "kind",
        )
        upstream_responses = declare.counter(
            "upstream_responses_total",
            "Answers the upstream gave, by request kind and their status class"
            " (session-lens' own 502 and 504 are not among them).",
            "kind",
            "code",
        )
        upstream_errors = declare.counter(
            "upstream_errors_total",
            "Requests the upstream failed: connect, reset, timeout, protocol.",
            "kind",
        )
        self.inflight = declare.gauge("inflight_requests", "Requests being handled now.", "livesum")
        self.classification_duration = declare.histogram(
            "classification_duration_seconds",
            "Time spent explaining a miss, the budget included.",
            CLASSIFICATION_BUCKETS,
        )
        self.classification_queries = declare.counter(
            "classification_queries_total",
            "Evidence queries sent; concurrent misses for one ID share one.",
        )
        classifier_errors = declare.counter(
            "classifier_errors_total",
            "Misses left unexplained: timeout, unavailable, query, breaker_open.",
            "kind",
        )
        self.breaker_open = declare.gauge(
            "classifier_breaker_open",
            "1 while the circuit breaker keeps the classifier off the database.",
            "livemax",
        )
        questdb_errors = declare.counter(
            "questdb_errors_total",
            "Asks of the service's QuestDB that gave no evidence: timeout, unavailable, query,"
            " breaker_open, no_table; the lifecycle evidence decided alone.",
            "kind",
        )
        self.questdb_wal_suspended = declare.gauge(
            "questdb_wal_suspended",
            "1 while the service's QuestDB table has its write-ahead log suspended: writes"
            " are accepted and none becomes visible.",
            "livemax",
        )
        self.questdb_wal_pending = declare.gauge(
            "questdb_wal_pending_transactions",
            "Transactions the service's QuestDB table has accepted and not applied yet.",
            "livemax",
        )
        lifecycle_events = declare.counter(
            "lifecycle_events_total",
            "Observed lifecycle events by action and what became of them.",
            "action",
            "result",
        )
        self.spooled_events = declare.gauge(
            "spooled_events",
            "Observed events on disk that the database does not have yet.",
            "livesum",
        )
        self.spool_bytes = declare.gauge(
            "spool_bytes", "Size of the spool file of observed events.", "livesum"
        )
        self.tracking_horizon = declare.gauge(
            "tracking_horizon_timestamp_seconds",
            "Since when the lifecycle tables hold every change (Unix time): older IDs"
            " without evidence read predates_tracking.",
            "livemax",
        )
        build_info = declare.gauge(
            "build_info", "Always 1; the version is in the label.", "livemax", "version"
        )
        build_info.labels(__version__).set(1)

        self.lookups = {(r, o): lookups.labels(r, o) for r in routes for o in Outcome}
        self.not_found = {(r, why): not_found.labels(r, why) for r in routes for why in Reason}
        self.invalid_ids = {(r, rule): invalid_ids.labels(r, rule) for r in routes for rule in Rule}
        self.requests = {(k, c): requests.labels(k, c) for k in Kind for c in StatusClass}
        self.request_duration = {
            (k, by): request_duration.labels(k, by) for k in Kind for by in ANSWERED_BY
        }
        self.upstream_duration = {k: upstream_duration.labels(k) for k in Kind}
        self.upstream_responses = {
            (k, c): upstream_responses.labels(k, c) for k in Kind for c in StatusClass
        }
        self.upstream_errors = {e: upstream_errors.labels(e) for e in UpstreamError}
        self.classifier_errors = {k: classifier_errors.labels(k) for k in CLASSIFIER_ERRORS}
        self.questdb_errors = {k: questdb_errors.labels(k) for k in QUESTDB_ERRORS}
        self.lifecycle_events = {
            (a, r): lifecycle_events.labels(a, r) for a in Action for r in EVENT_RESULTS
        }

    def exemplar(self, session_id: str, request_id: str) -> dict[str, str] | None:
        """The exemplar labels for one request; None when exemplars are off or nothing fits.

        Only printable ASCII goes in, within OpenMetrics' 128 characters: a session
        ID longer than 64 is left out, a request ID is cut to what is left.
        """
        if not self.exemplars:
            return None
        labels = {}
        room = EXEMPLAR_RUNES
        if 0 < len(session_id) <= EXEMPLAR_SESSION_ID and _plain(session_id):
            labels["session_id"] = session_id
            room -= len("session_id") + len(session_id)
        cut = request_id[: room - len("request_id")]
        if cut and _plain(cut):
            labels["request_id"] = cut
        return labels or None


_UNSAFE = frozenset('"\\{}# ')


def _plain(text: str) -> bool:
    """Printable ASCII with nothing an exemplar parser could trip on."""
    return text.isascii() and text.isprintable() and _UNSAFE.isdisjoint(text)
