"""`session-lens triage`: an incident's own log lines, read as they stream, each miss
explained as of when it happened, and what they add up to.

Lines are JSON objects. A miss is a line whose event (`event_type` by default) ends in
`session_not_found`, the ID and `include_deleted` where its fields say, or one of
session-lens's own miss lines. Distinct IDs are explained many at a time, one query
each batch (`Explainer.explain_lookups`), so that the same classification as the hop's
decides, judged at the moment of each lookup. What is kept grows with the distinct IDs
and the time the log spans, never with its lines: per-ID counts are kept for at most
`MAX_IDS` IDs (the rarest dropped first), the timeline's buckets widen as it grows.
"""

import gzip
import io
import json
import math
import sys
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .config import Config
from .evidence.classify import last_change
from .evidence.tables import Trail
from .explain import Asked, Explainer, Explanation
from .reasons import Reason, Rule

MAX_LINE = 1 << 20
"""A line longer than this is no log line of a lookup: counted as bad and skipped."""
BATCH_IDS = 2000
"""Distinct IDs explained by one query."""
PENDING_LOOKUPS = 20_000
"""Misses held for explaining before a batch goes out whatever its size."""
CACHED_TRAILS = 100_000
"""Trails kept for IDs that come back in later batches (some 700 bytes each)."""
MAX_IDS = 100_000
"""Distinct IDs whose lookups are counted one by one."""
MAX_BUCKETS = 720
"""The timeline's most buckets: past it, they are merged into wider ones."""
PROGRESS_LINES = 1024
"""Lines read between two reports to the progress bar."""
FIRST_LINES = 5
"""Line numbers shown for each kind of bad input."""
SYSTEMATIC = 0.5
"""The share of misses one cause must hold for the misses to be called systematic."""
WIDTHS = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200, 86400, 604800)
"""Timeline bucket widths in seconds, each a multiple of the one before."""
DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)
"""Upper bounds of the delays counted between a change and a lookup that missed it."""
RETRIES = 20
"""The fewest lookups of one ID that may be a client retrying."""
OWN_MESSAGES = {"session not found", "invalid session id"}
"""The messages of session-lens's own miss log lines (logger `session_lens.proxy`)."""
_decode = json.JSONDecoder().decode
_REASONS = frozenset(Reason)
_RULES = frozenset(Rule)
TIME_KEYS = ("timestamp", "time", "ts", "@timestamp")

Path_ = tuple[str, ...]


def dotted(text: str) -> Path_:
    """`data.session_id` as the keys it walks; raises ValueError for an empty part."""
    parts = tuple(text.split("."))
    if not all(parts):
        raise ValueError(f"{text!r} is not a dotted path of keys (e.g. data.session_id)")
    return parts


@dataclass(frozen=True, slots=True)
class Fields:
    """Where a log line keeps what triage reads."""

    event: Path_ = ("event_type",)
    event_suffix: str = "session_not_found"
    session_id: Path_ = ("data", "session_id")
    include_deleted: Path_ = ("data", "include_deleted")
    time: tuple[Path_, ...] = tuple((key,) for key in TIME_KEYS)


def _at(record: Any, path: Path_) -> Any:
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


Getter = Callable[[dict[str, Any]], Any]


def _getter(path: Path_) -> Getter:
    """What is at `path` in a JSON object, as a function made once: one key or two are
    the usual shapes, and each line asks four times."""
    if len(path) == 1:
        (key,) = path
        return lambda record: record.get(key)
    if len(path) == 2:
        outer, inner = path

        def two(record: dict[str, Any]) -> Any:
            found = record.get(outer)
            return found.get(inner) if isinstance(found, dict) else None

        return two
    return lambda record: _at(record, path)


_OWN_TIME = (_getter(("time",)),)


@dataclass(slots=True)
class Lookup:
    """One miss a log line tells of."""

    where: str
    session_id: str
    at: datetime | None
    include_deleted: bool
    reason: Reason | None = None
    """Known already: session-lens's own line said it, or the ID is malformed."""
    rule: Rule | None = None
    own: bool = False
    """From one of session-lens's own log lines."""
    bad_time: bool = False
    """Its time did not parse: judged as of now, and counted as bad input."""


