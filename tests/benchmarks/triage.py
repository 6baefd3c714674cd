"""Triage of 1 M log lines over 50 000 distinct IDs: lines per second, peak RSS, queries.

    python -m tests.benchmarks.triage [--lines 1000000] [--ids 50000]

Starts the embedded PostgreSQL in a temporary directory, migrates it and gives the IDs
their histories as the trigger records them: a third created and left
ACTIVE, a fifth stopped and soft-deleted, a tenth stopped and purged, a tenth whose
creation failed (the audit entry alone), the rest never created, all of it over the half
hour before the log begins. Then writes the log:
`--lines` lines in time order over the last hour, in the story's shape, each naming one
of the IDs at random (no locality: the worst case for the trails kept between batches),
one in ten asking `include_deleted=true`, one in a hundred not JSON at all.

Beside `session-lens triage FILE --json` (a subprocess; the figures are its wall time
and its peak RSS, ru_maxrss from wait4), two references in the same run: the same file
read by a bare loop of `json.loads` (the floor of reading, nothing explained), and the
50 000 IDs explained one query each, as `explain` and the hop do (the single evidence
query, one connection, one after the other).
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from session_lens.embedded import start_embedded
from session_lens.evidence.tables import Queries
from session_lens.migrations import migrate
from session_lens.schema import Tables
from tests.benchmarks.tools import mib

FLOOR = """
import json, sys
lines = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        lines += 1
        try:
            json.loads(line)
        except ValueError:
            pass
print(lines)
"""


async def histories(url: str, ids: int) -> list[str]:
    """The IDs and their histories, two hours old to an hour and a half; returned in a
    random order. Written as the trigger would have written them then (it stamps the
    present, so it is off while they are)."""
    conn = await asyncpg.connect(url)
    await migrate(conn, Tables())
    now = datetime.now(UTC)
    await conn.execute("UPDATE session_lens_tracking SET migrated_at = $1", now - timedelta(days=7))
    born, stopped_at, gone_at = (now - timedelta(minutes=m) for m in (120, 100, 90))
    keys = [born.strftime("exec_%Y%m%d_%H%M%S_") + f"{n:08x}" for n in range(ids)]
    third, fifth, tenth = ids // 3, ids // 5, ids // 10
    live, deleted = keys[:third], keys[third : third + fifth]
    purged = keys[third + fifth : third + fifth + tenth]
    failed = keys[third + fifth + tenth : third + fifth + 2 * tenth]
    audit = (
        "INSERT INTO session_audit (session_id, occurred_at, old_state, new_state, trigger, actor)"
        " SELECT unnest($1::text[]), $2::timestamptz, $3::text, $4::text, 'api', 'service'"
    )
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        rows = [*live, *deleted]
        states = ["ACTIVE"] * len(live) + ["DELETED"] * len(deleted)
        await conn.execute(
            "INSERT INTO sessions (id, state, created_at, updated_at, deleted_at)"
            " SELECT k, s, $3::timestamptz, CASE s WHEN 'ACTIVE' THEN $3::timestamptz"
            " ELSE $4::timestamptz END, CASE s WHEN 'DELETED' THEN $4::timestamptz END"
            " FROM unnest($1::text[], $2::text[]) AS r(k, s)",
            rows, states, born, gone_at,
        )  # fmt: skip
        every = [*live, *deleted, *purged]
        await conn.execute(audit, every, born, None, "CREATING")
        await conn.execute(audit, every, born + timedelta(milliseconds=5), "CREATING", "ACTIVE")
        await conn.execute(audit, [*deleted, *purged], stopped_at, "ACTIVE", "STOPPED")
        await conn.execute(audit, deleted, gone_at, "STOPPED", "DELETED")
        await conn.execute(audit, purged, gone_at, "STOPPED", None)
        await conn.execute(audit, failed, born, "CREATING", None)
    await conn.execute("ANALYZE")
    await conn.close()
    random.Random(1).shuffle(keys)
    return keys


def write_log(path: Path, keys: list[str], lines: int) -> None:
    rng = random.Random(2)
    start = datetime.now(UTC) - timedelta(hours=1)
    step = 3600 / lines
    with path.open("w") as log:
        for n in range(lines):
            if n % 100 == 99:
                log.write("Traceback (most recent call last):\n")
                continue
            line = {
                "timestamp": (start + timedelta(seconds=n * step)).isoformat(),
                "level": "warning",
                "event_type": "questdb_data_provider.session_not_found",
                "data": {"session_id": rng.choice(keys), "include_deleted": n % 10 == 0},
            }
            log.write(json.dumps(line) + "\n")


def run(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in bytes and stdout of a subprocess."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = process.stdout.read() if process.stdout else b""
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    assert os.waitstatus_to_exitcode(status) == 0, command
    return elapsed, usage.ru_maxrss * 1024, out.decode()


async def one_by_one(url: str, keys: list[str]) -> float:
    """Seconds to read every ID's evidence with the single query, one after the other."""
    conn = await asyncpg.connect(url)
    query = Queries(Tables()).evidence
    started = time.perf_counter()
    for key in keys:
        await conn.fetchrow(query, key)
    elapsed = time.perf_counter() - started
    await conn.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=50_000)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as scratch:
        where = Path(scratch)
        url = start_embedded(where / "db", delete_on_exit=True).url
        keys = asyncio.run(histories(url, args.ids))
        log = where / "service.log"
        write_log(log, keys, args.lines)
        size = log.stat().st_size
        floor_s, floor_rss, _ = run([sys.executable, "-c", FLOOR, str(log)])
        command = [sys.executable, "-m", "session_lens", "triage", str(log), "--json"]
        triage_s, triage_rss, out = run([*command, "--database-url", url])
        report = json.loads(out)
        single_s = asyncio.run(one_by_one(url, keys))
    load_after = os.getloadavg()[0]
    reasons = ", ".join(f"{r['reason']} {r['misses']:,}" for r in report["reasons"])
    bad = sum(b["count"] for b in report["bad_input"].values())
    queries = report["queries"]
    print(
        f"{args.lines:,} lines ({mib(size)}, {bad:,} of them not JSON) over {args.ids:,} IDs"
        f" in random order, one hour of lookups; found: {reasons}.\n"
    )
    print("| what | time | lines/s | peak RSS | queries | queries per 1,000 IDs | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| `session-lens triage` | {triage_s:.1f} s | {args.lines / triage_s:,.0f}"
        f" | {mib(triage_rss)} | {queries:,} | {1000 * queries / args.ids:.1f} | 1.00x |"
    )
    print(
        f"| a bare `json.loads` loop over the file | {floor_s:.1f} s"
        f" | {args.lines / floor_s:,.0f} | {mib(floor_rss)} | 0 | 0 |"
        f" {triage_s / floor_s:.2f}x faster |"
    )
    print(
        f"| the {args.ids:,} IDs' evidence one query each (the hop's way) | {single_s:.1f} s"
        f" | - | - | {args.ids:,} | 1,000.0 | - |"
    )
    print(
        f"\nThe machine's load average (1 min) was {load_before:.1f} before the run and"
        f" {load_after:.1f} after it, on {os.cpu_count()} cores"
        + (": other work was running beside it." if max(load_before, load_after) > 1.5 else ".")
    )
    print(
        f"\nTargets: 1 000 000 lines in under 60 s ({'met' if triage_s < 60 else 'not met'}),"
        f" RSS under 200 MiB ({'met' if triage_rss < 200 * (1 << 20) else 'not met'})."
    )


if __name__ == "__main__":
    main()
