"""Why a valid lookup found nothing: the one function that turns evidence into a reason.

Every door asks it (the hop's misses, `explain`, `triage`, the library's `get_session`);
none holds a rule of its own. What the service's own store says of its table decides
first; where it cannot say (no store, a store that did not answer, absence it cannot
prove) the lifecycle tables decide, with the events still in flight laid over them; and
in observed mode an absence that events on their way may yet fill is `unknown`, not
`never_existed`.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from .. import spoken
from ..reasons import Reason
from ..schema import LIVE_STATES, SessionState
from .questdb import StoreEvidence
from .retention import Fate, Retained
from .tables import Evidence


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings a reason is judged by."""

    visibility_window: timedelta
    creation_timeout: timedelta
    observed: bool = False
    """Observed mode: events reach the tables late, from this sidecar and from others."""


@dataclass(frozen=True, slots=True)
class Said:
    """What the sources say of one ID."""

    tables: Evidence
    """The lifecycle tables, with the events this process has in flight laid over them."""
    minted_at: datetime | None
    """The moment the ID names; None for a malformed ID forwarded in observe mode."""
    retained: Retained | None = None
    """Where the ID stands against the configured retention; None: none configured."""
    store: StoreEvidence | None = None
    """What the service's own store said; None: not configured, or it gave no answer."""
    unindexed_until: float | None = None
    """Events in flight were left out of this process's index, the newest of them at this
    time (seconds since the epoch); None: none were."""
    store_read_later: bool = False
    """The store was read after the lookup judged (`triage`): only what held then counts."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reason, and what it cannot say (`unknown`'s cause, a partition of doubt)."""

    reason: Reason
    note: str | None = None


def foregone(retained: Retained | None, store_asked: bool) -> Reason | None:
    """The reason the ID alone gives, before any source is read: a partition the configured
    retention has surely dropped, where the store itself is not asked. None: read them."""
    if retained is not None and retained.fate is Fate.DROPPED and not store_asked:
        return Reason.EXPIRED
    return None


def classify(said: Said, include_deleted: bool, rules: Rules) -> Verdict:
    """The reason the upstream answered "not found", from all that the sources said."""
    reason = _reason(said, include_deleted, rules)
    if reason is Reason.NEVER_EXISTED and said.store is None:
        # The store's own table proves absence, whatever is in flight; the tables do not.
        doubt = _doubt(said, rules)
        if doubt is not None:
            return Verdict(Reason.UNKNOWN, doubt)
    note = None
    if said.retained is not None and said.store is None:
        note = said.retained.note()
    return Verdict(reason, note)


def _reason(said: Said, include_deleted: bool, rules: Rules) -> Reason:
    evidence, store = said.tables, said.store
    if store is not None:
        if said.store_read_later:
            decided = _from_store_since(store, evidence, include_deleted)
        else:
            decided = _from_store(
                store, evidence, said.minted_at, include_deleted, rules.visibility_window
            )
        if decided is not None:
            return decided
    elif said.retained is not None and said.retained.fate is Fate.DROPPED:
        return Reason.EXPIRED
    state = evidence.state
    if state is None:
        return _without_row(evidence, said.minted_at)
    if state == SessionState.CREATING:
        return _creating(evidence, rules.creation_timeout)
    if (put_away := _put_away(state, include_deleted)) is not None:
        return put_away
    if state in LIVE_STATES:
        return _live(evidence, rules.visibility_window)
    return Reason.UNKNOWN


def _doubt(said: Said, rules: Rules) -> str | None:
    """Why, in observed mode, an ID without evidence may yet have some on its way (so it
    is not said to have never existed); None when nothing suggests it."""
    minted, evidence = said.minted_at, said.tables
    if not rules.observed or minted is None:
        return None
    window = rules.visibility_window
    if evidence.now - minted < window:
        age = spoken.span(max(evidence.now - minted, timedelta(0)))
        return (
            f"it was {age} old, within the visibility window ({spoken.span(window)}):"
            " its creation may still be on its way from another sidecar"
        )
    if evidence.replaying is not None and minted <= evidence.replaying:
        return (
            "a sidecar is replaying spooled events up to"
            f" {spoken.when(evidence.replaying)}: this ID's may be among them"
        )
    if said.unindexed_until is not None and minted.timestamp() <= said.unindexed_until:
        return "more events are in flight here than are indexed: this ID's may be among them"
    return None


