"""Why a valid lookup found nothing: a pure function of the evidence."""

from datetime import datetime, timedelta

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
) -> Reason:
    """The reason the upstream answered "not found", from the lifecycle row and audit trail.

    `minted_at` is the moment the ID names (None for a malformed ID forwarded in
    observe mode: no such session can exist); `fate` what the store's own retention
    has done to the partition it was created in.
    """
    if fate is Fate.DROPPED:
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
