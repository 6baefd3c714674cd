"""Migrate: `session-lens migrate` of a live table while its service reads and writes it.

    python -m tests.benchmarks.migrate [--rows 10000000] [--reads 1000] [--writes 100]
        [--baseline 30] [--after 30] [--batch-size 10000] [--batch-pause 0]
        [--lock-timeout 2s] [--before DIR]

The service's own `sessions` table (its columns, text IDs minted over the years, its
own creation column; tests/live_service.py) is built once into a template database
kept in `.benchmarks/migrate-db`, and each run migrates a file copy of it. The
service reads by ID at `--reads` a second and writes (60 % inserts, 30 % updates of
its own columns, 10 % deletes) at `--writes` a second, open loop, through pools of
its own; each call is timed from when it was due. First `--baseline` seconds without
the migration, then `session-lens migrate` as a user runs it (a process of its own),
then `--after` seconds. With `--before DIR` (a checkout of an earlier commit) that
commit's `migrate` runs the same way on another copy, as the reference.
Prints markdown: the migration's time and rows a second, and the service's p50, p99
and max before, during and after, with the targets (p99 during within 2x before,
max under 1 s).
"""

import argparse
import asyncio
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import asyncpg

from session_lens.embedded import start_embedded
from tests.benchmarks.misses import ROOT, run_on
from tests.benchmarks.tools import percentile
from tests.conftest import with_database
from tests.live_service import Service, create_legacy

TEMPLATE = "session_lens_migrate_legacy"
COPY = "session_lens_migrate"
PHASES = ("before", "during", "after")


def millis(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


async def prepared(admin_url: str, rows: int) -> None:
    """The template database with `rows` legacy sessions, built on first use."""
    admin = await asyncpg.connect(admin_url)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEMPLATE)
        if exists:
            conn = await asyncpg.connect(with_database(admin_url, TEMPLATE))
            try:
                have = await conn.fetchval("SELECT count(*) FROM sessions")
            finally:
                await conn.close()
            if have == rows:
                return
            await admin.execute(f"DROP DATABASE {TEMPLATE} WITH (FORCE)")
        print(f"building {rows:,} legacy sessions (once)", file=sys.stderr, flush=True)
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        conn = await asyncpg.connect(with_database(admin_url, TEMPLATE))
        try:
            await create_legacy(conn, rows)
            await conn.execute("VACUUM ANALYZE sessions")
        finally:
            await conn.close()
    finally:
        await admin.close()


async def one_run(
    admin_url: str, rows: int, args: argparse.Namespace, code: Path
) -> tuple[Service, float, str]:
    """A copy migrated under load by the code in `code`; the service, the seconds, the output."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {COPY} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {COPY} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    finally:
        await admin.close()
    url = with_database(admin_url, COPY)
    service = Service(
        url, rows, reads_per_second=args.reads, writes_per_second=args.writes, connections=8
    )
    await service.start()
    await asyncio.sleep(args.baseline)
    service.phase = "during"
    flags = ["--batch-size", str(args.batch_size), "--batch-pause", args.batch_pause]
    flags += ["--lock-timeout", args.lock_timeout]
    if code != ROOT:  # an earlier runner: one transaction a version, none of these flags
        flags = []
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_lens", "migrate", "--database-url", url, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(code / "src")},
    )  # fmt: skip
    out, err = await process.communicate()
    took = time.perf_counter() - started
    service.phase = "after"
    await asyncio.sleep(args.after)
    await service.stop()
    if process.returncode != 0:
        raise SystemExit(f"migrate failed ({process.returncode}): {err.decode()[-2000:]}")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {COPY} WITH (FORCE)")
    finally:
        await admin.close()
    said = [line for line in err.decode().replace("\r", "\n").splitlines() if "not granted" in line]
    return (
        service,
        took,
        out.decode().strip() + (f" ({len(said)} lock waits given up)" if said else ""),
    )


async def measure(admin_url: str, args: argparse.Namespace) -> None:
    await prepared(admin_url, args.rows)
    runs = {"this commit": ROOT}
    if args.before:
        runs = {f"before ({args.before.name})": args.before, **runs}
    results = {}
    for label, code in runs.items():
        print(f"migrating under load: {label}", file=sys.stderr, flush=True)
        results[label] = await one_run(admin_url, args.rows, args, code)
    print(
        f"{args.rows:,} rows of the service's own table; the service reads {args.reads:,.0f}/s"
        f" and writes {args.writes:,.0f}/s open loop ({args.baseline:.0f} s before, the"
        f" migration, {args.after:.0f} s after); `--batch-size {args.batch_size}"
        f" --batch-pause {args.batch_pause} --lock-timeout {args.lock_timeout}`."
    )
    print()
    print("| runner | migrate | rows/s | what it said |")
    print("|---|---:|---:|---|")
    for label, (_, took, said) in results.items():
        print(f"| {label} | {took:.1f} s | {args.rows / took:,.0f} | {said} |")
    print()
    print("| runner | calls | phase | calls made | p50 | p99 | max | errors |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for label, (service, _, _) in results.items():
        for kind, calls in (("reads", service.reads), ("writes", service.writes)):
            p99s = {}
            for phase in PHASES:
                done = sorted(calls.latencies.get(phase, []))
                if not done:
                    continue
                p99s[phase] = percentile(done, 0.99)
                errors = len(calls.errors) if phase == "during" else ""
                p50 = millis(percentile(done, 0.5))
                print(
                    f"| {label} | {kind} | {phase} | {len(done):,} | {p50}"
                    f" | {millis(p99s[phase])} | {millis(done[-1])} | {errors} |"
                )
            during = sorted(calls.latencies.get("during", [0.0]))
            ratio = p99s.get("during", 0) / max(p99s.get("before", 1e-9), 1e-9)
            verdicts.append(
                f"{label}, {kind}: p99 during / before = {ratio:.2f} (target ≤ 2:"
                f" {'met' if ratio <= 2 else 'missed'}), max during {millis(during[-1])}"
                f" (target < 1 s: {'met' if during[-1] < 1 else 'missed'})"
            )
    print()
    for verdict in verdicts:
        print(f"- {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--reads", type=float, default=1000.0, help="a second")
    parser.add_argument("--writes", type=float, default=100.0, help="a second")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds before")
    parser.add_argument("--after", type=float, default=30.0, help="seconds after")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--batch-pause", default="0")
    parser.add_argument("--lock-timeout", default="2s")
    parser.add_argument("--before", help="a checkout of an earlier commit, migrated as reference")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".benchmarks" / "migrate-db")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    )
    args = parser.parse_args()
    if not re.fullmatch(r"\d+(\.\d+)?(ms|s)?", args.batch_pause):
        raise SystemExit(f"--batch-pause {args.batch_pause!r}: a duration such as 50ms")
    args.before = Path(args.before).resolve() if args.before else None
    server = start_embedded(args.data_dir)
    run_on(measure(server.url, args), args.loop)


if __name__ == "__main__":
    main()
