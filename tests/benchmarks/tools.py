"""What the benchmark scripts share: wrk and ab runs, waiting for a server, tool checks, figures."""

import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def require(*tools: str) -> None:
    """Exit with a clear line when a tool the benchmark runs is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed (Debian: nginx-light, wrk, curl, apache2-utils for ab)"
            )


def wrk(
    url: str, connections: int, seconds: int, script: Path | None = None, *, all_ok: bool = False
) -> tuple[float, float, float]:
    """Requests per second, p50 and p99 in microseconds, from one wrk run.

    With `all_ok`, a socket error or an answer other than 2xx or 3xx fails the run: quick
    failures would pass for a high rate.
    """
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
    assert not all_ok or ("Socket errors" not in out and "Non-2xx" not in out), out
    return float(rate[1]), micros("50%"), micros("99%")


def ab_head(url: str, connections: int, seconds: int) -> tuple[float, float, float]:
    """HEAD requests per second, p50 and p99 in microseconds, from one ab run.

    wrk 4.1 waits for the body that a HEAD answer's Content-Length announces and counts
    no request at all (wg/wrk#198); `ab -i` knows a HEAD answer has none. ab sends
    HTTP/1.0 requests with `Connection: Keep-Alive` (`-k`) and writes its percentiles,
    to the microsecond, with `-e`.
    """
    with tempfile.NamedTemporaryFile(suffix=".csv") as table:
        # -n only bounds the run (ab stops at -t first); ab allocates a record for each.
        command = ["ab", "-q", "-i", "-k", f"-c{connections}", f"-t{seconds}"]
        command += [f"-n{300_000 * seconds}", "-e", table.name, url]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        served = dict(line.split(",") for line in Path(table.name).read_text().splitlines()[1:])
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    done = re.search(r"Complete requests:\s+(\d+)", out)
    kept = re.search(r"Keep-Alive requests:\s+(\d+)", out)
    assert rate and done and kept, out
    # Closed connections would make it measure connecting, not the requests.
    assert int(kept[1]) >= 0.9 * int(done[1]), out
    return float(rate[1]), float(served["50"]) * 1000, float(served["99"]) * 1000


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
