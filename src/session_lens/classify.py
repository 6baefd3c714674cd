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
        if not evidence.has_audit:
            # No evidence means "never existed" only where the records are complete.
            if minted_at is not None and (evidence.horizon is None or minted_at < evidence.horizon):
                return Reason.PREDATES_TRACKING
            return Reason.NEVER_EXISTED
        if evidence.last_old_state == SessionState.CREATING and evidence.last_new_state is None:
            return Reason.CREATION_FAILED
        return Reason.PURGED
    if state == SessionState.CREATING:
        started = evidence.created_at or evidence.last_at or evidence.now
        if evidence.now - started < creation_timeout:
            return Reason.CREATING
        return Reason.CREATION_FAILED
    if state == SessionState.DELETED:
        return Reason.DELETED_NOT_SERVED if include_deleted else Reason.DELETED
    if state == SessionState.ARCHIVED:
        return Reason.ARCHIVED
    if state in LIVE_STATES:
        stamps = [t for t in (evidence.updated_at, evidence.last_at) if t is not None]
        if stamps and evidence.now - max(stamps) < visibility_window:
            return Reason.NOT_YET_VISIBLE
        return Reason.UPSTREAM_INCONSISTENT
    return Reason.UNKNOWN
