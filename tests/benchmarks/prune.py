"""Prune: 10 million of the misses set's 50 million audit entries removed while a service writes.

    python -m tests.benchmarks.prune [--remove 10000000] [--rate 200] [--baseline 30]
                                     [--batch-size 5000]

Works on a copy of the misses part's database (`CREATE DATABASE ... TEMPLATE
session_lens_misses`, loaded by that part's code on first use and migrated to
the current version), dropped afterwards: the cached set itself is never pruned.
The cut-off is the time before which `--remove` entries lie (from a sample of
half a million, so the count removed is near it, and printed as it is).

A writer inserts into `sessions` at `--rate` a second, open loop, through a pool
as a service would (each insert writes its audit entry through the trigger):
first `--baseline` seconds alone, then for as long as the prune runs. The prune
is `session-lens prune`'s own code (`Pruning`: the horizon, the concurrent index
builds, the batches), on the same event loop, on a cold copy (no prewarm).
Prints markdown: the data, the stages' times, and the writes' latencies (from
the call to its answer) without the prune, during the index builds and during
the deletes.
"""

import argparse
import asyncio
import importlib.util
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from session_lens.embedded import start_embedded
from session_lens.migrations import qualified
from session_lens.prune import Pruning, Stage
from session_lens.schema import Tables
from tests.benchmarks.misses import DATABASE, ROOT, Layout, prepared, run_on
from tests.benchmarks.tools import mib, micros, percentile
from tests.conftest import with_database

COPY = "session_lens_prune"
POOL = 10


@dataclass
class Writes:
    """The writer's latencies (seconds) by what was going on when each write began."""

    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: int = 0


async def write(url: str, rate: float, phase: "Phase", writes: Writes, stop: asyncio.Event) -> None:
    """Open loop: insert i starts at i / rate whether or not the earlier ones have answered."""
    pool = await asyncpg.create_pool(url, min_size=POOL, max_size=POOL)
    running: set[asyncio.Task[None]] = set()
    stamp = f"exec_{datetime.now(UTC):%Y%m%d_%H%M%S}"

    async def one(n: int) -> None:
        label = phase.current
        started = time.perf_counter()
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO sessions (id) VALUES ($1)", f"{stamp}_{n:08x}", timeout=60
                )
        except (asyncpg.PostgresError, TimeoutError):
            writes.errors += 1
            return
        writes.latencies[label].append(time.perf_counter() - started)

    try:
        began = time.perf_counter()
        n = 0
        while not stop.is_set():
            delay = began + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(n))
            running.add(task)
            task.add_done_callback(running.discard)
            n += 1
        await asyncio.gather(*running)
    finally:
        await pool.close()


@dataclass
class Phase:
    """What the writer's next write is measured as."""

    label: str = "without the prune"
    pruning: Pruning | None = None

    @property
    def current(self) -> str:
        if self.pruning is None:
            return self.label
        if self.pruning.stage in (Stage.AUDIT, Stage.EVENTS):
            return "during the deletes"
        if self.pruning.stage is Stage.INDEXES:
            return "during the index builds"
        return "during the prune, other stages"


async def measure(
    admin_url: str, url: str, remove: int, rate: float, baseline: float, batch_size: int
) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {COPY} WITH (FORCE)")
        started = time.perf_counter()
        # File by file: a WAL-logged copy of 10 GiB would take far longer.
        await admin.execute(f"CREATE DATABASE {COPY} TEMPLATE {DATABASE} STRATEGY FILE_COPY")
        copied = time.perf_counter() - started
        try:
            await _prune(url, remove, rate, baseline, batch_size, copied)
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {COPY} WITH (FORCE)")
    finally:
        await admin.close()