def _put_away(state: object, include_deleted: bool) -> Reason | None:
    """The reason a deleted or archived session's miss gets; None for any other state."""
    if state == SessionState.DELETED:
        return Reason.DELETED_NOT_SERVED if include_deleted else Reason.DELETED
    if state == SessionState.ARCHIVED:
        return Reason.ARCHIVED
    return None


def _without_row(evidence: Evidence, minted_at: datetime | None) -> Reason:
    """No row in the sessions table: the audit trail, or its absence, tells."""
    if evidence.has_audit:
        if evidence.last_old_state == SessionState.CREATING and evidence.last_new_state is None:
            return Reason.CREATION_FAILED
        return Reason.PURGED
    # No evidence means "never existed" only where the records are complete.
    if minted_at is not None and (evidence.horizon is None or minted_at < evidence.horizon):
        return Reason.PREDATES_TRACKING
    return Reason.NEVER_EXISTED


def creating_since(evidence: Evidence) -> datetime:
    """Since when a CREATING row has been creating, as far as the evidence tells."""
    return evidence.created_at or evidence.last_at or evidence.now


def last_change(evidence: Evidence) -> datetime | None:
    """When a row last changed: its own stamp or its newest audit entry, the later."""
    stamps = [t for t in (evidence.updated_at, evidence.last_at) if t is not None]
    return max(stamps) if stamps else None


def _creating(evidence: Evidence, creation_timeout: timedelta) -> Reason:
    """Still being created, or stuck there for longer than a creation takes."""
    if evidence.now - creating_since(evidence) < creation_timeout:
        return Reason.CREATING
    return Reason.CREATION_FAILED


def _live(evidence: Evidence, visibility_window: timedelta) -> Reason:
    """A live row the upstream did not serve: a change too recent to see, or a disagreement."""
    changed = last_change(evidence)
    if changed is not None and evidence.now - changed < visibility_window:
        return Reason.NOT_YET_VISIBLE
    return Reason.UPSTREAM_INCONSISTENT


def _from_store(
    store: StoreEvidence,
    evidence: Evidence,
    minted_at: datetime | None,
    include_deleted: bool,
    visibility_window: timedelta,
) -> Reason | None:
    """What the store's own table proves; None where it proves nothing."""
    if store.row is not None:  # there, and the upstream said 404 all the same
        state = store.row.get("state") or evidence.state
        if (put_away := _put_away(state, include_deleted)) is not None:
            return put_away
        if state == SessionState.CREATING:  # the lifecycle row knows since when, if any
            return None if evidence.has_row else Reason.CREATING
        return Reason.UPSTREAM_INCONSISTENT
    wal = store.meta.wal
    if wal is not None and wal.suspended:
        return Reason.STORE_SUSPENDED
    pending = wal is not None and wal.pending > 0  # its row may be among what is not applied
    if pending and minted_at is not None and evidence.now - minted_at < visibility_window:
        return Reason.NOT_YET_VISIBLE
    if store.gone:
        return Reason.EXPIRED
    if pending or not any(store.present):
        return None  # absence not proved: not applied yet, or past the newest partition
    if evidence.has_row or evidence.has_audit:
        return None  # the lifecycle records hold more than absence: they say how it went
    if minted_at is None or minted_at >= store.meta.read_at:
        return None  # minted after the WAL state was read: its write may be held since
    # No DELETE in QuestDB: a row absent from a partition still there was never written.
    return Reason.NEVER_EXISTED


def _from_store_since(
    store: StoreEvidence, evidence: Evidence, include_deleted: bool
) -> Reason | None:
    """What the store, read after the lookup judged, proves of that moment. Its WAL state
    and its dropped partitions are of now; what it holds is not: a row the lifecycle
    records know nothing of was written and not served (a suspended WAL or a lagging apply
    then, or the service itself), and a row absent from a partition still there, with
    nothing pending, was never written."""
    if evidence.has_row or evidence.has_audit:
        return None  # the lifecycle records, replayed to the moment, say how it went
    if store.row is not None:  # deleted or archived now: so it most likely was then
        return _put_away(store.row.get("state"), include_deleted) or Reason.UPSTREAM_INCONSISTENT
    wal = store.meta.wal
    if wal is not None and (wal.suspended or wal.pending > 0):
        return None  # its row may be among what is not applied
    if any(store.present) and not store.gone:
        return Reason.NEVER_EXISTED
    return None
