"""The pure classifier: evidence in, reason out."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from session_lens.evidence.classify import Rules, Said, classify, foregone
from session_lens.evidence.questdb import StoreEvidence, TableMeta, WalState
from session_lens.evidence.retention import Fate, Period, Retained, StoreRetention, Unit
from session_lens.evidence.tables import Evidence
from session_lens.reasons import Reason

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
    return classify(Said(found, minted_at, retained(fate)), include_deleted, RULES).reason


RULES = Rules(visibility_window=5 * SECOND, creation_timeout=30 * SECOND)


def retained(fate: Fate) -> Retained | None:
    """Where the configured retention leaves an ID: `fate`, in a partition ending now."""
    if fate is Fate.KEPT:
        return None
    return Retained(StoreRetention(Period(1, Unit.DAY)), NOW - timedelta(days=1), NOW, fate)


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


# The service's own store as a second source: what it says of its table decides first.


APPLIED = WalState(False, 7, 7)
TWO = ("2025-12-31", "2026-01-01")
"""An ID minted near its partition's end names the next one too."""


def store(
    row: dict[str, object] | None = None,
    present: tuple[bool, ...] = (True,),
    wal: WalState | None = APPLIED,
    partitions: tuple[str, ...] = ("2025-12-31",),
    oldest: str = "2025-12-01",
    before_oldest: bool = False,
) -> StoreEvidence:
    meta = TableMeta(
        Unit.DAY, None, wal, frozenset({oldest, "2026-01-01"}), oldest, NOW, 0.001
    )  # fmt: skip
    return StoreEvidence(partitions, present, before_oldest, row, meta)


def store_reason(
    said: StoreEvidence,
    found: Evidence | None = None,
    include_deleted: bool = False,
    minted_at: datetime = AFTER,
    fate: Fate = Fate.KEPT,
) -> Reason:
    sources = Said(found or evidence(), minted_at, retained(fate), said)
    return classify(sources, include_deleted, RULES).reason


@pytest.mark.parametrize(
    ("said", "found", "include_deleted", "reason"),
    [
        # The row is there, the upstream said 404: its state decides.
        (store(row={"state": "DELETED"}), None, False, Reason.DELETED),
        (store(row={"state": "DELETED"}), None, True, Reason.DELETED_NOT_SERVED),
        (store(row={"state": "ARCHIVED"}), None, False, Reason.ARCHIVED),
        (store(row={"state": "ACTIVE"}), None, False, Reason.UPSTREAM_INCONSISTENT),
        (store(row={"id": "x"}), evidence("DELETED"), False, Reason.DELETED),  # no state column
        (store(row={"id": "x"}), None, False, Reason.UPSTREAM_INCONSISTENT),
        # Suspended: whatever the lifecycle records say, the store shows no new row.
        (store(wal=WalState(True, 7, 9)), None, False, Reason.STORE_SUSPENDED),
        (store(wal=WalState(True, 7, 9)), evidence("ACTIVE"), False, Reason.STORE_SUSPENDED),
        # Its partition gone: expired, with no partition of doubt.
        (store(present=(False,), before_oldest=True), None, False, Reason.EXPIRED),
        # Missing between partitions that are there: never written to, or dropped; which,
        # the store cannot say (QuestDB makes no partition for a period without writes).
        (store(present=(False,)), evidence("ACTIVE"), False, Reason.UPSTREAM_INCONSISTENT),
        (store(present=(False,)), None, False, Reason.NEVER_EXISTED),  # the tables' say
        # The partition there, every write applied, no row: never written.
        (store(), None, False, Reason.NEVER_EXISTED),
        (store(present=(True, False), partitions=TWO), None, False, Reason.NEVER_EXISTED),
        # Absent but the lifecycle records know more: they say how it went.
        (store(), evidence(None, last=("CREATING", None)), False, Reason.CREATION_FAILED),
        # Past the newest partition: nothing written there yet, nothing proved.
        (store(present=(False,), partitions=("2026-01-02",)), None, False, Reason.NEVER_EXISTED),
    ],
)
def test_what_the_store_says_decides(
    said: StoreEvidence, found: Evidence | None, include_deleted: bool, reason: Reason
) -> None:
    assert store_reason(said, found, include_deleted) is reason


def test_absence_in_a_present_partition_proves_never_existed_before_the_horizon() -> None:
    assert reason_of(evidence(), minted_at=BEFORE) is Reason.PREDATES_TRACKING
    assert store_reason(store(), minted_at=BEFORE) is Reason.NEVER_EXISTED


def test_pending_transactions_make_a_young_session_not_yet_visible() -> None:
    pending = store(wal=WalState(False, 7, 9))
    assert store_reason(pending, minted_at=NOW - SECOND) is Reason.NOT_YET_VISIBLE
    # Older than the window: absence is not proved while writes are pending.
    assert store_reason(pending, minted_at=BEFORE) is Reason.PREDATES_TRACKING
    assert store_reason(pending, minted_at=AFTER) is Reason.NEVER_EXISTED  # the lifecycle's say


