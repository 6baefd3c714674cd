"""The service's own QuestDB as a source of evidence: read-only, bounded, behind a breaker.

Two reads. The table's metadata (its partitioning and TTL from `tables()`, the
partitions present from `table_partitions()`, its write-ahead log from `wal_tables()`)
is read every `refresh` seconds by a task of its own and kept. On a miss, one query
looks for the ID's row within `slack` of the second its ID names, by the designated
timestamp (QuestDB finds that interval by binary search: a few rows read, not a
partition), in each partition present that the interval touches, within `budget`.

What asyncpg meets on QuestDB's wire protocol (9.3): prepared statements, the
statement cache and a pool's reset on release all work (the store skips the reset);
a parameter is typed from the column it is compared with, so bind values only in
comparisons (`$1::timestamp` or a bare `$1` in the select list is taken for a number);
`TIMESTAMP` is a timestamp without time zone, so its parameters are naive datetimes in
UTC (aware ones are refused by asyncpg); `table_partitions()` takes the table's name as a literal; a
`UUID` parameter goes as text. Columns asyncpg cannot read from QuestDB: `IPV4` and
`GEOHASH` (decoding fails), arrays (their type lookup calls `set_config`, which QuestDB
lacks); the row query reads every other column (`table_columns()`, read with the
metadata), or those `columns` names.
QuestDB drops a connection idle for 5 minutes: the pool lets go of idle ones first.
A connection goes back to the pool as it is (the store sets nothing on it), so a
release costs no round trip; one whose query did not answer, by the budget or because
the caller gave up, is terminated: asyncpg would otherwise send a cancel and wait,
shielded from the caller, for the server to confirm it.

Failures are `StoreUnavailable` with a `StoreFailure` kind: the caller falls back on
the lifecycle store's evidence (`classify` says what the evidence proves).
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg

from ..config import Config, mask_url
from ..pg import closed, held
from .breaker import Breaker
from .retention import Period, StoreRetention, Unit

log = logging.getLogger("session_lens.evidence.questdb")

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,126}")
PARTITION_UNITS = {
    "HOUR": Unit.HOUR,
    "DAY": Unit.DAY,
    "WEEK": Unit.WEEK,
    "MONTH": Unit.MONTH,
    "YEAR": Unit.YEAR,
}
PARTITION_NAMES = {
    Unit.HOUR: "%Y-%m-%dT%H",
    Unit.DAY: "%Y-%m-%d",
    Unit.WEEK: "%G-W%V",
    Unit.MONTH: "%Y-%m",
    Unit.YEAR: "%Y",
}
"""How QuestDB names a partition that starts at a moment."""
TTL_UNITS = {"HOUR": "h", "DAY": "d", "WEEK": "w", "MONTH": "M", "YEAR": "y"}
EVER = (datetime(1970, 1, 1, tzinfo=UTC), datetime(2262, 1, 1, tzinfo=UTC))
"""The bounds of an unpartitioned table's one span."""
META_REFRESH = 5.0
"""Seconds between two reads of the table's metadata (its partitions, its WAL state)."""
SECOND = timedelta(seconds=1)
MAX_SPANS = 64
"""The most partitions one row query looks in."""
_UNREADABLE = re.compile(r"IPV4|GEOHASH|.*\[\]")
"""Column types asyncpg cannot decode from QuestDB: left out of the row query."""
UNREACHABLE = (OSError, asyncpg.InterfaceError, asyncpg.exceptions.ConnectionDoesNotExistError)


class StoreFailure(StrEnum):
    """Why the store gave no evidence."""

    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    QUERY = "query"
    BREAKER_OPEN = "breaker_open"
    NO_TABLE = "no_table"


