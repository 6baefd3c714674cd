"""The pure classifier: evidence in, reason out."""

from datetime import UTC, datetime, timedelta

import pytest

from session_lens.classify import classify
from session_lens.reasons import Reason
from session_lens.store import Evidence

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def evidence(
    state: str | None = None,
    age: timedelta = timedelta(hours=1),
    last: tuple[str | None, str | None] | None = None,
    last_age: timedelta = timedelta(hours=1),
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
    assert (
        classify(
            found,
            include_deleted=include_deleted,
            visibility_window=5 * SECOND,
            creation_timeout=30 * SECOND,
        )
        is reason
    )
