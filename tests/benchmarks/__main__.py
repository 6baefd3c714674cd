"""The whole benchmark suite in one run, written to docs/benchmarks.md.

    python -m tests.benchmarks [--seconds 5] [--only hop,streaming,misses,recording,fleet]

Needs nginx, wrk and curl (Debian: nginx-light, wrk, curl). Each part runs in a
process of its own, one after the other, and prints markdown; this collects
them under the machine's description and the command, and writes the file
(`--output -` prints it instead). The misses part builds its 10 M / 50 M-row
database on first use (about half an hour) and keeps it in `.benchmarks/`.
"""

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks.tools import require

ROOT = Path(__file__).resolve().parents[2]
PARTS = {
    "hop": "The hop beside nginx: hits, passthrough, invalid IDs, workers",
    "streaming": "Streaming 1 GiB each way",
    "misses": "Misses at 1 000 a second against 10 M sessions and 50 M audit rows",
    "recording": "Recording observed lifecycle events",
    "fleet": "Many sidecars, one PostgreSQL: recording and misses as the fleet grows",
}


def machine() -> str:
    """One line on what the figures were measured on."""
    cpu = next(
        (
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    memory = next(
        int(line.split()[1]) // (1 << 20)
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    system = next(
        (
            line.partition("=")[2].strip('"')
            for line in Path("/etc/os-release").read_text().splitlines()
            if line.startswith("PRETTY_NAME")
        ),
        platform.system(),
    )
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0]
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory} GiB, {system}, Linux {platform.release()},"
        f" Python {platform.python_version()}, {nginx.removeprefix('nginx version: ')},"
        f" {wrk.strip()}; the load generator, the upstream and session-lens share the cores,"
        " everything on loopback."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="each wrk run")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    require("nginx", "wrk", "curl")
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(unknown)} (known: {', '.join(PARTS)})")
    command = "python -m tests.benchmarks " + shlex.join(sys.argv[1:])
    sections = []
    for part in parts:
        extra = {
            "hop": ["--seconds", str(args.seconds)],
            "recording": ["--seconds", str(args.seconds * 2)],
            "fleet": ["--seconds", str(args.seconds)],
        }.get(part, [])
        print(f"-- {part}", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", f"tests.benchmarks.{part}", *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"the {part} benchmark failed (exit code {result.returncode})")
        minutes = (time.monotonic() - started) / 60
        command_line = f"python -m tests.benchmarks.{part} {shlex.join(extra)}".strip()
        sections.append(
            f"## {PARTS[part]}\n\n`{command_line}` ({minutes:.1f} min)\n\n{result.stdout.strip()}\n"
        )
    document = "\n".join(
        [
            "# Benchmarks\n",
            f"Written by `{command.strip()}` on {datetime.now(UTC):%Y-%m-%d}; each part can"
            " also be run alone with the command under its heading. Compare ratios, not"
            " absolute figures, between machines.\n",
            f"Machine: {machine()}\n",
            *sections,
        ]
    )
    if args.output == "-":
        print(document)
    else:
        Path(args.output).write_text(document)
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
