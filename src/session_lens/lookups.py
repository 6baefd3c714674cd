"""Session lookups: the ID validated, the outcome of the upstream's answer counted, and
a miss explained and its body rewritten. Nothing here touches a socket."""

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl

from .config import Config, Disclose, NotFoundBody, Repeated, Validation
from .exchange import Exchange, id_header, ms_since, short_id
from .explain import Explainer, Explanation, store_json
from .ids import MAX_ID_LENGTH
from .metrics import Metrics
from .problems import PROBLEM_JSON, Answer, phrase, problem_answer
from .reasons import Kind, Outcome, Reason, Rule
from .routes import RouteTable

log = logging.getLogger("session_lens.proxy")

REASON_HEADER = "X-Session-Not-Found-Reason"
LOOKUP_METHODS = frozenset({"GET", "HEAD"})
MAX_MERGED_BODY = 1 << 20
"""Larger miss bodies are relayed as they are, the reason in the header alone."""

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
    Reason.STORE_SUSPENDED: "the service's store accepts writes but shows none of them:"
    " its write-ahead log is suspended",
    Reason.UPSTREAM_INCONSISTENT: "the session is live, but the upstream did not find it",
    Reason.EXPIRED: "the store's own retention has dropped the partition the session was in",
    Reason.PREDATES_TRACKING: "the session is older than session-lens' records:"
    " no evidence either way",
    Reason.UNKNOWN: "no lifecycle evidence could be read in time",
}


_MALFORMED = Explanation(Reason.INVALID_FORMAT)


class MissPlan(Enum):
    """How the body of a miss is rewritten."""

    PROBLEM = "problem"
    MERGE = "merge"


def include_deleted_asked(value: str) -> bool:
    """Whether an `include_deleted` query value asks for deleted sessions."""
    return value.lower() in ("true", "1")


def include_deleted_in(query: str, last: bool) -> tuple[bool, str | None]:
    """Whether a query asks for deleted sessions, by its first `include_deleted` (or its
    `last`, as the upstream reads a repeated one), and a note when its values disagree."""
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "include_deleted"]
    if not values:
        return False, None
    asked = include_deleted_asked(values[-1] if last else values[0])
    if len({include_deleted_asked(value) for value in values}) == 1:
        return asked, None
    which = "last" if last else "first"
    return asked, (
        f"include_deleted was given {len(values)} times with values that disagree;"
        f" read as the {which} one says ({str(asked).lower()}), by repeated_parameter"
    )


class Lookups:
    """The rules of lookups: one instance per process, shared by every connection."""

    def __init__(self, config: Config, metrics: Metrics, explainer: Explainer) -> None:
        self._config = config
        self._metrics = metrics
        self._explainer = explainer
        self._miss_statuses = frozenset(config.miss_statuses)
        self._miss_body_mode = config.not_found_body
        self._disclose = config.disclose
        self._validator = config.id_validator
        self._enforce = config.validation == Validation.ENFORCE
        self._last = config.repeated_parameter == Repeated.LAST
        self.routes = RouteTable(config.session_routes)
        """The session routes lookups are matched against."""

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
                "duration_ms": ms_since(exchange.started),
            },
        )
        if not self._enforce:
            exchange.invalid = True
            return None
        exchange.status = self._config.invalid_status
        return problem_answer(
            self._config.invalid_status,
            _RULE_DETAIL[rule],
            [(REASON_HEADER, Reason.INVALID_FORMAT.value), *id_header(exchange)],
            reason=Reason.INVALID_FORMAT.value,
            rule=rule.value,
            session_id=short_id(match.session_id),
            request_id=request_id,
        )

    def is_miss(self, exchange: Exchange, status: int) -> bool:
        """Whether `status` answers a lookup with "not found" (a miss_statuses status, all
        of them 4xx or 5xx), so the miss is explained."""
        return exchange.match is not None and status in self._miss_statuses

    def count(self, exchange: Exchange, status: int) -> Outcome | None:
        """Count the outcome of a lookup's answer; None when it is no lookup.

        A malformed ID forwarded in observe mode was counted when it was checked:
        its outcome is said, not counted again."""
        match = exchange.match
        if match is None:
            return None
        if status in self._miss_statuses:  # `is_miss`, the lookup known
            outcome = Outcome.NOT_FOUND
        elif 200 <= status < 300:
            outcome = Outcome.FOUND
        elif status >= 500:
            outcome = Outcome.UPSTREAM_ERROR
        else:
            outcome = Outcome.OTHER
        if not exchange.invalid:
            self._metrics.lookups[match.route, outcome].inc()
        return outcome

    async def explain_miss(
        self, exchange: Exchange, query: str, status: int, sent: float
    ) -> Explanation:
        """Classify a miss (its `query` saying whether deleted sessions were asked for),
        count it and log it with the evidence behind the reason.

        A malformed ID's miss is `invalid_format`, counted and logged when it was checked."""
        match = exchange.match
        assert match is not None
        if exchange.invalid:
            return _MALFORMED
        include_deleted, note = include_deleted_in(query, self._last)
        exemplar = self._metrics.exemplar(match.session_id, exchange.request_id)
        explanation = await self._explainer.explain_miss(
            match.session_id, include_deleted, exemplar
        )
        if note is not None:
            explanation = replace(
                explanation, note=f"{explanation.note}; {note}" if explanation.note else note
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
                "questdb": store_json(explanation.store),
                "classifier_error": explanation.error,
                "note": explanation.note,
                "upstream_ms": ms_since(sent),
                "duration_ms": ms_since(exchange.started),
            },
        )
        return explanation

    def reason_header(self, explanation: Explanation) -> str | None:
        """The reason a miss's answer says in its header; None when nothing is disclosed."""
        return None if self._disclose is Disclose.NOTHING else explanation.reason.value

    def miss_plan(self, headers: Mapping[str, str], length: int | None) -> "MissPlan | None":
        """How a miss's body is rewritten, by `not_found_body` and `disclose`; None relays
        the upstream's. A HEAD's plan is its GET's, so that its head is GET's too.

        `headers` are the answer's, looked up case-insensitively.
        """
        if self._miss_body_mode == NotFoundBody.PASSTHROUGH or self._disclose is Disclose.NOTHING:
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
        members: dict[str, object] = {
            "reason": explanation.reason.value,
            "session_id": match.session_id,
        }
        if self._disclose is Disclose.LIFECYCLE:
            members["lifecycle"] = explanation.lifecycle()
        if explanation.note is not None:
            members["note"] = explanation.note
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
            document = json.loads(raw, object_pairs_hook=_unique, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # not JSON, nested past Python's stack, or one
            return raw, None  # that would not come out as it went in: left as it is
        if not isinstance(document, dict):
            return raw, None
        if members.keys() & document.keys():
            document["session_lens"] = members  # never overwrite what the upstream said
        else:
            document.update(members)
        try:
            return json.dumps(document, allow_nan=False).encode(), None
        except ValueError:  # a number too large for a float (1e999): left as it is
            return raw, None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different; one that repeats a key is left alone."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key is repeated")
    return document


def _no_constant(name: str) -> float:
    """NaN and Infinity are not JSON: a body holding them is left alone."""
    raise ValueError(f"{name} is not JSON")


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
