"""A service using its own sessions table while `session-lens migrate` runs on it.

The table is the service's own (its columns, text IDs minted over a year, its own
creation column `started`). The service reads and writes it open loop, at a rate,
through pools of its own connections: each call is timed from the moment it was
due, so a call queued behind a lock counts all of its wait. What it wrote is kept,
for the checks afterwards. Shared by the tests and the benchmark.
"""

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

LEGACY = (
    "CREATE TABLE sessions (id text PRIMARY KEY, owner text NOT NULL, payload jsonb,"
    " started timestamptz NOT NULL)"
)
FIRST_MINTED = datetime(2025, 1, 1, tzinfo=UTC)
SPACING = timedelta(seconds=30)
"""Legacy row n was minted at FIRST_MINTED + n * SPACING (a year holds a million)."""


def legacy_id(n: int) -> str:
    """The ID of legacy row n."""
    return f"exec_{FIRST_MINTED + n * SPACING:%Y%m%d_%H%M%S}_{n:08x}"


async def create_legacy(conn: asyncpg.Connection, rows: int) -> None:
    """The service's table with `rows` sessions; `started` one second after the ID's time."""
    await conn.execute(LEGACY)
    chunk = 1_000_000
    for first in range(0, rows, chunk):
        await conn.execute(
            "INSERT INTO sessions (id, owner, payload, started)"
            " SELECT 'exec_' || to_char(m AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MISS')"
            "  || '_' || lpad(to_hex(g), 8, '0'),"
            "  'user' || (g % 97), jsonb_build_object('n', g), m + interval '1 second'"
            " FROM generate_series($1::int, $2::int) AS g,"
            "  LATERAL (SELECT ($3::timestamptz + g * $4::interval) AS m) AS t",
            first,
            min(rows, first + chunk) - 1,
            FIRST_MINTED,
            SPACING,
        )
    await conn.execute("ANALYZE sessions")


@dataclass
class Calls:
    """Each call's latency (seconds) under the phase it began in, and what failed."""

    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)

    def worst(self) -> float:
        return max((max(v) for v in self.latencies.values() if v), default=0.0)


@dataclass
class Written:
    """What the service wrote, with when (monotonic) each call returned."""

    inserted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


class Service:
    """A reader and a writer on connections of their own, open loop, each call timed."""

    def __init__(
        self,
        url: str,
        rows: int,
        *,
        reads_per_second: float,
        writes_per_second: float,
        connections: int = 1,
        seed: int = 1,
    ) -> None:
        self.url = url
        self.rows = rows
        self.rates = {"read": reads_per_second, "write": writes_per_second}
        self.connections = connections
        self.phase = "before"
        self.reads = Calls()
        self.writes = Calls()
        self.written = Written()
        self._random = random.Random(seed)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._minted = 0

    async def start(self) -> None:
        """Begin reading and writing."""
        for kind in self.rates:
            pool = await asyncpg.create_pool(
                self.url, min_size=self.connections, max_size=self.connections
            )
            self._tasks.append(asyncio.create_task(self._loop(kind, pool)))

    async def stop(self) -> None:
        """Stop, every call in flight answered."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, kind: str, pool: asyncpg.Pool) -> None:
        rate = self.rates[kind]
        running: set[asyncio.Task[None]] = set()
        try:
            began = time.perf_counter()
            n = 0
            while not self._stop.is_set():
                due = began + n / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                call = self._read if kind == "read" else self._write
                task = asyncio.create_task(call(pool, due))
                running.add(task)
                task.add_done_callback(running.discard)
                n += 1
            await asyncio.gather(*running)
        finally:
            await pool.close()

    async def _read(self, pool: asyncpg.Pool, due: float) -> None:
        key = legacy_id(self._random.randrange(self.rows))
        phase = self.phase
        try:
            async with pool.acquire() as conn:
                await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", key, timeout=60)
        except (asyncpg.PostgresError, TimeoutError) as exc:
            self.reads.errors.append(f"{type(exc).__name__}: {exc}")
            return
        self.reads.latencies[phase].append(time.perf_counter() - due)

    async def _write(self, pool: asyncpg.Pool, due: float) -> None:
        roll = self._random.random()
        phase = self.phase
        if roll < 0.6:
            self._minted += 1
            key = f"exec_{datetime.now(UTC):%Y%m%d_%H%M%S}_f{self._minted:07x}"
            sql = (
                "INSERT INTO sessions (id, owner, payload, started)"
                " VALUES ($1, 'writer', '{}', clock_timestamp())"
            )
            kept = self.written.inserted
        elif roll < 0.9:
            key = legacy_id(self._random.randrange(self.rows))
            sql = "UPDATE sessions SET payload = jsonb_build_object('touched', true) WHERE id = $1"
            kept = self.written.updated
        else:
            key = legacy_id(self._random.randrange(self.rows))
            sql = "DELETE FROM sessions WHERE id = $1"
            kept = self.written.deleted
        try:
            async with pool.acquire() as conn:
                await conn.execute(sql, key, timeout=60)
        except (asyncpg.PostgresError, TimeoutError) as exc:
            self.writes.errors.append(f"{type(exc).__name__}: {exc}")
            return
        self.writes.latencies[phase].append(time.perf_counter() - due)
        kept.append(key)
