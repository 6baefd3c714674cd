"""The service's QuestDB as evidence: a miss's row query and the metadata refresh, timed.

    python -m tests.benchmarks.questdb_store [--rows 1000000] [--days 60] [--misses 2000]

Starts the pinned QuestDB (`.ci/questdb-jar`), fills a WAL table partitioned by day with
`--rows` sessions over `--days` days, and times through one `QuestDBStore`: the row
query of a miss (an ID absent from a partition that is there), of a hit, and the
metadata refresh (`tables()`, `table_partitions()`, `wal_tables()`), each beside the
floor of a round trip on the same pool (`SELECT 1`), in one run. Then misses from 16
tasks at once, for a rate.

Then a whole miss as the hop explains it, `Explainer.explain_miss`, open loop at
`--rate` a second, with the store as evidence and without it (the lifecycle tables
alone, in an embedded PostgreSQL, migrated and empty: the IDs have no lifecycle
record), taking turns for `--rounds` rounds of `--seconds`.
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
from prometheus_client import CollectorRegistry

from session_lens.config import load_config
from session_lens.embedded import start_embedded
from session_lens.evidence.questdb import QuestDBSettings, QuestDBStore
from session_lens.explain import Explainer
from session_lens.metrics import Metrics
from session_lens.migrations import migrate
from session_lens.schema import Tables
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


async def measure(url: str, rows: int, days: int, misses: int) -> datetime:
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
    return origin


async def open_loop(
    explainer: Explainer, ids: list[str], rate: float, reasons: dict[str, int]
) -> tuple[list[float], float]:
    """Milliseconds of each miss sent at `rate` a second whatever the answers (their
    reasons counted into `reasons`); the rate achieved."""
    loop = asyncio.get_running_loop()
    took: list[float] = []

    async def one(session_id: str) -> None:
        started = time.perf_counter()
        reason = (await explainer.explain_miss(session_id, False)).reason.value
        took.append((time.perf_counter() - started) * 1000)
        reasons[reason] = reasons.get(reason, 0) + 1

    tasks = []
    start = loop.time()
    for n, session_id in enumerate(ids):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(session_id)))
    await asyncio.gather(*tasks)
    return took, len(ids) / (loop.time() - start)


async def whole_misses(
    url: str, lifecycle: str, origin: datetime, days: int, rate: float, seconds: float, rounds: int
) -> None:
    conn = await asyncpg.connect(lifecycle)
    try:
        await migrate(conn, Tables())
    finally:
        await conn.close()
    flags = {"upstream": "http://127.0.0.1:1", "database_url": lifecycle}
    store = {"questdb_url": url, "questdb_table": "sessions", "questdb_id_column": "session_id",
             "questdb_timestamp_column": "created"}  # fmt: skip
    kinds = {"without the store": load_config(flags=flags),
             "with the store": load_config(flags={**flags, **store})}  # fmt: skip
    registries = {kind: CollectorRegistry() for kind in kinds}
    explainers = {kind: Explainer(config, Metrics(registries[kind], ()), lifecycle)
                  for kind, config in kinds.items()}  # fmt: skip
    reasons: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    took: dict[str, list[float]] = {kind: [] for kind in kinds}
    achieved: dict[str, list[float]] = {kind: [] for kind in kinds}
    hours = days * 24 - 2

    def ids(count: int, salt: int) -> list[str]:
        minted = [
            origin + timedelta(hours=(n * 7 + salt) % hours, seconds=n % 3600) for n in range(count)
        ]
        return [m.strftime("exec_%Y%m%d_%H%M%S_") + f"f{n:07x}" for n, m in enumerate(minted)]

    for explainer in explainers.values():
        await explainer.open()
    try:
        for explainer in explainers.values():  # warm
            for session_id in ids(200, 0):
                await explainer.explain_miss(session_id, False)
        for round_ in range(rounds):
            for kind, explainer in explainers.items():
                misses = ids(int(rate * seconds), round_ + 1)
                times, got = await open_loop(explainer, misses, rate, reasons[kind])
                took[kind] += times
                achieved[kind].append(got)
    finally:
        for explainer in explainers.values():
            await explainer.close()
    # The refresh alone, on a store of its own (the hop's may have its breaker open).
    settings = QuestDBSettings(url, "sessions", "session_id", "created", budget=1.0, refresh=3600)
    alone = QuestDBStore(settings)
    await alone.open()
    try:
        refresh = await timed(50, lambda _: alone.refresh())
    finally:
        await alone.close()
    print(
        f"\n`Explainer.explain_miss` open loop at {rate:,.0f}/s, {rounds} rounds of"
        f" {seconds:g} s each, taking turns; IDs absent from partitions that are there,"
        " no lifecycle record.\n"
    )
    print(
        "| miss explained | misses | achieved | p50 | p99 | max | p50 / without"
        " | p99 / without | reasons |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    base = took["without the store"]
    b50, b99 = statistics.median(base), statistics.quantiles(base, n=100)[98]
    for kind, times in took.items():
        p50, p99 = statistics.median(times), statistics.quantiles(times, n=100)[98]
        said = ", ".join(f"{r} {c}" for r, c in sorted(reasons[kind].items()))
        print(
            f"| {kind} | {len(times):,} | {min(achieved[kind]):,.0f}/s | {p50:.2f} ms"
            f" | {p99:.2f} ms | {max(times):.2f} ms | {p50 / b50:.2f} | {p99 / b99:.2f}"
            f" | {said} |"
        )
    failed = {
        sample.labels["kind"]: int(sample.value)
        for family in registries["with the store"].collect()
        if family.name == "session_lens_questdb_errors"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    }
    print(f"\n`questdb_errors_total` with the store: {failed or 'none'}.")
    r50, r99 = statistics.median(refresh), statistics.quantiles(refresh, n=100)[98]
    print(
        "\nThe metadata refresh (three queries, every 5 s), the hop idle:"
        f" p50 {r50:.2f} ms, p99 {r99:.2f} ms."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--misses", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    why = questdb_missing()
    if why is not None:
        raise SystemExit(f"no QuestDB: {why}")
    server = QuestDB(Path(tempfile.mkdtemp(prefix="session-lens-questdb-")))
    server.start()
    try:
        lifecycle = start_embedded(Path(tempfile.mkdtemp()), delete_on_exit=True).url
        origin = asyncio.run(measure(server.url, args.rows, args.days, args.misses))
        asyncio.run(
            whole_misses(
                server.url, lifecycle, origin, args.days, args.rate, args.seconds, args.rounds
            )
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
