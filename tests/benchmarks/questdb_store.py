"""The service's QuestDB as evidence: a miss's row query and the metadata refresh, timed.

    python -m tests.benchmarks.questdb_store [--rows 1000000] [--days 60] [--misses 2000]

Starts the pinned QuestDB (`.ci/questdb-jar`), fills a WAL table partitioned by day with
`--rows` sessions over `--days` days, and times through one `QuestDBStore`: the row
query of a miss (an ID absent from a partition that is there), of a hit, and the
metadata refresh (`tables()`, `table_partitions()`, `wal_tables()`), each beside the
floor of a round trip on the same pool (`SELECT 1`), in one run. Then misses from 16
tasks at once, for a rate.
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from session_lens.questdb_store import QuestDBSettings, QuestDBStore
from tests.questdb import QuestDB
from tests.questdb import missing as questdb_missing

FILL = (
    "INSERT INTO sessions SELECT"
    " concat('exec_', to_str(ts, 'yyyyMMdd_HHmmss'), '_', lpad(cast(x AS string), 8, '0')),"
    " cast(CASE x % 5 WHEN 0 THEN 'DELETED' ELSE 'ACTIVE' END AS SYMBOL), ts, ts"
    " FROM (SELECT x, cast('{origin}' AS timestamp) + x * {step} ts"
    " FROM long_sequence({rows}))"
)


async def build(url: str, rows: int, days: int) -> datetime:
    """The table filled and applied; the moment its first day starts."""
    origin = (datetime.now(UTC) - timedelta(days=days)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE sessions (session_id VARCHAR, state SYMBOL, created TIMESTAMP,"
            f" updated TIMESTAMP) TIMESTAMP(created) PARTITION BY DAY TTL {days + 30} DAYS WAL"
        )
        step = days * 86_400_000_000 // rows  # microseconds; a second or more keeps IDs unique
        await conn.execute(FILL.format(step=step, origin=f"{origin:%Y-%m-%dT%H:%M:%S}Z", rows=rows))
        while await conn.fetchval("SELECT count() FROM sessions") < rows:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # QuestDB tells no one when its WAL is applied
    finally:
        await conn.close()
    return origin


async def timed(times: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Milliseconds of each of `times` calls, one after the other."""
    took = []
    for n in range(times):
        started = time.perf_counter()
        await call(n)
        took.append((time.perf_counter() - started) * 1000)
    return took


def row(label: str, took: list[float], floor: list[float]) -> str:
    p50, p99 = statistics.median(took), statistics.quantiles(took, n=100)[98]
    f50 = statistics.median(floor)
    return f"| {label} | {len(took):,} | {p50:.2f} ms | {p99:.2f} ms | {p50 / f50:.1f} |"


async def measure(url: str, rows: int, days: int, misses: int) -> None:
    origin = await build(url, rows, days)
    settings = QuestDBSettings(url, "sessions", "session_id", "created", budget=1.0, refresh=3600)
    store = QuestDBStore(settings)
    await store.open()
    assert store.meta is not None and store._pool is not None
    pool = store._pool
    try:
        step = timedelta(microseconds=days * 86_400_000_000 // rows)
        hours = int(rows * step.total_seconds() // 3600) - 1  # the hours the rows cover

        def absent(n: int) -> tuple[str, datetime]:
            minted = origin + timedelta(hours=(n * 7) % hours, seconds=1)
            return minted.strftime("exec_%Y%m%d_%H%M%S_") + "ffffffff", minted

        def present(n: int) -> tuple[str, datetime]:
            x = 1 + (n * 7919) % rows
            minted = origin + x * step
            return minted.strftime("exec_%Y%m%d_%H%M%S_") + f"{x:08d}", minted

        async def miss(n: int) -> None:
            found = await store.look_up(*absent(n))
            assert found.row is None and all(found.present)

        async def hit(n: int) -> None:
            assert (await store.look_up(*present(n))).row is not None

        async def floor(_: int) -> None:
            await pool.fetchval("SELECT 1")

        await timed(200, miss)  # warm: statements prepared, pages in memory
        await timed(200, hit)
        floors = await timed(misses, floor)
        missed = await timed(misses, miss)
        hits = await timed(misses, hit)
        refreshes = await timed(200, lambda _: store.refresh())
        started = time.perf_counter()
        counter = iter(range(misses * 4))

        async def worker() -> None:
            for n in counter:
                await miss(n)

        await asyncio.gather(*(worker() for _ in range(16)))
        rate = misses * 4 / (time.perf_counter() - started)
    finally:
        await store.close()
    meta = store.meta
    assert meta is not None
    print(f"{rows:,} sessions over {len(meta.partitions)} daily partitions of one WAL table;"
          f" one `QuestDBStore` (pool of {settings.pool_size}), its calls one after the other;"
          " the floor is `SELECT 1` on the same pool.\n")  # fmt: skip
    print("| call | calls | p50 | p99 | p50 / floor p50 |")
    print("|---|---:|---:|---:|---:|")
    print(row("`SELECT 1` (the floor)", floors, floors))
    print(row("a miss: the row query in a present partition, nothing found", missed, floors))
    print(row("a hit: the row query finding the row", hits, floors))
    print(row("the metadata refresh (three queries)", refreshes, floors))
    print(f"\nMisses from 16 tasks at once: {rate:,.0f} a second.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--misses", type=int, default=2000)
    args = parser.parse_args()
    why = questdb_missing()
    if why is not None:
        raise SystemExit(f"no QuestDB: {why}")
    server = QuestDB(Path(tempfile.mkdtemp(prefix="session-lens-questdb-")))
    server.start()
    try:
        asyncio.run(measure(server.url, args.rows, args.days, args.misses))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
