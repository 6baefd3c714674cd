"""Session-ID validation: pure, precompiled, no I/O.

A valid ID is `exec_YYYYMMDD_HHMMSS_xxxxxxxx` (8 lowercase hex digits), carries
a real calendar date and time (read in the configured time zone, UTC by
default), and is not later than now plus an allowed clock skew. The length is
bounded before any regex runs.
"""

import re
import time
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache

from .reasons import Rule

MAX_ID_LENGTH = 64
"""Longer input is rejected as `too_long` before the pattern is tried."""

_PATTERN = re.compile(r"exec_(\d{4})(\d\d)(\d\d)_(\d\d)(\d\d)(\d\d)_[a-f0-9]{8}", re.ASCII)


class IdValidator:
    """Checks session IDs against the format and the clock."""

    __slots__ = ("_max_future_skew", "zone")

    def __init__(self, max_future_skew: timedelta, zone: tzinfo = UTC) -> None:
        self._max_future_skew = max_future_skew.total_seconds()
        self.zone = zone
        """The time zone the IDs' timestamps are written in."""

    def check(self, session_id: str, now: datetime | None = None) -> Rule | None:
        """The rule `session_id` breaks, or None when it is valid."""
        if not session_id:
            return Rule.MISSING
        if len(session_id) > MAX_ID_LENGTH:
            return Rule.TOO_LONG
        stamp = _parse(session_id, self.zone)
        if isinstance(stamp, Rule):
            return stamp
        moment = time.time() if now is None else now.timestamp()
        if stamp > moment + self._max_future_skew:
            return Rule.FUTURE
        return None

    def broken(self, session_id: str, rule: Rule) -> str:
        """What `session_id` shows that breaks `rule`, in one sentence."""
        if rule is Rule.MISSING:
            shows = "the ID is empty"
        elif rule is Rule.TOO_LONG:
            shows = f"it is {len(session_id)} characters long, more than {MAX_ID_LENGTH}"
        elif rule is Rule.CALENDAR:  # it has the form: the digits are where the form puts them
            day, moment = session_id[5:13], session_id[14:20]
            shows = (
                f"it names {day[:4]}-{day[4:6]}-{day[6:]} {moment[:2]}:{moment[2:4]}:{moment[4:]},"
                " a date or time that does not exist"
            )
        elif rule is Rule.FUTURE:
            shows = (
                f"it is dated {self.minted_at(session_id):%Y-%m-%d %H:%M:%S} UTC, more than"
                f" {self._max_future_skew / 3600:g} h ahead of now (the allowed clock skew)"
            )
        else:
            shows = "it does not have the form exec_YYYYMMDD_HHMMSS_xxxxxxxx (x: lowercase hex)"
        return f"{shows}: a malformed ID, which no session has"

    def minted_at(self, session_id: str) -> datetime | None:
        """When a well-formed ID was minted (an aware datetime in UTC), else None."""
        if len(session_id) > MAX_ID_LENGTH:
            return None
        stamp = _parse(session_id, self.zone)
        return None if isinstance(stamp, Rule) else datetime.fromtimestamp(stamp, UTC)


@lru_cache(maxsize=8192)
def _parse(session_id: str, zone: tzinfo) -> Rule | float:
    """The rule the ID's form breaks, or the moment it names (seconds since the epoch).

    Cached: a service's clients look up the same IDs again and again. A local time
    that a daylight-saving change makes ambiguous is read as its first occurrence.
    """
    match = _PATTERN.fullmatch(session_id)
    if match is None:
        return Rule.PATTERN
    try:
        year, month, day, hour, minute, second = map(int, match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp()
    except ValueError:
        return Rule.CALENDAR
