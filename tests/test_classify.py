"""The pure classifier: evidence in, reason out."""

from datetime import UTC, datetime, timedelta

import pytest

from session_lens.classify import classify
from session_lens.reasons import Reason
from session_lens.retention import Fate
from session_lens.store import Evidence

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
HORIZON = NOW - timedelta(days=1)
AFTER = HORIZON + SECOND
BEFORE = HORIZON - SECOND


def evidence(
    state: str | None = None,
    age: timedelta = timedelta(hours=1),
    last: tuple[str | None, str | None] | None = None,
    last_age: timedelta = timedelta(hours=1),
    horizon: datetime | None = HORIZON,
) -> Evidence:
    at = NOW - age if state else None
    return Evidence(
        state=state,
        created_at=at,
        updated_at=at,
        deleted_at=None,
        last_old_state=last[0] if last else None,
        last_new_state=last[1] if last else None,
        last_at=NOW - last_age if last else None,
        last_trigger="sql" if last else None,
        now=NOW,
        horizon=horizon,
    )


def reason_of(
    found: Evidence,
    include_deleted: bool = False,
    minted_at: datetime | None = AFTER,
    fate: Fate = Fate.KEPT,
) -> Reason:
    return classify(
        found,
        minted_at=minted_at,
        include_deleted=include_deleted,
        visibility_window=5 * SECOND,
        creation_timeout=30 * SECOND,
        fate=fate,
    )


@pytest.mark.parametrize(
    ("found", "include_deleted", "reason"),
    [
        (evidence(), False, Reason.NEVER_EXISTED),
        (evidence(last=("ACTIVE", None)), False, Reason.PURGED),
        (evidence(last=("CREATING", None)), False, Reason.CREATION_FAILED),
        (evidence("CREATING", age=SECOND), False, Reason.CREATING),
        (evidence("CREATING", age=31 * SECOND), False, Reason.CREATION_FAILED),
        (evidence("DELETED"), False, Reason.DELETED),
        (evidence("DELETED"), True, Reason.DELETED_NOT_SERVED),
        (evidence("ARCHIVED"), True, Reason.ARCHIVED),
        (evidence("ACTIVE", age=2 * SECOND), False, Reason.NOT_YET_VISIBLE),
        (evidence("PAUSED", last=("ACTIVE", "PAUSED"), last_age=SECOND), False,
         Reason.NOT_YET_VISIBLE),
        (evidence("STOPPED", age=10 * SECOND), False, Reason.UPSTREAM_INCONSISTENT),
        (evidence("ACTIVE"), True, Reason.UPSTREAM_INCONSISTENT),
    ],
)  # fmt: skip
def test_reasons(found: Evidence, include_deleted: bool, reason: Reason) -> None:
    assert reason_of(found, include_deleted) is reason


def test_no_evidence_before_the_horizon_predates_tracking() -> None:
    assert reason_of(evidence(), minted_at=BEFORE) is Reason.PREDATES_TRACKING
    assert reason_of(evidence(), minted_at=HORIZON) is Reason.NEVER_EXISTED
    # Without a recorded horizon nothing is complete: no evidence proves nothing.
    assert reason_of(evidence(horizon=None)) is Reason.PREDATES_TRACKING
    # A malformed ID forwarded in observe mode names no moment: it cannot exist.
    assert reason_of(evidence(), minted_at=None) is Reason.NEVER_EXISTED


@pytest.mark.parametrize(
    ("found", "include_deleted", "reason"),
    [
        (evidence(last=("ACTIVE", None)), False, Reason.PURGED),
        (evidence(last=("CREATING", None)), False, Reason.CREATION_FAILED),
        (evidence("DELETED"), True, Reason.DELETED_NOT_SERVED),
        (evidence("ARCHIVED"), False, Reason.ARCHIVED),
        (evidence("ACTIVE"), False, Reason.UPSTREAM_INCONSISTENT),
    ],
)
def test_evidence_before_the_horizon_still_counts(
    found: Evidence, include_deleted: bool, reason: Reason
) -> None:
    assert reason_of(found, include_deleted, minted_at=BEFORE) is reason


@pytest.mark.parametrize(
    "found",
    [evidence(), evidence("ACTIVE"), evidence("DELETED"), evidence(last=("STOPPED", None))],
)
def test_a_dropped_partition_is_expired_evidence_or_not(found: Evidence) -> None:
    assert reason_of(found, True, minted_at=BEFORE, fate=Fate.DROPPED) is Reason.EXPIRED
    assert reason_of(found, True, minted_at=BEFORE, fate=Fate.BOUNDARY) is reason_of(
        found, True, minted_at=BEFORE
    )
