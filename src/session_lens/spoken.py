"""Times and lengths of time as the explanations say them."""

from datetime import UTC, datetime, timedelta


def span(length: timedelta) -> str:
    """A length of time as a person says it: 0.4 s, 45 s, 10 min, 1 h, 3 days."""
    seconds = length.total_seconds()
    for unit, size in (("day", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size or (seconds >= size and seconds % size == 0):
            count = round(seconds / size)
            return f"{count} {unit}s" if unit == "day" and count != 1 else f"{count} {unit}"
    return f"{round(seconds, 1):g} s" if seconds < 10 else f"{round(seconds)} s"


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def when(moment: datetime | None) -> str:
    """A moment as a person reads it, in UTC to the second."""
    if moment is None:
        return "(unknown)"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