async def _prune(
    url: str, remove: int, rate: float, baseline: float, batch_size: int, copied: float
) -> None:
    conn = await asyncpg.connect(url)
    try:
        total = await conn.fetchval("SELECT count(*) FROM session_audit")
        cutoff = await conn.fetchval(
            "SELECT percentile_disc($1::float8) WITHIN GROUP (ORDER BY occurred_at)"
            " FROM session_audit TABLESAMPLE SYSTEM ($2) REPEATABLE (1)",
            remove / total,
            min(100.0, 100 * 500_000 / total),  # half a million entries or so
        )
        size = await conn.fetchval("SELECT pg_total_relation_size('session_audit')")
        pruning = Pruning(conn, await qualified(conn, Tables()), cutoff, batch_size)
        phase = Phase()
        writes = Writes()
        stop = asyncio.Event()
        writer = asyncio.create_task(write(url, rate, phase, writes, stop))
        try:
            await asyncio.sleep(baseline)
            phase.pruning = pruning
            await pruning.run()
        finally:
            stop.set()
            await writer
        plan = await conn.fetch(
            "EXPLAIN " + pruning.queries.audit_batch, cutoff, datetime.min, 0, batch_size
        )
        lines = [row[0].strip(" ->").split("  (cost")[0] for row in plan]
        scan = next(line for line in lines if "occurred_at_idx" in line)
        found = next(x for x in lines if x.endswith(" on session_audit a") and "Delete" not in x)
        index_size = await conn.fetchval("SELECT pg_relation_size('session_audit_occurred_at_idx')")
        left = await conn.fetchval(
            "SELECT count(*) FROM session_audit WHERE occurred_at < $1", cutoff
        )
        after = await conn.fetchval("SELECT count(*) FROM session_audit")
    finally:
        await conn.close()
    assert left == 0, left
    seconds = pruning.seconds
    batches = -(-pruning.audit_removed // batch_size)
    print(
        "| audit entries | `session_audit` with indexes | copy | cut-off | removed | after"
        " (with the writes) |"
    )
    print("|---:|---:|---:|---|---:|---:|")
    print(
        f"| {total:,} | {mib(size)} | {copied:.0f} s | {cutoff:%Y-%m-%d %H:%M} UTC"
        f" | {pruning.audit_removed:,} | {after:,} |"
    )
    print()
    print("| horizon | index builds (2) | deletes | batches | per batch | events | whole prune |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    whole = sum(seconds.values())
    print(
        f"| {seconds[Stage.HORIZON] * 1000:.0f} ms | {seconds[Stage.INDEXES]:.1f} s"
        f" | {seconds[Stage.AUDIT]:.1f} s | {batches:,} of {batch_size:,}"
        f" | {seconds[Stage.AUDIT] / max(1, batches) * 1000:.1f} ms"
        f" | {seconds[Stage.EVENTS] * 1000:.0f} ms | {whole:.1f} s |"
    )
    print()
    print(
        f"The index on `session_audit (occurred_at, id)`: {mib(index_size)}."
        f" A batch reads by {scan}, and the delete finds its rows by {found}."
    )
    print()
    print(f"| inserts into `sessions` at {rate:,.0f}/s | writes | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    for label in (
        "without the prune",
        "during the index builds",
        "during the deletes",
        "during the prune, other stages",
    ):
        done = sorted(writes.latencies.get(label, []))
        if not done:
            continue
        print(
            f"| {label} | {len(done):,} | {micros(percentile(done, 0.5))}"
            f" | {micros(percentile(done, 0.99))} | {micros(done[-1])} |"
        )
    print()
    print(f"Writes that failed: {writes.errors}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000_000, help="of the misses set")
    parser.add_argument("--audit-rows", type=int, default=50_000_000, help="of the misses set")
    parser.add_argument("--remove", type=int, default=10_000_000, help="audit entries, about")
    parser.add_argument("--rate", type=float, default=200.0, help="writes per second")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds without the prune")
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".benchmarks" / "misses-db")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    )
    args = parser.parse_args()
    server = start_embedded(args.data_dir)
    layout = Layout(args.sessions, args.audit_rows)
    prepared(server.url, with_database(server.url, DATABASE), layout, args.data_dir)
    url = with_database(server.url, COPY)
    run_on(
        measure(server.url, url, args.remove, args.rate, args.baseline, args.batch_size),
        args.loop,
    )


if __name__ == "__main__":
    main()