class StoreUnavailable(Exception):
    """The store could not be asked; `kind` says how, `detail` what it said."""

    def __init__(self, kind: StoreFailure, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class QuestDBSettings:
    """Where the store is and how to read it; names are checked, as they go into SQL."""

    url: str
    table: str
    id_column: str
    timestamp_column: str
    budget: float = 0.05
    """Seconds one row query may take."""
    refresh: float = META_REFRESH
    """Seconds between two reads of the metadata."""
    meta_timeout: float = 2.0
    """Seconds one read of the metadata (four queries) may take."""
    slack: timedelta = timedelta(minutes=10)
    """How far from the second its ID names a row's designated timestamp may be (the
    row is looked for there, in every partition that interval touches)."""
    pool_size: int = 4
    """Connections held at once: misses asking beyond them wait, within their budget."""
    columns: tuple[str, ...] = ()
    """The row's columns to read; none named: all of them."""

    def __post_init__(self) -> None:
        names = [("table", self.table), ("id_column", self.id_column)]
        names += [("timestamp_column", self.timestamp_column)]
        names += [("column", column) for column in self.columns]
        for what, name in names:
            if not NAME.fullmatch(name):
                raise ValueError(f"{what} {name!r} is not a plain name")


def configured(config: Config, **more: Any) -> QuestDBSettings | None:
    """The store `config` names, with `more` of its settings; None when it names none."""
    if config.questdb_url is None:
        return None
    return QuestDBSettings(
        config.questdb_url,
        config.questdb_table,
        config.questdb_id_column,
        config.questdb_timestamp_column,
        **{"pool_size": config.questdb_pool_size, "slack": config.questdb_slack, **more},
    )


@dataclass(frozen=True, slots=True)
class WalState:
    """The table's write-ahead log: applied up to `writer_txn` of `sequencer_txn`."""

    suspended: bool
    writer_txn: int
    sequencer_txn: int
    error: str = ""

    @property
    def pending(self) -> int:
        """Transactions accepted and not yet visible."""
        return max(0, self.sequencer_txn - self.writer_txn)


@dataclass(frozen=True, slots=True)
class TableMeta:
    """What the store says of the table, and when it said it."""

    partition_by: Unit | None
    """None: not partitioned."""
    ttl: Period | None
    wal: WalState | None
    """None: not a WAL table."""
    partitions: frozenset[str]
    oldest: str | None
    read_at: datetime
    took: float
    """Seconds the metadata queries took."""
    columns: tuple[str, ...] = ()
    """The table's columns the row query reads: all that asyncpg can decode."""

    def partition_bounds(self, moment: datetime) -> tuple[str, datetime, datetime] | None:
        """The name, start and end of the partition `moment` (aware) falls in."""
        if self.partition_by is None:
            return None
        start, end = StoreRetention(Period(1, Unit.DAY), self.partition_by).partition_of(moment)
        return start.strftime(PARTITION_NAMES[self.partition_by]), start, end


@dataclass(frozen=True, slots=True)
class StoreEvidence:
    """What the store says of one ID: its partition(s), whether present, its row."""

    partitions: tuple[str, ...]
    """The partitions the interval within the slack of the ID's second touches."""
    present: tuple[bool, ...]
    """Whether each of them exists now."""
    before_oldest: bool
    """All of them are older than the oldest the table has: dropped."""
    row: dict[str, Any] | None
    """The row, read in the partitions present; None when absent."""
    meta: TableMeta
    own: str = ""
    """The partition the ID's own second falls in (one of `partitions`)."""

    @property
    def gone(self) -> bool:
        """Whether the ID's partitions are gone: all older than the oldest the table has
        (dropped by its TTL, or from its start). One missing between partitions that are
        there proves nothing: QuestDB makes no partition for a period without writes."""
        return self.before_oldest


@dataclass
class QuestDBStore:
    """A read-only pool to QuestDB, the cached metadata, the row query."""

    settings: QuestDBSettings
    breaker: Breaker = field(default_factory=Breaker)
    clock: Callable[[], float] = time.monotonic
    meta: TableMeta | None = None
    failures: dict[StoreFailure, int] = field(default_factory=dict)
    problem: str | None = None
    """What is wrong now (for /readyz), None while the store answers."""
    on_meta: Callable[[TableMeta], None] | None = None
    """Called with each metadata read (the WAL gauges)."""
    _pool: asyncpg.Pool | None = None
    _task: "asyncio.Task[None] | None" = None

    def __post_init__(self) -> None:
        s = self.settings
        self._row_query = ""
        self._row_columns: tuple[str, ...] | None = None
        self._columns_query = f"SELECT * FROM table_columns('{s.table}')"
        self._tables_query = (
            "SELECT partitionBy, ttlValue, ttlUnit, walEnabled FROM tables() WHERE table_name = $1"
        )
        self._partitions_query = f"SELECT name FROM table_partitions('{s.table}')"
        self._wal_query = (
            "SELECT suspended, writerTxn, sequencerTxn, errorMessage FROM wal_tables()"
            " WHERE name = $1"
        )

    async def open(self) -> None:
        """Open the pool lazily (QuestDB may be down at start) and start the refresh task."""
        self._pool = asyncpg.create_pool(
            self.settings.url,
            min_size=0,
            max_size=self.settings.pool_size,
            timeout=max(1.0, self.settings.budget),
            # QuestDB closes a connection idle for 5 minutes: leave well before it does.
            max_inactive_connection_lifetime=60.0,
            reset=_nothing_to_reset,
        )
        await self._pool
        with contextlib.suppress(StoreUnavailable):
            await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stop refreshing and close the pool."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pool is not None:
            await closed(self._pool)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh)
            with contextlib.suppress(StoreUnavailable):
                await self.refresh()

    async def refresh(self) -> TableMeta:
        """Read the table's metadata now, and keep it."""
        started = self.clock()
        # Not behind the breaker: misses that time out must not stop the WAL gauges (and
        # the alert on a suspended table) from being read, every few seconds, bounded.
        tables, partitions, wal, columns_read = await self._ask(
            self._read_meta, timeout=self.settings.meta_timeout, gated=False
        )
        if tables is None:
            raise self._failed(StoreFailure.NO_TABLE, f"no table {self.settings.table}")
        unit = PARTITION_UNITS.get(str(tables["partitionBy"]).upper())
        ttl = None
        if tables["ttlValue"] and str(tables["ttlUnit"]).upper() in TTL_UNITS:
            ttl = Period.parse(f"{tables['ttlValue']}{TTL_UNITS[str(tables['ttlUnit']).upper()]}")
        columns = self._readable(columns_read)
        names = sorted(str(row["name"]) for row in partitions)
        state = None
        if tables["walEnabled"] and wal is not None:
            state = WalState(
                bool(wal["suspended"]), int(wal["writerTxn"]), int(wal["sequencerTxn"]),
                str(wal["errorMessage"] or ""),
            )  # fmt: skip
        self.meta = TableMeta(
            unit, ttl, state, frozenset(names), names[0] if names else None,
            datetime.now(UTC), self.clock() - started, columns,
        )  # fmt: skip
        if not self.breaker.is_open:
            self._answers()
        if self.on_meta is not None:
            self.on_meta(self.meta)
        return self.meta

    async def _read_meta(self, conn: asyncpg.Connection) -> tuple[Any, Any, Any, Any]:
        table = self.settings.table
        timeout = self.settings.meta_timeout
        tables = await conn.fetchrow(self._tables_query, table, timeout=timeout)
        if tables is None:
            return None, None, None, None
        partitions = await conn.fetch(self._partitions_query, timeout=timeout)
        wal = await conn.fetchrow(self._wal_query, table, timeout=timeout)
        columns = await conn.fetch(self._columns_query, timeout=timeout)
        return tables, partitions, wal, columns

    def _readable(self, rows: list[Any]) -> tuple[str, ...]:
        """The columns the row query reads, from `table_columns()`; the ID and designated
        timestamp columns checked to be there (a store that lacks them proves nothing)."""
        s = self.settings
        types = {str(row["column"]): str(row["type"]).upper() for row in rows}
        designated = next((str(row["column"]) for row in rows if row["designated"]), None)
        if s.id_column not in types:
            raise self._failed(StoreFailure.QUERY, f"{s.table} has no column {s.id_column}")
        if s.timestamp_column != designated:
            raise self._failed(
                StoreFailure.QUERY,
                f"{s.timestamp_column} is not {s.table}'s designated timestamp"
                f" ({designated or 'it has none'})",
            )
        named = s.columns or tuple(types)
        return tuple(name for name in named if not _UNREADABLE.match(types.get(name, "")))

    async def look_up(self, session_id: str, minted: datetime) -> StoreEvidence:
        """The store's evidence on an ID minted at `minted` (aware); raises StoreUnavailable."""
        meta = self.meta
        if meta is None:
            raise StoreUnavailable(StoreFailure.UNAVAILABLE, self.problem or "no metadata yet")
        spans = _spans(meta, minted, self.settings.slack)
        present = tuple(name in meta.partitions for name, _, _ in spans)
        if meta.partition_by is None:  # one table, no partition to lose
            present = (True,)
        before_oldest = (
            meta.partition_by is not None and meta.oldest is not None and spans[-1][0] < meta.oldest
        )
        row = None
        if any(present):
            kept = [span for span, here in zip(spans, present, strict=True) if here]
            # Its row is written within `slack` of the second its ID names: the designated
            # timestamp's interval, not the whole partition, is scanned (by binary search).
            low, high = window(minted, self.settings.slack)
            lo, hi = _naive(max(kept[0][1], low)), _naive(min(kept[-1][2], high))
            budget = self.settings.budget
            query = self._row_query_for(meta.columns)

            async def read(conn: asyncpg.Connection) -> Any:
                return await conn.fetchrow(query, lo, hi, session_id, timeout=budget)

            found = await self._ask(read, timeout=budget)
            row = dict(found) if found is not None else None
        names = tuple(name for name, _, _ in spans)
        own = next((name for name, start, end in spans if start <= minted < end), names[0])
        return StoreEvidence(names, present, before_oldest, row, meta, own)

    def _row_query_for(self, columns: tuple[str, ...]) -> str:
        """The row query reading `columns` (all of them when none are known), kept while
        they stay the same so asyncpg's statement cache holds it."""
        if columns != self._row_columns:
            s = self.settings
            self._row_query = (
                f"SELECT {', '.join(columns) or '*'} FROM {s.table}"
                f" WHERE {s.timestamp_column} >= $1 AND {s.timestamp_column} < $2"
                f" AND {s.id_column} = $3 LIMIT 1"
            )
            self._row_columns = columns
        return self._row_query

    async def _ask(
        self, work: Callable[[asyncpg.Connection], Any], timeout: float, gated: bool = True
    ) -> Any:
        """One use of a pooled connection, bounded, behind the breaker unless not `gated`
        (then it neither asks the breaker nor tells it how it went); failures translated."""
        breaker = self.breaker if gated else Breaker()
        if self._pool is None:
            raise StoreUnavailable(StoreFailure.UNAVAILABLE, "not opened")
        if not breaker.allow():
            raise self._failed(StoreFailure.BREAKER_OPEN, self.problem or "", count_only=True)
        deadline = asyncio.get_running_loop().time() + timeout
        try:  # a query left unanswered (the deadline, a caller gone) cuts its connection
            async with asyncio.timeout_at(deadline), held(self._pool) as conn:
                result = await work(conn)
        except TimeoutError:
            breaker.failed()
            raise self._failed(StoreFailure.TIMEOUT, f"no answer within {timeout:g} s") from None
        except (asyncpg.PostgresError, AssertionError) as exc:  # AssertionError: asyncpg's decoder
            breaker.failed()
            raise self._failed(StoreFailure.QUERY, str(exc)) from exc
        except UNREACHABLE as exc:
            breaker.failed()
            raise self._failed(StoreFailure.UNAVAILABLE, str(exc) or type(exc).__name__) from exc
        except Exception as exc:
            # column, an endpoint that is no PGWire server) is the store failing, never the hop
            breaker.failed()
            raise self._failed(StoreFailure.QUERY, f"{type(exc).__name__}: {exc}") from exc
        breaker.succeeded()
        if gated and not self.breaker.is_open:
            self._answers()
        return result

    def _answers(self) -> None:
        """The store gave what was asked: a problem said before is over."""
        if self.problem is not None:
            log.warning("questdb store answers again", extra={"store": self._where})
            self.problem = None

    @property
    def _where(self) -> str:
        return f"{mask_url(self.settings.url)} table {self.settings.table}"

    def _failed(
        self, kind: StoreFailure, detail: str, count_only: bool = False
    ) -> StoreUnavailable:
        """Count a failure; log the first of a run of them, once."""
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if not count_only and self.problem is None:
            log.warning(
                "questdb store unavailable",
                extra={"store": self._where, "kind": kind.value, "detail": detail},
            )
            self.problem = f"{kind.value}: {detail}"
        return StoreUnavailable(kind, detail)


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """A released connection is kept as it is: the store only reads, and sets nothing
    (asyncpg's reset would cost a round trip per miss, outside any budget)."""