def test_the_store_replaces_the_configured_retention() -> None:
    # The configured TTL says dropped; the store holds the row: the row decides.
    assert store_reason(store(row={"state": "ACTIVE"}), fate=Fate.DROPPED) is (
        Reason.UPSTREAM_INCONSISTENT
    )
    assert reason_of(evidence("ACTIVE"), fate=Fate.DROPPED) is Reason.EXPIRED


OBSERVED = Rules(visibility_window=5 * SECOND, creation_timeout=30 * SECOND, observed=True)


def test_in_observed_mode_an_absence_events_may_fill_is_unknown_with_why() -> None:
    young = classify(Said(evidence(), NOW - SECOND), False, OBSERVED)
    assert young.reason is Reason.UNKNOWN
    assert young.note is not None and "visibility window" in young.note
    replaying = replace(evidence(), replaying=NOW - timedelta(minutes=1))
    during = classify(Said(replaying, NOW - timedelta(minutes=2)), False, OBSERVED)
    assert during.reason is Reason.UNKNOWN and "replaying" in (during.note or "")
    after = classify(Said(replaying, NOW - SECOND * 30), False, OBSERVED)  # minted after it
    assert after.reason is Reason.NEVER_EXISTED and after.note is None
    unindexed = Said(evidence(), AFTER, unindexed_until=NOW.timestamp())
    assert classify(unindexed, False, OBSERVED).reason is Reason.UNKNOWN
    # Database mode: what the tables say is all there is.
    assert classify(Said(evidence(), NOW - SECOND), False, RULES).reason is Reason.NEVER_EXISTED
    # The store's own table proves absence, whatever may be in flight.
    assert classify(Said(evidence(), NOW - SECOND, store=store()), False, OBSERVED).reason is (
        Reason.NEVER_EXISTED
    )


def test_a_partition_the_retention_dropped_is_foregone_unless_the_store_is_asked() -> None:
    assert foregone(retained(Fate.DROPPED), store_asked=False) is Reason.EXPIRED
    assert foregone(retained(Fate.DROPPED), store_asked=True) is None
    assert foregone(retained(Fate.BOUNDARY), store_asked=False) is None
    assert foregone(None, store_asked=False) is None
    boundary = classify(Said(evidence("ACTIVE"), AFTER, retained(Fate.BOUNDARY)), False, RULES)
    assert boundary.note is not None and "retention boundary" in boundary.note


@pytest.mark.parametrize(
    ("said", "found", "reason"),
    [
        # Absent now from a partition still there, nothing pending: absent then.
        (store(), None, Reason.NEVER_EXISTED),
        # Suspended or pending now: the row may be among what is not applied.
        (store(wal=WalState(True, 7, 9)), None, Reason.PREDATES_TRACKING),
        (store(wal=WalState(False, 7, 9)), None, Reason.PREDATES_TRACKING),
        # Its partition gone now: it may have been there then.
        (store(present=(False,), before_oldest=True), None, Reason.PREDATES_TRACKING),
        # Held now, and the lifecycle records know nothing: written and not served.
        (store(row={"state": "ACTIVE"}), None, Reason.UPSTREAM_INCONSISTENT),
        # The lifecycle records, replayed to the moment, say how it went then.
        (store(row={"state": "DELETED"}), evidence("ACTIVE", age=SECOND), Reason.NOT_YET_VISIBLE),
    ],
)
def test_a_store_read_after_the_lookup_proves_only_what_held_then(
    said: StoreEvidence, found: Evidence | None, reason: Reason
) -> None:
    sources = Said(found or evidence(), BEFORE, store=said, store_read_later=True)
    assert classify(sources, False, RULES).reason is reason


def test_absence_is_proved_only_for_ids_minted_before_the_wal_state_was_read() -> None:
    # The WAL may have been suspended since the metadata was read: its write may be held.
    assert store_reason(store(), minted_at=NOW - SECOND) is Reason.NEVER_EXISTED
    assert store_reason(store(), minted_at=NOW + SECOND) is Reason.NEVER_EXISTED  # the tables'
    later = Said(evidence(horizon=NOW + 2 * SECOND), NOW + SECOND, store=store())
    assert classify(later, False, RULES).reason is Reason.PREDATES_TRACKING  # not proved


@pytest.mark.parametrize(
    ("state", "include_deleted", "reason"),
    [
        ("DELETED", False, Reason.DELETED),
        ("DELETED", True, Reason.DELETED_NOT_SERVED),
        ("ARCHIVED", False, Reason.ARCHIVED),
        ("ACTIVE", False, Reason.UPSTREAM_INCONSISTENT),
    ],
)
def test_a_row_the_store_holds_now_that_the_tables_know_nothing_of(
    state: str, include_deleted: bool, reason: Reason
) -> None:
    sources = Said(evidence(), BEFORE, store=store(row={"state": state}), store_read_later=True)
    assert classify(sources, include_deleted, RULES).reason is reason
