"""Lifecycle events observed in traffic: a request on a lifecycle route, what it says of
its session, recorded once the upstream has confirmed it. Nothing here touches a socket."""

import json
import logging
import time
from dataclasses import dataclass

from yarl import URL

from .config import Config
from .drain import Drain
from .events import Event
from .exchange import Exchange
from .metrics import Metrics
from .reasons import Kind
from .recorder import Recorder
from .routes import Action, IdFrom, LifecycleMatch, LifecycleTable, PointerMiss, resolve_pointer

log = logging.getLogger("session_lens.proxy")

MAX_INSPECTED_BODY = 1 << 20
"""Lifecycle bodies larger than this are relayed without looking for an ID in them."""
MAX_OBSERVED_ID = 128
_MIB = f"{MAX_INSPECTED_BODY >> 20} MiB"


@dataclass(frozen=True, slots=True)
class NoId:
    """Why an observed event has no session ID: `missing` is made of fixed words and the
    route's own pointer, never of what a request carried, so its kinds are few."""

    missing: str


_IN_PATH = "the path's {session_id} segment"
_UNSEEN = {
    IdFrom.REQUEST: NoId("the request's body did not arrive whole"),
    IdFrom.RESPONSE: NoId("no answer came to take the ID from"),
    IdFrom.LOCATION: NoId("no Location to take the ID from: the creation was not confirmed"),
    IdFrom.PATH: NoId(f"{_IN_PATH} is missing"),
}
"""What a route lacks until the part of the exchange holding its ID has been seen."""


class Observer:
    """Lifecycle routes matched, and their events handed to the recorder."""

    def __init__(self, config: Config, recorder: Recorder, metrics: Metrics, drain: Drain) -> None:
        self._recorder = recorder
        self._metrics = metrics
        self._routes = LifecycleTable(config.lifecycle_routes)
        self._told: set[tuple[str, str]] = set()
        self.drain = drain

    def observe(self, exchange: Exchange, method: str, path: str) -> "Observation | None":
        """An observation of a lifecycle request, if `method path` is a lifecycle route."""
        found = self._routes.match(method, path)
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
        at: float,
    ) -> None:
        """Hand the recorder an event the upstream confirmed (or a creation it failed) `at`."""
        request_id = exchange.request_id if _usable(exchange.request_id) else "(unprintable)"
        action = found.route.action
        self._recorder.record(Event.new(session_id, action, request_id, ok, detail, at))

    def unidentified(self, exchange: Exchange, found: LifecycleMatch, why: NoId) -> None:
        """An event the upstream confirmed, without its ID where the route says: counted
        every time, logged the first time each route lacks it in each way."""
        route = found.route
        self._metrics.lifecycle_events[route.action, "unidentified"].inc()
        if (route.name, why.missing) in self._told:
            return
        self._told.add((route.name, why.missing))
        log.warning(
            "lifecycle event not recorded: no session ID where the route takes it from"
            " (said once per route and cause; each one is counted as unidentified)",
            extra={
                "route": route.name,
                "id_from": route.id_source,
                "missing": why.missing,
                "request_id": exchange.request_id,
            },
        )