@dataclass(frozen=True, slots=True)
class Bad:
    """A line that could not be read as a lookup, or a part of one that could not."""

    kind: str
    where: str


BAD_KINDS = {
    "not_json": "not JSON",
    "not_object": "JSON, but not an object",
    "too_long": f"longer than {MAX_LINE >> 20} MiB",
    "unreadable": "the rest of a file that cannot be read (a damaged gzip file)",
    "no_id": "a miss without a session ID",
    "bad_time": "a time that does not parse (judged as of now)",
}


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time (naive read as UTC) or seconds since the epoch (or ms, µs, ns);
    raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        if "-" in value or ":" in value:  # a date, not a number (ISO's basic form aside)
            moment = datetime.fromisoformat(value.strip())
            return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
        value = float(value)
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        for scale in (1e18, 1e15, 1e12):  # ns, µs, ms
            if abs(number) >= scale:
                number /= scale / 1e9
                break
        return datetime.fromtimestamp(number, UTC)
    raise ValueError(value)


def _asked(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return value is True or value == 1


class Reader:
    """Log lines in, lookups and bad lines out, one line at a time."""

    def __init__(self, config: Config, fields: Fields) -> None:
        self._fields = fields
        self._event, self._id, self._asked = map(
            _getter, (fields.event, fields.session_id, fields.include_deleted)
        )
        self._times = tuple(map(_getter, fields.time))
        self._ids = config.id_validator
        self._valid: dict[str, datetime] = {}
        """IDs found valid, each with the earliest lookup they were valid at."""
        self.lines = 0

    def read(
        self, name: str, stream: IO[bytes], progress: Callable[[int], None]
    ) -> Iterator[Lookup | Bad]:
        """What each line of `stream` tells; `progress` is given the bytes read."""
        number = read = 0
        while True:
            try:
                line = stream.readline(MAX_LINE + 1)
            except (OSError, EOFError, zlib.error):  # a damaged or cut gzip file
                yield Bad("unreadable", f"{name}:{number + 1}")
                return
            if not line:
                progress(read)
                return
            number += 1
            self.lines += 1
            read += len(line)
            if number % PROGRESS_LINES == 0:
                progress(read)
                read = 0
            where = f"{name}:{number}"
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    progress(len(rest))
                progress(len(rest))
                yield Bad("too_long", where)
                continue
            if len(line) < 3 and not line.strip():
                continue
            try:
                record = _decode(line.decode())  # str: json.loads would guess the encoding
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
                yield Bad("not_json", where)
                continue
            if not isinstance(record, dict):
                yield Bad("not_object", where)
                continue
            found = self._lookup(record, where)
            if found is not None:
                yield found

    def _lookup(self, record: dict[str, Any], where: str) -> Lookup | Bad | None:
        own = record.get("logger") == "session_lens.proxy" and record.get("message") in OWN_MESSAGES
        if own:
            session_id, asked = record.get("session_id"), record.get("include_deleted")
            times: tuple[Getter, ...] = _OWN_TIME
        else:
            event = self._event(record)
            if not isinstance(event, str) or not event.endswith(self._fields.event_suffix):
                return None
            session_id = self._id(record)
            asked = self._asked(record)
            times = self._times
        if isinstance(session_id, int) and not isinstance(session_id, bool):
            session_id = str(session_id)
        if not isinstance(session_id, str):
            return Bad("no_id", where)
        at, bad_time = None, False
        for time_of in times:
            value = time_of(record)
            if value is not None:
                try:
                    at = parse_time(value)
                except (ValueError, OverflowError, OSError):
                    bad_time = True
                break
        lookup = Lookup(where, session_id, at, _asked(asked), own=own, bad_time=bad_time)
        if own:
            logged = record.get("reason")
            if isinstance(logged, str) and logged in _REASONS and logged != Reason.UNKNOWN:
                lookup.reason = Reason(logged)
            rule = record.get("rule")
            if lookup.reason is Reason.INVALID_FORMAT and isinstance(rule, str) and rule in _RULES:
                lookup.rule = Rule(rule)
        if lookup.reason is None or lookup.reason is Reason.INVALID_FORMAT:
            rule = self._check(session_id, at)
            if rule is not None:
                lookup.reason, lookup.rule = Reason.INVALID_FORMAT, lookup.rule or rule
        return lookup

    def _check(self, session_id: str, at: datetime | None) -> Rule | None:
        """The rule an ID breaks at the time of its lookup; one minted before a lookup that
        was valid is not checked again for a later one."""
        valid_at = self._valid.get(session_id)
        if valid_at is not None and at is not None and at >= valid_at:
            return None
        rule = self._ids.check(session_id, at)
        if rule is None and at is not None:
            if len(self._valid) >= MAX_IDS:
                self._valid.clear()
            self._valid[session_id] = min(at, valid_at or at)
        return rule


@contextmanager
def opened(name: str) -> Iterator[tuple[IO[bytes], Callable[[], int] | None, int | None]]:
    """A log file (`-`: stdin) as bytes, gzip undone if it is gzip; for a gzip file, a
    function telling how many of its compressed bytes were read so far; its size if known.
    Raises OSError."""
    if name == "-":
        raw: IO[bytes] = sys.stdin.buffer
        size = None
    else:
        raw = open(name, "rb")  # noqa: SIM115 - closed below
        size = Path(name).stat().st_size
    try:
        if isinstance(raw, io.BufferedReader) and raw.peek(2)[:2] == b"\x1f\x8b":
            unpacked: IO[bytes] = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
            yield unpacked, raw.tell, size
        else:
            yield raw, None, size
    finally:
        if name != "-":
            raw.close()


@dataclass(slots=True)
class PerId:
    """One ID's lookups."""

    first: datetime | None
    last: datetime | None
    count: int
    reasons: Counter[Reason]


@dataclass(slots=True)
class Tally:
    """Everything the report is made of, kept bounded."""

    reasons: Counter[Reason] = field(default_factory=Counter)
    first_at: dict[Reason, datetime] = field(default_factory=dict)
    last_at: dict[Reason, datetime] = field(default_factory=dict)
    examples: dict[Reason, list[str]] = field(default_factory=dict)
    bad: Counter[str] = field(default_factory=Counter)
    bad_lines: dict[str, list[str]] = field(default_factory=dict)
    rules: Counter[Rule] = field(default_factory=Counter)
    ids: dict[str, PerId] = field(default_factory=dict)
    ids_dropped: int = 0
    """IDs whose counts were dropped to keep the table within `MAX_IDS` (the rarest)."""
    dropped_below: int = 0
    width: int = WIDTHS[0]
    buckets: dict[int, Counter[Reason]] = field(default_factory=dict)
    untimed: int = 0
    asked_deleted: int = 0
    delays: Counter[float] = field(default_factory=Counter)
    """Read-after-write misses by how long after the session's last change they came."""
    own: int = 0

    @property
    def misses(self) -> int:
        return sum(self.reasons.values())

    def add_bad(self, bad: Bad) -> None:
        self.bad[bad.kind] += 1
        lines = self.bad_lines.setdefault(bad.kind, [])
        if len(lines) < FIRST_LINES:
            lines.append(bad.where)

    def add(self, lookup: Lookup, reason: Reason, explanation: Explanation | None = None) -> None:
        self.reasons[reason] += 1
        self.own += lookup.own
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3 and lookup.session_id not in examples:
            examples.append(lookup.session_id)
        if lookup.rule is not None:
            self.rules[lookup.rule] += 1
            if len(self.bad_lines.setdefault(f"rule:{lookup.rule}", [])) < FIRST_LINES:
                self.bad_lines[f"rule:{lookup.rule}"].append(lookup.where)
        if reason is Reason.DELETED_NOT_SERVED:
            self.asked_deleted += 1
        at = lookup.at
        if at is None:
            self.untimed += 1
        else:
            if reason not in self.first_at or at < self.first_at[reason]:
                self.first_at[reason] = at
            if reason not in self.last_at or at > self.last_at[reason]:
                self.last_at[reason] = at
            self._bucket(at, reason)
        evidence = explanation.evidence if explanation is not None else None
        if evidence is not None and at is not None and reason in READ_AFTER_WRITE:
            since = evidence.created_at if reason is Reason.CREATING else last_change(evidence)
            if since is not None:
                delay = (at - since).total_seconds()
                self.delays[next(d for d in DELAYS if delay <= d)] += 1
        self._count_id(lookup, reason)

    def _count_id(self, lookup: Lookup, reason: Reason) -> None:
        key = lookup.session_id[:64]
        found = self.ids.get(key)
        if found is None:
            if len(self.ids) >= MAX_IDS:
                self._drop_rare()
            self.ids[key] = PerId(lookup.at, lookup.at, 1, Counter({reason: 1}))
            return
        found.count += 1
        found.reasons[reason] += 1
        at = lookup.at
        if at is not None:
            if found.first is None or at < found.first:
                found.first = at
            if found.last is None or at > found.last:
                found.last = at

    def _drop_rare(self) -> None:
        """Make room: drop the IDs seen least (lossy counting, so the frequent ones stay)."""
        while len(self.ids) >= MAX_IDS:
            self.dropped_below += 1
            rare = [key for key, per in self.ids.items() if per.count <= self.dropped_below]
            for key in rare:
                del self.ids[key]
            self.ids_dropped += len(rare)

    def _bucket(self, at: datetime, reason: Reason) -> None:
        second = int(at.timestamp())
        start = second - second % self.width
        bucket = self.buckets.get(start)
        if bucket is None:
            bucket = self.buckets[start] = Counter()
            if len(self.buckets) > MAX_BUCKETS:
                self._widen()
                self._bucket(at, reason)
                return
        bucket[reason] += 1

    def _widen(self) -> None:
        while len(self.buckets) > MAX_BUCKETS and self.width < WIDTHS[-1]:
            self.width = next(w for w in WIDTHS if w > self.width)
            merged: dict[int, Counter[Reason]] = {}
            for start, counts in self.buckets.items():
                merged.setdefault(start - start % self.width, Counter()).update(counts)
            self.buckets = merged


class Triage:
    """Lookups in, explained in batches, tallied."""

    def __init__(self, explainer: Explainer) -> None:
        self._explainer = explainer
        self.tally = Tally()
        self._pending: list[Lookup] = []
        self._new_ids: set[str] = set()
        self._trails: OrderedDict[str, Trail] = OrderedDict()

    def add(self, item: Lookup | Bad) -> bool:
        """Count a bad line, tally a miss whose reason is known, queue one to explain;
        True when enough is queued that `flush` is due."""
        if isinstance(item, Bad):
            self.tally.add_bad(item)
            return False
        if item.bad_time:
            self.tally.add_bad(Bad("bad_time", item.where))
        if item.reason is not None:
            self.tally.add(item, item.reason)
            return False
        self._pending.append(item)
        if item.session_id not in self._trails:
            self._new_ids.add(item.session_id)
        return len(self._new_ids) >= BATCH_IDS or len(self._pending) >= PENDING_LOOKUPS

    async def flush(self) -> None:
        """Explain what is queued: the IDs whose trails are kept from earlier batches without
        a query, the others `BATCH_IDS` to a query."""
        pending, self._pending, self._new_ids = self._pending, [], set()
        by_id: dict[str, list[Lookup]] = {}
        for lookup in pending:
            by_id.setdefault(lookup.session_id, []).append(lookup)
        kept = [key for key in by_id if key in self._trails]
        new = [key for key in by_id if key not in self._trails]
        chunks = [kept] if kept else []
        chunks += [new[start : start + BATCH_IDS] for start in range(0, len(new), BATCH_IDS)]
        for chunk in chunks:
            batch = [lookup for key in chunk for lookup in by_id[key]]
            known = {key: self._trails[key] for key in chunk if key in self._trails}
            asked = [Asked(b.session_id, b.at, b.include_deleted) for b in batch]
            explained = await self._explainer.explain_lookups(asked, known)
            for lookup, explanation in zip(batch, explained, strict=True):
                self.tally.add(lookup, explanation.reason, explanation)
            for key, trail in known.items():
                self._trails[key] = trail
                self._trails.move_to_end(key)
            while len(self._trails) > CACHED_TRAILS:
                self._trails.popitem(last=False)


# --- the report -------------------------------------------------------------------

MEANING: dict[str, str] = {
    "invalid_format": "malformed IDs, which no session has: a client bug",
    "never_existed": "IDs never created: no row and no audit entry",
    "creating": "lookups racing a creation still in progress",
    "creation_failed": "creations that failed half-way",
    "deleted": "deleted sessions looked up without include_deleted",
    "deleted_not_served": "deleted sessions asked for with include_deleted=true",
    "purged": "sessions hard-deleted, only the audit trail remembers them",
    "archived": "archived sessions, in cold storage",
    "not_yet_visible": "live sessions changed moments before: read-after-write lag",
    "upstream_inconsistent": "live sessions the service lost",
    "expired": "sessions whose partition the store's retention dropped",
    "predates_tracking": "IDs older than the records, no evidence either way",
    "store_suspended": "IDs written while the service's table had its WAL suspended",
    "unknown": "misses that could not be explained",
}
"""What the misses of each reason are, as a report says it (by name: the service's store
brings reasons of its own)."""

READ_AFTER_WRITE = (Reason.NOT_YET_VISIBLE, Reason.CREATING)


def _pct(part: int, whole: int) -> str:
    share = 100 * part / whole if whole else 0.0
    return f"{share:.0f} %" if share >= 10 or share == 0 else f"{share:.1f} %"


def _meaning(reason: Reason) -> str:
    return MEANING.get(reason.value, reason.value)


def _misses(count: int) -> str:
    return "1 miss" if count == 1 else f"{count:,} misses"


def _ids(count: int) -> str:
    return "1 ID" if count == 1 else f"{count:,} IDs"


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _span(seconds: float) -> str:
    if seconds == math.inf:
        return "longer"
    return f"{seconds:g} s" if seconds < 60 else f"{seconds / 60:g} min"


@dataclass(frozen=True, slots=True)
class Pattern:
    """A cause the misses share, with its numbers and the evidence behind it."""

    cause: str
    misses: int
    statement: str
    evidence: dict[str, Any]
    examples: list[str]


def patterns(tally: Tally) -> list[Pattern]:
    """The causes the misses share, the largest first."""
    total = tally.misses
    found: list[Pattern] = []
    if not total:
        return found
    per_id = sorted(tally.ids.items(), key=lambda item: -item[1].count)
    counts = sorted(per.count for per in tally.ids.values())
    typical = counts[len(counts) // 2] if counts else 0
    retried = [(key, per) for key, per in per_id if per.count >= max(RETRIES, 10 * typical)]
    for reason, count in tally.reasons.most_common():
        if reason in READ_AFTER_WRITE:
            continue
        found.append(_reason_pattern(tally, reason, count, total))
    raw = sum(tally.reasons[r] for r in READ_AFTER_WRITE)
    if raw:
        found.append(_read_after_write(tally, raw, total))
    if retried:
        found.append(_retries(retried, total, typical))
    burst = _burst(tally)
    if burst is not None:
        found.append(burst)
    found.sort(key=lambda p: -p.misses)
    return found


def _reason_pattern(tally: Tally, reason: Reason, count: int, total: int) -> Pattern:
    ids = sum(1 for per in tally.ids.values() if reason in per.reasons)
    evidence: dict[str, Any] = {"reason": reason.value, "ids": ids}
    if reason is Reason.DELETED_NOT_SERVED:
        statement = (
            f"{_misses(count)} ({_pct(count, total)}) asked include_deleted=true for deleted"
            f" sessions ({ids:,} IDs) and were still refused: the service ignores the flag"
        )
    elif reason is Reason.INVALID_FORMAT:
        rules = ", ".join(f"{rule} {n:,}" for rule, n in tally.rules.most_common())
        evidence["rules"] = {rule.value: n for rule, n in tally.rules.items()}
        statement = (
            f"{_misses(count)} ({_pct(count, total)}) {'was' if count == 1 else 'were'}"
            f" of malformed IDs ({rules}):"
            " a client bug, no session has such an ID"
        )
    else:
        statement = (
            f"{_misses(count)} ({_pct(count, total)}) on {_ids(ids)} were {reason.value}:"
            f" {_meaning(reason)}"
        )
    return Pattern(reason.value, count, statement, evidence, tally.examples.get(reason, []))


def _read_after_write(tally: Tally, raw: int, total: int) -> Pattern:
    timed = sum(tally.delays.values())
    within, bound = 0, math.inf
    for limit in DELAYS:
        within += tally.delays[limit]
        if timed and within >= 0.9 * timed:
            bound = limit
            break
    closeness = (
        f"lookups within {_span(bound)} of the session's creation or last change"
        if timed and bound != math.inf
        else "lookups moments after the session's creation or last change"
    )
    statement = (
        f"{_pct(raw, total)} of misses ({raw:,} of {total:,}) were {closeness}"
        " (read-after-write): the service had not shown it yet, though the records had it"
    )
    evidence = {
        "reasons": {r.value: tally.reasons[r] for r in READ_AFTER_WRITE if tally.reasons[r]},
        "delays": {
            ("more" if d == math.inf else f"<={d:g}s"): n for d, n in sorted(tally.delays.items())
        },
        "within_seconds": None if bound == math.inf else bound,
    }
    examples = [
        *tally.examples.get(Reason.NOT_YET_VISIBLE, []),
        *tally.examples.get(Reason.CREATING, []),
    ]
    return Pattern("read_after_write", raw, statement, evidence, examples[:3])


def _retries(retried: list[tuple[str, PerId]], total: int, typical: int) -> Pattern:
    lookups = sum(per.count for _, per in retried)
    top = retried[0][1]
    reason = top.reasons.most_common(1)[0][0].value
    if len(retried) == 1:
        statement = (
            f"one ID looked up {top.count:,} times ({_pct(top.count, total)} of misses),"
            f" {_when(top.first)} to {_when(top.last)}, each time {reason}: a client retrying"
        )
    else:
        statement = (
            f"{len(retried)} IDs looked up {lookups:,} times between them"
            f" ({_pct(lookups, total)} of misses; the most, {top.count:,} times): clients retrying"
        )
    evidence = {
        "ids": [
            {
                "session_id": k,
                "lookups": p.count,
                "reasons": {r.value: n for r, n in p.reasons.items()},
            }
            for k, p in retried[:10]
        ],
        "typical_lookups_per_id": typical,
    }
    return Pattern("retries", lookups, statement, evidence, [key for key, _ in retried[:3]])


BURST_CAUSE = {
    Reason.UPSTREAM_INCONSISTENT: (
        ": sessions written and not served for a stretch, as a store does that accepts"
        " writes and shows none of them (a QuestDB table whose write-ahead log is suspended,"
        " or applied late)"
    ),
    Reason.STORE_SUSPENDED: ": the service's store showed no new row until its WAL resumed",
}
"""What a burst of a reason most likely was."""


def _burst(tally: Tally) -> Pattern | None:
    """One reason packed into a stretch of the log much shorter than the log itself."""
    if len(tally.buckets) < 2:
        return None
    starts = sorted(tally.buckets)
    whole = starts[-1] + tally.width - starts[0]
    best: Pattern | None = None
    for reason, count in tally.reasons.items():
        if count < 10 or reason not in tally.first_at:
            continue
        first, last = tally.first_at[reason], tally.last_at[reason]
        low = int(first.timestamp()) // tally.width * tally.width
        high = int(last.timestamp()) // tally.width * tally.width
        if high + tally.width - low > whole / 2:
            continue
        inside = sum(sum(c.values()) for s, c in tally.buckets.items() if low <= s <= high)
        mine = sum(c[reason] for s, c in tally.buckets.items() if low <= s <= high)
        if mine < 0.9 * inside:
            continue
        share = f"all {inside:,}" if mine == inside else f"{mine:,} of the {inside:,}"
        statement = (
            f"{share} misses between {_when(first)} and {_when(last)} UTC were {reason.value}"
            f" ({_meaning(reason)}), and no {reason.value} miss came before or after"
            + BURST_CAUSE.get(reason, "")
        )
        pattern = Pattern(
            f"burst:{reason.value}",
            mine,
            statement,
            {
                "reason": reason.value,
                "from": _when(first),
                "to": _when(last),
                "misses_inside": inside,
            },
            tally.examples.get(reason, []),
        )
        if best is None or pattern.misses > best.misses:
            best = pattern
    return best


def verdict(tally: Tally, found: list[Pattern]) -> dict[str, Any]:
    """Systematic (one cause holds most misses) or scattered, and which cause."""
    total = tally.misses
    if not total:
        return {"kind": "none", "cause": None, "share": 0.0, "line": "no misses found"}
    top = max(found, key=lambda p: p.misses)
    share = top.misses / total
    if share >= SYSTEMATIC:
        line = f"systematic: {top.statement}"
        kind = "systematic"
    else:
        line = (
            f"scattered: no one cause holds most of the {total:,} misses"
            f" (the largest, {top.cause}, holds {_pct(top.misses, total)})"
        )
        kind = "scattered"
    return {"kind": kind, "cause": top.cause, "share": round(share, 4), "line": line}


def report(tally: Tally, lines: int, queries: int, top: int = 10) -> dict[str, Any]:
    """The triage as data: what `--json` prints and the other outputs render."""
    total = tally.misses
    found = patterns(tally)
    ids = sorted(tally.ids.items(), key=lambda item: (-item[1].count, item[0]))
    starts = sorted(tally.buckets)
    timed = [m for m in tally.first_at.values()], [m for m in tally.last_at.values()]
    return {
        "verdict": verdict(tally, found),
        "lines": lines,
        "misses": total,
        "ids": len(tally.ids) + tally.ids_dropped,
        "from": _when(min(timed[0])) if timed[0] else None,
        "to": _when(max(timed[1])) if timed[1] else None,
        "untimed": tally.untimed,
        "from_session_lens": tally.own,
        "queries": queries,
        "reasons": [
            {
                "reason": reason.value,
                "misses": count,
                "share": round(count / total, 4),
                "first": _when(tally.first_at.get(reason)),
                "last": _when(tally.last_at.get(reason)),
                "examples": tally.examples.get(reason, []),
            }
            for reason, count in tally.reasons.most_common()
        ],
        "patterns": [
            {
                "cause": p.cause,
                "misses": p.misses,
                "share": round(p.misses / total, 4),
                "statement": p.statement,
                "evidence": p.evidence,
                "examples": p.examples,
            }
            for p in found
        ],
        "timeline": {
            "bucket_seconds": tally.width,
            "reasons": [r.value for r, _ in tally.reasons.most_common()],
            "buckets": [
                {
                    "at": _when(datetime.fromtimestamp(start, UTC)),
                    "misses": {r.value: n for r, n in tally.buckets[start].items()},
                }
                for start in starts
            ],
        },
        "top_ids": [
            {
                "session_id": key,
                "lookups": per.count,
                "first": _when(per.first),
                "last": _when(per.last),
                "reasons": {r.value: n for r, n in per.reasons.most_common()},
            }
            for key, per in ids[:top]
        ],
        "ids_dropped": tally.ids_dropped,
        "bad_input": {
            kind: {
                "count": tally.bad[kind],
                "what": BAD_KINDS[kind],
                "first": tally.bad_lines[kind],
            }
            for kind in BAD_KINDS
            if tally.bad[kind]
        },
        "invalid_rules": {
            rule.value: {"count": n, "first": tally.bad_lines.get(f"rule:{rule}", [])}
            for rule, n in tally.rules.most_common()
        },
    }


BARS = " ▁▂▃▄▅▆▇█"


def render_text(data: dict[str, Any]) -> str:
    """The report as a person reads it on a terminal."""
    out = [data["verdict"]["line"], ""]
    span = f", {data['from']} to {data['to']} UTC" if data["from"] else ""
    out.append(
        f"{_misses(data['misses'])} on {_ids(data['ids'])} in {data['lines']:,} lines{span}"
        f" ({data['queries']:,} {'query' if data['queries'] == 1 else 'queries'})"
    )
    if data["untimed"]:
        out.append(f"{_misses(data['untimed'])} without a time, judged as of now")
    if data["reasons"]:
        out += ["", "reasons"]
        width = max(len(r["reason"]) for r in data["reasons"])
        for row in data["reasons"]:
            out.append(
                f"  {row['reason']:<{width}}  {row['misses']:>9,}  {100 * row['share']:5.1f} %"
            )
    if data["patterns"]:
        out += ["", "patterns"]
        for pattern in data["patterns"]:
            out.append(f"  - {pattern['statement']}")
            if pattern["examples"]:
                out.append(f"    e.g. {', '.join(map(_printable, pattern['examples']))}")
    timeline = data["timeline"]
    if timeline["buckets"]:
        each, lines = _sparklines(timeline)
        out += ["", f"timeline (one mark per {_span(each)},"
                f" from {timeline['buckets'][0]['at']} UTC)"]  # fmt: skip
        out += lines
    if data["top_ids"]:
        out += ["", "most looked-up IDs"]
        for row in data["top_ids"]:
            reasons = ", ".join(f"{r} {n:,}" for r, n in row["reasons"].items())
            out.append(
                f"  {_printable(row['session_id'])}  {row['lookups']:>7,}  {row['first'] or '-'}"
                f" .. {row['last'] or '-'}  {reasons}"
            )
    if data["ids_dropped"]:
        out.append(f"  ({data['ids_dropped']:,} rarely seen IDs not counted one by one)")
    if data["bad_input"] or data["invalid_rules"]:
        out += ["", "bad input (never fatal)"]
        for kind, bad in data["bad_input"].items():
            out.append(f"  {bad['count']:>7,}  {bad['what']} ({kind}): {', '.join(bad['first'])}")
        for rule, bad in data["invalid_rules"].items():
            out.append(
                f"  {bad['count']:>7,}  invalid IDs, rule {rule} (invalid_format):"
                f" {', '.join(bad['first'])}"
            )
    return "\n".join(out)


def _printable(text: str) -> str:
    """An ID from a log as a terminal may show it: control characters escaped, never run."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _sparklines(timeline: dict[str, Any]) -> tuple[int, list[str]]:
    """The seconds each mark stands for, and a line of marks per reason."""
    buckets = timeline["buckets"]
    width = timeline["bucket_seconds"]
    start = datetime.fromisoformat(buckets[0]["at"]).timestamp()
    end = datetime.fromisoformat(buckets[-1]["at"]).timestamp()
    slots = int((end - start) // width) + 1
    columns = min(slots, 100)
    per_column = math.ceil(slots / columns)
    names = timeline["reasons"]
    label = max(len(n) for n in names)
    lines = []
    for name in names:
        marks = [0] * math.ceil(slots / per_column)
        for bucket in buckets:
            slot = int((datetime.fromisoformat(bucket["at"]).timestamp() - start) // width)
            marks[slot // per_column] += bucket["misses"].get(name, 0)
        peak = max(marks) or 1
        line = "".join(BARS[math.ceil(8 * m / peak)] if m else BARS[0] for m in marks)
        lines.append(f"  {name:<{label}}  |{line}|  peak {peak:,}")
    return width * per_column, lines


def inputs_readable(names: Iterable[str]) -> list[str]:
    """A problem for each named input that cannot be opened."""
    problems = []
    for name in names:
        if name == "-":
            continue
        try:
            with open(name, "rb"):
                pass
        except OSError as exc:
            problems.append(f"{name}: {exc.strerror or exc}")
    return problems
