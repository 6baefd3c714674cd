"""What the benchmark scripts share: wrk runs, waiting for a server, tool checks, figures."""

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def require(*tools: str) -> None:
    """Exit with a clear line when a tool the benchmark runs is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: nginx-light, wrk, curl)")


def wrk(
    url: str, connections: int, seconds: int, script: Path | None = None
) -> tuple[float, float, float]:
    """Requests per second, p50 and p99 in microseconds, from one wrk run."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout

    def micros(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        assert match, out
        return float(match[1]) * {"us": 1, "ms": 1000, "s": 1e6}[match[2]]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate, out
    return float(rate[1]), micros("50%"), micros("99%")


def wait_for(url: str) -> None:
    """Wait until something answers HTTP at `url`, whatever it says."""
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers at {url}")


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of the sorted `ordered` values fall (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def micros(seconds: float) -> str:
    """A duration for a table: `234 µs`, `1,234 µs`."""
    return f"{seconds * 1e6:,.0f} µs"


def mib(size: float) -> str:
    """A size in bytes for a table: `12.3 MiB`, and `1.20 GiB` from 1 GiB up."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.2f} GiB"
    return f"{size / (1 << 20):.1f} MiB"


def proc_status(pid: int, *fields: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB (VmRSS, VmHWM, ...), in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[name] = int(value.split()[0]) * 1024
    return found
