"""Lifecycle events observed in traffic: a request on a lifecycle route, what it says of
its session, recorded once the upstream has confirmed it. Nothing here touches a socket."""

import json
import logging

from yarl import URL

from .config import Config
from .drain import Drain
from .exchange import Exchange
from .reasons import Kind
from .recorder import Event, Recorder
from .routes import Action, IdFrom, LifecycleMatch, LifecycleTable, resolve_pointer

log = logging.getLogger("session_lens.proxy")

MAX_INSPECTED_BODY = 1 << 20
"""Lifecycle bodies larger than this are relayed without looking for an ID in them."""
MAX_OBSERVED_ID = 128


class Observer:
    """Lifecycle routes matched, and their events handed to the recorder."""

    def __init__(self, config: Config, recorder: Recorder, drain: Drain) -> None:
        self._recorder = recorder
        self._routes = LifecycleTable(config.lifecycle_routes)
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
    ) -> None:
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

    __slots__ = ("_detail", "_exchange", "_found", "_observer", "_ok", "answered", "session_id")

    def __init__(self, observer: Observer, exchange: Exchange, found: LifecycleMatch) -> None:
        self._observer = observer
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
                if self._observer.drain.draining
                else "the client went away first"
            )
        self.answered = True
        self._ok, self._detail = False, why
        self._settle()

    def _settle(self) -> None:
        if self.session_id:
            self._observer.record(
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
