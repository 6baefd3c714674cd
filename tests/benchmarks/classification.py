"""Classification latency on a large lifecycle table: p50/p99 of the evidence query.

    python -m tests.benchmarks.classification [--sessions 1000000] [--lookups 5000]

Starts an embedded PostgreSQL in a temporary directory (or uses
SESSION_LENS_BENCH_DATABASE_URL), fills `sessions` and `session_audit` with COPY,
then times the classifier's one round trip (pool, query, classification) for
random IDs: half that exist, half that never did.
"""

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry

from session_lens.config import load_config
from session_lens.embedded import start_embedded
from session_lens.explain import Explainer
from session_lens.metrics import Metrics
from session_lens.migrations import migrate
from session_lens.schema import Tables


def session_id(n: int) -> str:
    return f"exec_20250101_000000_{n:08x}"


async def fill(url: str, sessions: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, Tables())
        if await conn.fetchval("SELECT count(*) FROM sessions") >= sessions:
            return
        states = ["ACTIVE", "PAUSED", "STOPPED", "DELETED", "ARCHIVED"]
        started = time.perf_counter()
        await conn.execute("ALTER TABLE sessions DISABLE TRIGGER session_lens_audit")
        await conn.copy_records_to_table(
            "sessions",
            records=((session_id(n), states[n % 5]) for n in range(sessions)),
            columns=["id", "state"],
        )
        await conn.execute("ALTER TABLE sessions ENABLE TRIGGER session_lens_audit")
        await conn.copy_records_to_table(
            "session_audit",
            records=(
                (session_id(n), old, new, "bench", "bench")
                for n in range(sessions)
                for old, new in ((None, "CREATING"), ("CREATING", "ACTIVE"))
            ),
            columns=["session_id", "old_state", "new_state", "trigger", "actor"],
        )
        await conn.execute("ANALYZE sessions; ANALYZE session_audit")
        print(f"filled {sessions} sessions in {time.perf_counter() - started:.1f}s")
    finally:
        await conn.close()


async def measure(url: str, sessions: int, lookups: int) -> list[float]:
    config = load_config(
        flags={"database_url": url, "classification_budget": "1s"}, need_upstream=False
    )
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), url)
    await explainer.open()
    try:
        for n in range(200):  # warm the pool and the statement cache
            await explainer.explain_miss(session_id(n), False)
        timings = []
        for _ in range(lookups):
            n = random.randrange(sessions * 2)  # half of these never existed
            started = time.perf_counter()
            await explainer.explain_miss(session_id(n), False)
            timings.append(time.perf_counter() - started)
        return timings
    finally:
        await explainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    args = parser.parse_args()
    url = os.environ.get("SESSION_LENS_BENCH_DATABASE_URL")
    if url is None:
        url = start_embedded(Path(tempfile.mkdtemp()), delete_on_exit=True).url
    asyncio.run(fill(url, args.sessions))
    timings = sorted(asyncio.run(measure(url, args.sessions, args.lookups)))
    p50 = statistics.median(timings) * 1e6
    p99 = timings[int(len(timings) * 0.99)] * 1e6
    print(
        f"{args.sessions} sessions, {2 * args.sessions} audit rows, {args.lookups} lookups:"
        f" p50 {p50:.0f} µs, p99 {p99:.0f} µs"
    )


if __name__ == "__main__":
    main()
