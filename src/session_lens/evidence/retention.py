"""The service's store forgetting by policy: whole time partitions dropped by a TTL.

QuestDB cannot delete rows; it drops a partition once its whole period is older
than the TTL: `partition_end < reference_time - TTL`, where the reference time
is the wall clock capped by the newest timestamp in the table (QuestDB's
documentation, "Time To Live (TTL)"). session-lens cannot see that newest
timestamp. It takes the store to be written at least once a partition, so a
partition is `DROPPED` when even a reference one partition behind the clock
would have dropped it, `KEPT` when the clock itself would not, and at the
`BOUNDARY` (it may or may not be gone) in between. Partitions are cut in UTC,
as QuestDB cuts them.
"""

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class Unit(StrEnum):
    """A partition size, and the units a TTL is counted in."""

    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class Fate(StrEnum):
    """What the store's retention has done to the partition an ID was created in."""

    KEPT = "kept"
    BOUNDARY = "boundary"
    DROPPED = "dropped"


_SHORT = {Unit.HOUR: "h", Unit.DAY: "d", Unit.WEEK: "w", Unit.MONTH: "M", Unit.YEAR: "y"}
_FIXED_HOURS = {Unit.HOUR: 1, Unit.DAY: 24, Unit.WEEK: 168}
_PERIOD = re.compile(r"(\d+)\s*([A-Za-z]+)")
_UNIT_WORDS = {
    **{word: unit for unit in Unit for word in (unit.value, unit.value + "s")},
    "h": Unit.HOUR,
    "d": Unit.DAY,
    "w": Unit.WEEK,
    "y": Unit.YEAR,
}


@dataclass(frozen=True, slots=True)
class Period:
    """A TTL as QuestDB counts it: hours, days and weeks exact; months and years by calendar."""

    count: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.count}{_SHORT[self.unit]}"

    @classmethod
    def parse(cls, text: str) -> "Period":
        """`30d`, `12h`, `2w`, `6M`, `1y`, or QuestDB's words (`30 DAYS`); raises ValueError."""
        match = _PERIOD.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a retention period (e.g. 30d, 12h, 2w, 6M, 1y)")
        count, word = int(match[1]), match[2]
        unit = Unit.MONTH if word == "M" else _UNIT_WORDS.get(word.lower())
        if word == "m":
            raise ValueError(f"{text!r}: write months as M or months (m would be minutes)")
        if unit is None or count < 1:
            raise ValueError(f"{text!r} is not a retention period (e.g. 30d, 12h, 2w, 6M, 1y)")
        return cls(count, unit)

    def before(self, moment: datetime) -> datetime:
        """`moment` minus this period."""
        if self.unit in _FIXED_HOURS:
            return moment - timedelta(hours=self.count * _FIXED_HOURS[self.unit])
        months = self.count * (12 if self.unit is Unit.YEAR else 1)
        return _add_months(moment, -months)

    def fits(self, partition: Unit) -> bool:
        """Whether it is a whole number of partitions, as QuestDB requires of a TTL."""
        if partition in _FIXED_HOURS:
            if self.unit not in _FIXED_HOURS:
                return partition is not Unit.WEEK
            return self.count * _FIXED_HOURS[self.unit] % _FIXED_HOURS[partition] == 0
        if self.unit in _FIXED_HOURS:
            return False
        return partition is Unit.MONTH or self.unit is Unit.YEAR or self.count % 12 == 0


@dataclass(frozen=True, slots=True)
class StoreRetention:
    """The service's store's TTL and partition size."""

    ttl: Period
    partition: Unit = Unit.DAY

    def partition_of(self, moment: datetime) -> tuple[datetime, datetime]:
        """The start and end of the partition a moment (aware, UTC) falls in."""
        hour = moment.replace(minute=0, second=0, microsecond=0)
        if self.partition is Unit.HOUR:
            return hour, hour + timedelta(hours=1)
        day = hour.replace(hour=0)
        if self.partition is Unit.DAY:
            return day, day + timedelta(days=1)
        if self.partition is Unit.WEEK:  # ISO weeks, from Monday
            monday = day - timedelta(days=day.weekday())
            return monday, monday + timedelta(days=7)
        month = day.replace(day=1)
        if self.partition is Unit.MONTH:
            return month, _add_months(month, 1)
        year = month.replace(month=1)
        return year, _add_months(year, 12)

    def fate(self, minted: datetime, now: datetime) -> Fate:
        """Whether the partition of a session minted at `minted` is gone by `now`."""
        _, end = self.partition_of(minted)
        if end >= self.ttl.before(now):
            return Fate.KEPT
        if end < self.ttl.before(Period(1, self.partition).before(now)):
            return Fate.DROPPED
        return Fate.BOUNDARY

    def __str__(self) -> str:
        return f"TTL {self.ttl}, partitioned by {self.partition}"


@dataclass(frozen=True, slots=True)
class Retained:
    """Where an ID stands against the store's retention."""

    retention: StoreRetention
    partition_start: datetime
    partition_end: datetime
    fate: Fate

    @classmethod
    def of(cls, retention: StoreRetention, minted_at: datetime, now: datetime) -> "Retained":
        """The partition an ID was created in, and whether the store has dropped it by `now`."""
        start, end = retention.partition_of(minted_at)
        return cls(retention, start, end, retention.fate(minted_at, now))

    def note(self) -> str | None:
        """A sentence for a partition that may or may not be gone."""
        if self.fate is not Fate.BOUNDARY:
            return None
        start, end = self.partition_start.isoformat(), self.partition_end.isoformat()
        return (
            f"its partition ({start} to {end}) is at the store's retention boundary"
            f" ({self.retention}): it may or may not be dropped yet"
        )


def _add_months(moment: datetime, months: int) -> datetime:
    """Calendar arithmetic: the same day of another month, clamped to its last day."""
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)