class Observation:
    """One lifecycle request on its way: what it says of its session, recorded once the
    upstream has confirmed it (or failed a creation)."""

    __slots__ = (
        "_at", "_detail", "_exchange", "_found", "_observer", "_ok", "_session_id", "answered"
    )  # fmt: skip

    def __init__(self, observer: Observer, exchange: Exchange, found: LifecycleMatch) -> None:
        self._observer = observer
        self._exchange = exchange
        self._found = found
        in_path = None if found.session_id is None else _usable_id(found.session_id, _IN_PATH)
        if found.route.id_from is IdFrom.PATH and in_path is not None:
            self._session_id = in_path
        else:  # a template may name the ID too: it stands in for one the answer lacks
            self._session_id = in_path if isinstance(in_path, str) else _UNSEEN[found.route.id_from]
        self.answered = False
        self._ok = False
        self._detail: str | None = None
        self._at = 0.0

    @property
    def reads_request(self) -> bool:
        """Whether the ID is in the request body, which is then kept while it is small."""
        return self._found.route.id_from is IdFrom.REQUEST

    def request_body(self, body: bytes, whole: bool) -> None:
        """The request body (its first bytes, unless `whole`), to find the ID in."""
        if whole:
            self._session_id = _id_at(body, self._found.route.pointer, "the request's body")
        else:
            self._take(NoId(f"the request's body is larger than {_MIB} to look in"))

    def answer(self, status: int, location: str | None) -> bool:
        """The upstream answered; True when the ID is to be read from the body to come
        (handed to `answer_body`), else the event is recorded now.

        The event's time is taken here, before any of the answer goes back: a request
        the client can only send once it has the answer gets a later one, on whichever
        worker or sidecar it lands (clocks in sync)."""
        self.answered = True
        self._at = time.time()
        route = self._found.route
        self._ok = ok = 200 <= status < 300
        failed = route.action is Action.CREATE and status >= 500
        if not (ok or failed):
            return False
        self._detail = None if ok else f"the upstream answered {status}"
        if route.id_from is IdFrom.RESPONSE:
            return True
        if route.id_from is IdFrom.LOCATION and ok:
            self._session_id = _id_in_location(location or "")
        self._settle()
        return False

    def answer_body(self, body: bytes, whole: bool) -> None:
        """The answer's body (its first bytes, unless `whole`) after `answer` asked for it."""
        if whole:
            self._take(_id_at(body, self._found.route.pointer, "the answer's body"))
        elif len(body) > MAX_INSPECTED_BODY:
            self._take(NoId(f"the answer's body is larger than {_MIB} to look in"))
        else:
            self._take(NoId("the answer's body was cut short"))
        self._settle()

    def unanswered(self, why: str | None = None) -> None:
        """No answer came: a creation counts as failed, with `why`."""
        if self.answered or self._found.route.action is not Action.CREATE:
            return
        if why is None:
            why = (
                "cut at the end of the shutdown grace period"
                if self._observer.drain.draining
                else "the client went away first"
            )
        self.answered = True
        self._ok, self._detail = False, why
        self._at = time.time()
        self._settle()

    def _take(self, found: str | NoId) -> None:
        """The ID found, or else the path's when its template names one."""
        if isinstance(found, str) or isinstance(self._session_id, NoId):
            self._session_id = found

    def _settle(self) -> None:
        session_id = self._session_id
        if isinstance(session_id, NoId):
            self._observer.unidentified(self._exchange, self._found, session_id)
        else:
            self._observer.record(
                self._exchange, self._found, session_id, self._ok, self._detail, self._at
            )


def _id_at(body: bytes, pointer: str, whose: str) -> str | NoId:
    """The session ID at a JSON pointer in a body, or what the body lacks."""
    try:
        found = resolve_pointer(json.loads(body), pointer)
    except (ValueError, RecursionError):
        return NoId(f"{whose} is not JSON")
    except PointerMiss as miss:
        if isinstance(miss.holder, dict | list):
            return NoId(f"{whose} has nothing at {miss.reached}/{miss.token}")
        return NoId(
            f"{whose} holds {_kind(miss.holder)} at {miss.reached or 'its top'},"
            " not an object or an array"
        )
    if isinstance(found, bool) or not isinstance(found, str | int):
        return NoId(f"{whose} holds {_kind(found)} at {pointer}, not a string or a number")
    return _usable_id(str(found), f"{pointer} in {whose}")


def _kind(value: object) -> str:
    """A JSON value's type, as a person names it."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return "null" if value is None else "a number"


def _id_in_location(location: str) -> str | NoId:
    """The last segment of a Location header's path, or what the header lacks."""
    if not location:
        return NoId("the answer has no Location header")
    try:
        path = URL(location).raw_path
    except ValueError:
        return NoId("the Location header is not a URL")
    return _usable_id(path.rpartition("/")[2], "the last segment of the Location header's path")


def _usable_id(text: str, where: str) -> str | NoId:
    """The ID if it is one a lifecycle table can hold, else what is wrong with it."""
    if _usable(text):
        return text
    if not text:
        return NoId(f"{where} is empty")
    if len(text) > MAX_OBSERVED_ID:
        return NoId(f"{where} is longer than {MAX_OBSERVED_ID} characters")
    return NoId(f"{where} is not printable ASCII")


def _usable(text: str) -> bool:
    """Whether a lifecycle table can hold `text` as an ID."""
    return 0 < len(text) <= MAX_OBSERVED_ID and text.isprintable() and text.isascii()
