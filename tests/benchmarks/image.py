"""The image: its size, its build from the cached base, its start, and the hop inside it.

    python -m tests.benchmarks.image [--seconds 5]

Needs podman, buildah, runc, debootstrap (as `.ci/image` installs them), nginx and wrk.
Builds the image with `.ci/image build --no-cache` (the base made by `.ci/image base` is
kept, every layer of the Dockerfile is built again) and times it. Then the same build
serves outside and inside a container: its virtual environment is copied out of the
image and run with the host's Python, Debian's 3.11 as in the image, while the image
runs as tests/test_image.py runs it (the manifest's user, read-only root, no
capabilities, its volumes and memory limit) on the host's network, so that no NAT
stands in the way. nginx is the upstream (the hop part's); each is asked for hits by
wrk in turns, medians of three runs. Start-to-ready is from the start command to the
first 200 from /readyz, the median of three starts. The CPU time session-lens spends
on a hit is read from /proc (the hop part's way, the process on a core of its own): on
a shared machine it swings far less than the rates. The database URL points nowhere
in both: hits never ask it. The image is removed afterwards.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.benchmarks.hop import HIT, NGINX, cpu_per_request, in_turns
from tests.benchmarks.tools import require, wait_for, wrk
from tests.conftest import free_port
from tests.test_image import TOKEN, as_the_manifest_says, limits

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/session-lens:benchmark"
PODMAN = ["podman", "--runtime", "runc"]
NOWHERE = "postgresql://lens@127.0.0.1:9/none"


def ready_within(admin: int, started: float, process: subprocess.Popen[bytes] | None) -> float:
    """Seconds from `started` to the first 200 from /readyz."""
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
        except (urllib.error.HTTPError, OSError):
            pass
        if process is not None and process.poll() is not None:
            raise SystemExit("session-lens exited")
        if time.monotonic() - started > 60:
            raise SystemExit("session-lens did not get ready")
        time.sleep(0.01)


class Outside:
    """The image's virtual environment, run by the host's Python."""

    def __init__(self, venv: Path, origin: int, work: Path) -> None:
        self.venv, self.origin, self.work = venv, origin, work
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[str, float]:
        port, admin = free_port(), free_port()
        started = time.monotonic()
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "python3"), "-m", "session_lens", "serve",
             "--upstream", f"http://127.0.0.1:{self.origin}", "--database-url", NOWHERE,
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
             "--data-dir", str(self.work / "outside"), "--log-level", "error"],
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # the image's code
        )  # fmt: skip
        return f"http://127.0.0.1:{port}", ready_within(admin, started, self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()


class Inside:
    """The image in a container, as the manifest runs it."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.name = ""

    @property
    def pid(self) -> int:
        """session-lens' process (the container's PID 1) as the host sees it."""
        found = subprocess.run(
            [*PODMAN, "inspect", self.name, "--format", "{{.State.Pid}}"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return int(found.stdout)

    def start(self) -> tuple[str, float]:
        self.name = "session-lens-benchmark-" + uuid.uuid4().hex[:8]
        port, admin = free_port(), free_port()
        command = [*PODMAN, "run", "--detach", "--name", self.name, "--network", "host"]
        command += [*limits(), *as_the_manifest_says(self.name), "--health-interval", "disable"]
        for key, value in {
            "UPSTREAM": f"http://127.0.0.1:{self.origin}",
            "DATABASE_URL": NOWHERE,
            "LISTEN": f"127.0.0.1:{port}",
            "ADMIN_LISTEN": f"0.0.0.0:{admin}",
            "ADMIN_TOKEN": TOKEN,
            "LOG_LEVEL": "error",
        }.items():
            command.append(f"--env=SESSION_LENS_{key}={value}")
        started = time.monotonic()
        subprocess.run([*command, IMAGE], check=True, capture_output=True)
        return f"http://127.0.0.1:{port}", ready_within(admin, started, None)

    def stop(self) -> None:
        if self.name:
            subprocess.run([*PODMAN, "rm", "--force", "--volumes", self.name], capture_output=True)
            subprocess.run([*PODMAN, "volume", "rm", "--force", self.name], capture_output=True)
            self.name = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    require("nginx", "wrk")
    load_before = os.getloadavg()[0]
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed (.ci/image installs it)")

    subprocess.run([ROOT / ".ci" / "image", "base"], check=True, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    subprocess.run(
        [ROOT / ".ci" / "image", "build", "--no-cache"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "SESSION_LENS_IMAGE": IMAGE},
    )  # fmt: skip
    build = time.monotonic() - started
    inspected = subprocess.run(
        [*PODMAN, "image", "inspect", IMAGE, "--format", "{{.Size}}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    size = int(inspected.stdout)

    work = Path(tempfile.mkdtemp())
    copy = "session-lens-benchmark-copy-" + uuid.uuid4().hex[:8]
    subprocess.run([*PODMAN, "create", "--name", copy, IMAGE], check=True, capture_output=True)
    try:
        subprocess.run([*PODMAN, "cp", f"{copy}:/opt/session-lens", str(work)], check=True)
    finally:
        subprocess.run([*PODMAN, "rm", "--force", "--volumes", copy], capture_output=True)
    origin, nginx_proxy = free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX.format(dir=work, origin=origin, proxy=nginx_proxy))
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    outside, inside = Outside(work / "session-lens", origin, work), Inside(origin)
    try:
        wait_for(f"http://127.0.0.1:{origin}/")
        starts: dict[str, list[float]] = {"outside": [], "in the container": []}
        for _ in range(3):
            for name, target in (("outside", outside), ("in the container", inside)):
                starts[name].append(target.start()[1])
                target.stop()
        urls = {"outside": outside.start()[0], "in the container": inside.start()[0]}
        for url in urls.values():
            wrk(url + HIT, 32, 1)  # a warm-up: upstream connections opened, code paths run
        targets = {"direct": f"http://127.0.0.1:{origin}", **urls}
        rates = in_turns(targets, HIT, 32, args.seconds)
        quiet = in_turns(targets, HIT, 1, max(2, args.seconds // 2))
        assert outside.process is not None
        servers = {"outside": (outside.process.pid, urls["outside"])}
        servers["in the container"] = (inside.pid, urls["in the container"])
        cpu = cpu_per_request(servers, HIT, args.seconds)
    finally:
        outside.stop()
        inside.stop()
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run([*PODMAN, "rmi", IMAGE], capture_output=True)

    load_after = os.getloadavg()[0]
    print(f"| image `{IMAGE}` | |")
    print("|---|---:|")
    print(f"| size (`podman image inspect`) | {size / 1e6:.0f} MB |")
    print(f"| build from the cached base (`.ci/image build --no-cache`) | {build:.0f} s |")
    for name, found in starts.items():
        print(f"| start to ready, {name} (median of 3) | {statistics.median(found):.2f} s |")
    print()
    print("| hits | req/s at c=32 | of outside | p50 at c=1 | p99 at c=1 | CPU per hit |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in targets:
        run = rates[name]
        used = f"{cpu[name]:.0f} µs" if name in cpu else ""
        print(
            f"| {name} | {run.rate:,.0f} | {run.rate / rates['outside'].rate:.0%} |"
            f" {quiet[name].p50:.0f} µs | {quiet[name].p99:.0f} µs | {used} |"
        )
    print()
    print(f"Load average (1 min) {load_before:.1f} before the run, {load_after:.1f} after it.")


if __name__ == "__main__":
    sys.exit(main())
