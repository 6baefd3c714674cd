"""What the benchmark scripts share: wrk runs, waiting for a server, tool checks."""

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def require(*tools: str) -> None:
    """Exit with a clear line when a tool the benchmark runs is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: nginx-light, wrk)")


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