Span = tuple[str, datetime, datetime]


def window(minted: datetime, slack: timedelta) -> tuple[datetime, datetime]:
    """Where a row of an ID minted at `minted` (the start of its second) is stamped: within
    `slack` of that second, inside the times QuestDB can hold."""
    low = minted - slack if minted - EVER[0] > slack else EVER[0]
    high = minted + SECOND + slack if EVER[1] - minted > SECOND + slack else EVER[1]
    return low, high


def _spans(meta: TableMeta, minted: datetime, slack: timedelta) -> list[Span]:
    """The partitions (name, start, end) a row of an ID minted at `minted` may be in: each
    that `window` touches, oldest first (at most `MAX_SPANS`, the nearest to `minted`)."""
    low, high = window(minted, slack)
    first = meta.partition_bounds(low)
    if first is None:
        return [("default", EVER[0], EVER[1])]
    spans = [first]
    while spans[-1][2] < high:
        following = meta.partition_bounds(spans[-1][2])
        assert following is not None
        spans.append(following)
    if len(spans) > MAX_SPANS:  # a slack of many partitions: those nearest its second
        middle = next(i for i, span in enumerate(spans) if span[1] <= minted < span[2])
        start = max(0, min(middle - MAX_SPANS // 2, len(spans) - MAX_SPANS))
        spans = spans[start : start + MAX_SPANS]
    return spans


def _naive(moment: datetime) -> datetime:
    """A moment as QuestDB's TIMESTAMP parameters take it: naive, in UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)
