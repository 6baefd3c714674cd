"""The whole benchmark suite in one run, written to docs/benchmarks.md.

    python -m tests.benchmarks [--seconds 5] [--only PART,...] [--before DIR]
        (parts: hop, streaming, misses, recording, import, prune, fleet, image, questdb,
        migrate, triage; --before: a checkout of an earlier commit the hop part measures
        beside the current one)

Needs nginx, wrk, ab and curl (Debian: nginx-light, wrk, apache2-utils, curl). Each part runs in a
process of its own, one after the other, and prints markdown; this collects
them under the machine's description and the command, and writes the file
(`--output -` prints it instead). With `--only`, the parts run replace their own
sections of the existing file (the same `## ` heading) and every other section
stays as it was. The misses part builds its 10 M / 50 M-row database on first
use (about half an hour) and keeps it in `.benchmarks/`; the
prune part works on a copy of it.
"""

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks.tools import require

ROOT = Path(__file__).resolve().parents[2]
PARTS = {
    "hop": "The hop beside nginx: hits, passthrough, HEAD, uploads, invalid IDs, workers",
    "streaming": "Streaming 1 GiB each way",
    "misses": "Misses at 1 000 a second against 10 M sessions and 50 M audit rows",
    "recording": "Recording observed lifecycle events",
    "import": "Importing 1 M sessions from a database and from a file",
    "prune": "Pruning 10 M of 50 M audit entries while the service writes",
    "fleet": "Many sidecars, one PostgreSQL: recording and misses as the fleet grows",
    "image": "The image: size, build, start, and the hop in a container",
    "questdb": "The service's QuestDB as evidence: a miss's row query and the metadata refresh",
    "migrate": "Migrating a live table of 10 M sessions while its service reads and writes",
    "triage": "Triage of 1 M log lines over 50 000 IDs",
}
MODULES = {"import": "imports", "questdb": "questdb_store"}
"""Parts whose module is not named like the part (`import` is a keyword)."""


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
    parser.add_argument("--only", help="comma-separated parts (default: all)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--before", help="the hop part: an earlier checkout to compare with")
    args = parser.parse_args()
    parts = [part.strip() for part in (args.only or ",".join(PARTS)).split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(unknown)} (known: {', '.join(PARTS)})")
    if {"hop", "streaming", "recording"} & set(parts):
        require("nginx", "wrk", "curl")
    command = "python -m tests.benchmarks " + shlex.join(sys.argv[1:])
    sections = {}
    for part in parts:
        extra = {
            "hop": ["--seconds", str(args.seconds)]
            + (["--before", args.before] if args.before else []),
            "recording": ["--seconds", str(args.seconds * 2)],
            "fleet": ["--seconds", str(args.seconds)],
            "image": ["--seconds", str(args.seconds)],
        }.get(part, [])
        print(f"-- {part}", file=sys.stderr, flush=True)
        started = time.monotonic()
        module = f"tests.benchmarks.{MODULES.get(part, part)}"
        result = subprocess.run(
            [sys.executable, "-m", module, *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"the {part} benchmark failed (exit code {result.returncode})")
        minutes = (time.monotonic() - started) / 60
        command_line = f"python -m {module} {shlex.join(extra)}".strip()
        when = f", {datetime.now(UTC):%Y-%m-%d}" if args.only else ""
        sections[f"## {PARTS[part]}"] = (
            f"`{command_line}` ({minutes:.1f} min{when})\n\n{result.stdout.strip()}\n"
        )
    output = Path(args.output)
    if args.output != "-" and args.only and output.exists():
        document = merge(output.read_text(), sections)
    else:
        document = "\n".join(
            [
                "# Benchmarks\n",
                f"Written by `{command.strip()}` on {datetime.now(UTC):%Y-%m-%d}; each part"
                " can also be run alone with the command under its heading. Compare ratios,"
                " not absolute figures, between machines.\n",
                f"Machine: {machine()}\n",
                *(f"{heading}\n\n{body}" for heading, body in sections.items()),
            ]
        )
    if args.output == "-":
        print(document)
    else:
        Path(args.output).write_text(document)
        print(f"wrote {args.output}", file=sys.stderr)


def merge(existing: str, sections: dict[str, str]) -> str:
    """The document with each run part's section replaced (or added at the end), the rest kept.

    A section is what lies between its `## ` heading and the next; the header above the
    first heading is kept as it is.
    """
    header, *old = re.split(r"^(?=## )", existing, flags=re.M)
    chunks = [header]
    for chunk in old:
        heading = chunk.split("\n", 1)[0].rstrip()
        chunks.append(f"{heading}\n\n{sections.pop(heading)}" if heading in sections else chunk)
    chunks.extend(f"{heading}\n\n{body}" for heading, body in sections.items())
    return "\n\n".join(chunk.strip("\n") for chunk in chunks) + "\n"


if __name__ == "__main__":
    main()
