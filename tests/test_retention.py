"""The store's own retention: QuestDB's TTL rule, partitions cut in UTC, calendar periods."""

from datetime import UTC, datetime

import pytest

from session_lens.evidence.retention import Fate, Period, StoreRetention, Unit


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "period"),
    [
        ("30d", Period(30, Unit.DAY)),
        ("30 DAYS", Period(30, Unit.DAY)),
        ("12h", Period(12, Unit.HOUR)),
        ("2w", Period(2, Unit.WEEK)),
        ("6M", Period(6, Unit.MONTH)),
        ("1 month", Period(1, Unit.MONTH)),
        ("1y", Period(1, Unit.YEAR)),
    ],
)
def test_periods_are_read_as_questdb_writes_them(text: str, period: Period) -> None:
    assert Period.parse(text) == period


@pytest.mark.parametrize("text", ["", "30", "3m", "0d", "30 fortnights", "-1d", "1.5d"])
def test_what_is_not_a_period_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"retention period|months"):
        Period.parse(text)


@pytest.mark.parametrize(
    ("ttl", "partition", "fits"),
    [
        ("36h", Unit.HOUR, True),
        ("36h", Unit.DAY, False),
        ("48h", Unit.DAY, True),
        ("3M", Unit.DAY, True),
        ("2w", Unit.WEEK, True),
        ("10d", Unit.WEEK, False),
        ("1M", Unit.WEEK, False),
        ("30d", Unit.MONTH, False),
        ("3M", Unit.MONTH, True),
        ("18M", Unit.YEAR, False),
        ("24M", Unit.YEAR, True),
    ],
)
def test_a_ttl_is_a_whole_number_of_partitions(ttl: str, partition: Unit, fits: bool) -> None:
    assert Period.parse(ttl).fits(partition) is fits


@pytest.mark.parametrize(
    ("partition", "moment", "start", "end"),
    [
        (Unit.HOUR, "2026-03-10 14:59:59", "2026-03-10 14:00", "2026-03-10 15:00"),
        (Unit.DAY, "2026-03-10 14:59:59", "2026-03-10", "2026-03-11"),
        (Unit.WEEK, "2026-03-12 01:00", "2026-03-09", "2026-03-16"),  # ISO week, Monday
        (Unit.MONTH, "2026-12-31 23:59", "2026-12-01", "2027-01-01"),
        (Unit.YEAR, "2026-06-15", "2026-01-01", "2027-01-01"),
    ],
)
def test_partitions(partition: Unit, moment: str, start: str, end: str) -> None:
    retention = StoreRetention(Period(1, Unit.YEAR), partition)
    assert retention.partition_of(at(moment)) == (at(start), at(end))


def test_calendar_periods_clamp_to_the_month_end() -> None:
    assert Period(1, Unit.MONTH).before(at("2026-03-31 10:00")) == at("2026-02-28 10:00")
    assert Period(1, Unit.YEAR).before(at("2028-02-29")) == at("2027-02-28")


def test_questdb_rule_with_one_partition_of_doubt() -> None:
    # TTL 30 days, daily partitions, now 2026-11-30 12:00. QuestDB drops a partition
    # when its end < reference - 30 d; the reference is at most now and, for a store
    # written at least daily, at least a day before now.
    retention = StoreRetention(Period(30, Unit.DAY), Unit.DAY)
    now = at("2026-11-30 12:00")
    # Ends 10-30 00:00, before (now - 1 d) - 30 d = 10-30 12:00: gone either way.
    assert retention.fate(at("2026-10-29 23:59:59"), now) is Fate.DROPPED
    # Ends 10-31 00:00: before now - 30 d (10-31 12:00) but not before 10-30 12:00;
    # gone only if the store's newest row is later than 10-31 00:00 + 30 d.
    assert retention.fate(at("2026-10-30 00:00:00"), now) is Fate.BOUNDARY
    assert retention.fate(at("2026-10-30 23:59:59"), now) is Fate.BOUNDARY
    # Ends 11-01 00:00, not before now - 30 d: still there whatever the store holds.
    assert retention.fate(at("2026-10-31 00:00:00"), now) is Fate.KEPT
    assert retention.fate(at("2026-11-29 08:00:00"), now) is Fate.KEPT
    # The incident's ID, eleven months old.
    assert retention.fate(at("2025-12-30 02:09:44"), now) is Fate.DROPPED


def test_monthly_partitions_with_a_ttl_in_months() -> None:
    retention = StoreRetention(Period(3, Unit.MONTH), Unit.MONTH)
    now = at("2026-11-30 12:00")
    # now - 3 M = 08-30 12:00; a month earlier, 07-30 12:00.
    assert retention.fate(at("2026-06-15"), now) is Fate.DROPPED  # ends 07-01
    assert retention.fate(at("2026-07-15"), now) is Fate.BOUNDARY  # ends 08-01
    assert retention.fate(at("2026-08-15"), now) is Fate.KEPT  # ends 09-01
