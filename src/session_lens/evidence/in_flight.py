"""Events seen and not yet stored: evidence all the same.

A recorder spools each event the moment the upstream confirms it; the database has
it a little later (after a batch's short wait, or a replay after an outage). Until
then the explainer lays these events over what the database says (`overlay`), so
a lookup straight after its create reads `not_yet_visible`, not `never_existed`,
and one after a delete seen during an outage reads `deleted`.

The index is bounded: past `MAX_IN_FLIGHT` events it keeps only the newest time of
those it left out (`overflow`), and the explainer treats any ID minted before that
as one whose evidence may be on its way.
"""

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from ..events import Event
from ..routes import TARGET_STATE, Action
from ..schema import SessionState
from .classify import last_change
from .tables import Evidence

MAX_IN_FLIGHT = 100_000
IN_FLIGHT_TRIGGER = "observed, not stored yet"
"""The trigger an overlaid event shows in place of an audit entry's."""


class InFlight:
    """The events a recorder has spooled that the database does not have yet, by session."""

    __slots__ = ("_by_session", "_count", "newest", "overflow")

    def __init__(self) -> None:
        self._by_session: dict[str, dict[str, Event]] = {}
        """Each session's events by ID, in the order they came."""
        self._count = 0
        self.newest = 0.0
        """The time of the newest event ever added (seconds since the epoch)."""
        self.overflow = False
        """Events were left out of the index: any ID minted before `newest` may have some."""

    def __len__(self) -> int:
        return self._count

    def add(self, event: Event) -> None:
        """An event spooled: in flight until `stored`."""
        self.newest = max(self.newest, event.at)
        if self._count >= MAX_IN_FLIGHT:
            self.overflow = True
            return
        held = self._by_session.setdefault(event.session_id, {})
        if event.event_id not in held:
            held[event.event_id] = event
            self._count += 1

    def stored(self, events: Iterable[Event]) -> None:
        """The database has `events` now."""
        for event in events:
            held = self._by_session.get(event.session_id)
            if held is None or held.pop(event.event_id, None) is None:
                continue
            self._count -= 1
            if not held:
                del self._by_session[event.session_id]

    def clear(self) -> None:
        """The database has everything spooled: nothing is in flight."""
        self._by_session.clear()
        self._count = 0
        self.overflow = False

    def of(self, session_id: str) -> list[Event]:
        """The events in flight for one session, oldest first."""
        held = self._by_session.get(session_id, {})
        return sorted(held.values(), key=lambda e: (e.at, e.event_id))


def overlay(evidence: Evidence, events: Sequence[Event]) -> Evidence:
    """The evidence as it will read once `events` (oldest first) are stored: each one
    newer than the database's last word applied as the recorder would apply it."""
    for event in events:
        at = datetime.fromtimestamp(event.at, UTC)
        changed = last_change(evidence)
        if changed is not None and at < changed:
            continue  # the database knows of something later
        before = evidence.state
        if not event.ok:  # a creation that did not complete leaves no row
            after, before = None, SessionState.CREATING.value
        else:
            target = TARGET_STATE[event.action]
            after = None if target is None else target.value
        evidence = replace(
            evidence,
            state=after,
            created_at=at if event.action is Action.CREATE else evidence.created_at,
            updated_at=at,
            deleted_at=at if after == SessionState.DELETED.value else None,
            last_old_state=None if event.action is Action.CREATE and event.ok else before,
            last_new_state=after,
            last_at=at,
            last_trigger=IN_FLIGHT_TRIGGER,
        )
    return evidence
