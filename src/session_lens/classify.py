"""Why a valid lookup found nothing: a pure function of the evidence.

Two sources: the lifecycle tables (`Evidence`) and, where configured, the service's
own QuestDB (`StoreEvidence`). What the store says of its own table decides first;
where it cannot say (no store, a store that did not answer, absence it cannot prove)
the lifecycle evidence decides as it always has.
"""

from datetime import datetime, timedelta

from .questdb_store import StoreEvidence
from .reasons import Reason
from .retention import Fate
from .schema import LIVE_STATES, SessionState
from .store import Evidence


def classify(
    evidence: Evidence,
    *,
    minted_at: datetime | None,
    include_deleted: bool,
    visibility_window: timedelta,
    creation_timeout: timedelta,
    fate: Fate = Fate.KEPT,
    store: StoreEvidence | None = None,
) -> Reason:
    """The reason the upstream answered "not found", from the lifecycle row and audit trail,
    and the service's own store when it answered.

    `minted_at` is the moment the ID names (None for a malformed ID forwarded in
    observe mode: no such session can exist); `fate` what the configured retention
    says of the partition it was created in, used only where the store was not asked.
    """
    if store is not None:
        decided = _from_store(store, evidence, minted_at, include_deleted, visibility_window)
        if decided is not None:
            return decided
    elif fate is Fate.DROPPED:
        return Reason.EXPIRED
    state = evidence.state
    if state is None:
        return _without_row(evidence, minted_at)
    if state == SessionState.CREATING:
        return _creating(evidence, creation_timeout)
    if state == SessionState.DELETED:
        return Reason.DELETED_NOT_SERVED if include_deleted else Reason.DELETED
    if state == SessionState.ARCHIVED:
        return Reason.ARCHIVED
    if state in LIVE_STATES:
        return _live(evidence, visibility_window)
    return Reason.UNKNOWN


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
        if state == SessionState.DELETED:
            return Reason.DELETED_NOT_SERVED if include_deleted else Reason.DELETED
        if state == SessionState.ARCHIVED:
            return Reason.ARCHIVED
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
    # No DELETE in QuestDB: a row absent from a partition still there was never written.
    return Reason.NEVER_EXISTED
