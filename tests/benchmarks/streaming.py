"""Streaming: 1 GiB down and up, throughput and the RSS growth of session-lens, one run.

    python -m tests.benchmarks.streaming [--mib 1024]

Needs `nginx` and `curl` (Debian: nginx-light, curl). nginx is the upstream (one
worker): it serves a sparse file of `--mib` MiB with sendfile for `GET /big` (read
once beforehand, so that it is in the page cache), and relays `POST /sink`
unbuffered to a small aiohttp app that reads and discards the body and answers
with its byte count (checked). curl moves the bytes and holds none of them: the
download goes to /dev/null, the upload is read from the file as it is sent, once
with its Content-Length (`-T file`) and once chunked (`-T -`, the file on stdin).
Each transfer goes straight to nginx, then through `session-lens serve`. While a
transfer goes through session-lens, its VmRSS is sampled every 50 ms from /proc;
before is after a warm-up (64 MiB each way, twice), after is once the transfer is
done. Prints a markdown table of MiB/s, the ratio to direct and the RSS figures,
beside the target: RSS growth at most 32 MiB for 1 GiB streamed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.benchmarks.tools import mib, proc_status, require, wait_for
from tests.conftest import free_port

TARGET_GROWTH = 32 << 20

NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream sink {{ server 127.0.0.1:{sink}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ root {dir}/www; default_type application/octet-stream; }}
    location = /sink {{
      proxy_pass http://sink; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_request_buffering off; client_max_body_size 0;
    }}
  }}
}}
"""

SINK = """
import sys
from aiohttp import web
async def sink(request):
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
    return web.json_response({"bytes": size})
app = web.Application()
app.router.add_post("/sink", sink)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


class Sampler(threading.Thread):
    """VmRSS of one process every 50 ms, until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples = [rss(pid)]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.samples.append(rss(self.pid))

    def stop(self) -> int:
        """The peak seen, a last sample included."""
        self.done.set()
        self.join()
        self.samples.append(rss(self.pid))
        return max(self.samples)


def rss(pid: int) -> int:
    return proc_status(pid, "VmRSS")["VmRSS"]


@dataclass(frozen=True)
class Transfer:
    """GET a file from nginx, or POST its bytes to the sink."""

    label: str
    method: str
    chunked: bool = False


TRANSFERS = (
    Transfer("down (GET)", "GET"),
    Transfer("up (POST, Content-Length)", "POST"),
    Transfer("up (POST, chunked)", "POST", chunked=True),
)


def curl(base: str, transfer: Transfer, file: Path) -> float:
    """Move the file's bytes once; the seconds it took (curl's own clock)."""
    command = ["curl", "-sS", "--fail", "-w", "%{size_download} %{size_upload} %{time_total}"]
    stdin = None
    if transfer.method == "GET":
        command += ["-o", "/dev/null", f"{base}/{file.name}"]
    else:
        # -T streams the file (with its length), or stdin (chunked); never --data, which loads it.
        source = "-" if transfer.chunked else str(file)
        command += ["-X", "POST", "-T", source, "-H", "Expect:", f"{base}/sink"]
        if transfer.chunked:
            stdin = file.open("rb")
    try:
        out = subprocess.run(command, stdin=stdin, capture_output=True, text=True, check=True)
    finally:
        if stdin is not None:
            stdin.close()
    text = out.stdout
    if transfer.method == "POST":
        answer, _, text = text.partition("}")
        received = json.loads(answer + "}")["bytes"]
        assert received == file.stat().st_size, (transfer, received)
    down, up, seconds = text.split()
    if not transfer.chunked:  # chunked, curl counts the framing too: the sink's count tells
        moved = float(down) if transfer.method == "GET" else float(up)
        assert moved == file.stat().st_size, (transfer, moved)
    return float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of each transfer")
    args = parser.parse_args()
    require("nginx", "curl")
    work = Path(tempfile.mkdtemp())
    (work / "www").mkdir()
    big, warm = work / "www" / "big", work / "www" / "warm"
    for file, size in ((big, args.mib << 20), (warm, 64 << 20)):
        with file.open("wb") as f:
            f.truncate(size)  # sparse: nothing on disk...
        with file.open("rb", buffering=0) as f:
            while f.read(1 << 20):  # ...and in the page cache before the first transfer
                pass
    port, sink, lens, admin = (free_port() for _ in range(4))
    (work / "nginx.conf").write_text(NGINX.format(dir=work, port=port, sink=sink))
    (work / "sink.py").write_text(SINK)
    processes = [
        subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]),
        subprocess.Popen([sys.executable, str(work / "sink.py"), str(sink)]),
    ]
    server = subprocess.Popen(
        [sys.executable, "-m", "session_lens", "serve", "--upstream", f"http://127.0.0.1:{port}",
         "--listen", f"127.0.0.1:{lens}", "--admin-listen", f"127.0.0.1:{admin}",
         "--data-dir", str(work / "data"), "--log-level", "warning"],
    )  # fmt: skip
    processes.append(server)
    direct, through = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{lens}"
    rows = []
    try:
        wait_for(f"{direct}/warm")
        wait_for(f"http://127.0.0.1:{admin}/healthz")
        for transfer in TRANSFERS:
            curl(direct, transfer, warm)
            for _ in range(2):
                curl(through, transfer, warm)
        hwm_before = proc_status(server.pid, "VmHWM")["VmHWM"]
        for transfer in TRANSFERS:
            direct_seconds = curl(direct, transfer, big)
            before = rss(server.pid)
            sampler = Sampler(server.pid)
            sampler.start()
            lens_seconds = curl(through, transfer, big)
            peak = sampler.stop()
            after = rss(server.pid)
            rows.append((transfer, direct_seconds, lens_seconds, before, peak, after))
        hwm_after = proc_status(server.pid, "VmHWM")["VmHWM"]
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
    size = args.mib << 20
    print(
        f"| {mib(size)} each way | direct | through session-lens | of direct | RSS before"
        " | RSS peak | growth | RSS after | target growth |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for transfer, direct_seconds, lens_seconds, before, peak, after in rows:
        direct_rate, lens_rate = size / direct_seconds / (1 << 20), size / lens_seconds / (1 << 20)
        growth = peak - before
        verdict = "met" if growth <= TARGET_GROWTH * size / (1 << 30) else "not met"
        print(
            f"| {transfer.label} | {direct_rate:,.0f} MiB/s | {lens_rate:,.0f} MiB/s"
            f" | {lens_rate / direct_rate:.0%} | {mib(before)} | {mib(peak)} | +{mib(growth)}"
            f" | {mib(after)} | ≤ {mib(TARGET_GROWTH)}: {verdict} |"
        )
    print()
    print(
        f"session-lens VmHWM: {mib(hwm_before)} after the warm-up, {mib(hwm_after)} at the end"
        f" (+{mib(hwm_after - hwm_before)}); pid {server.pid}, {os.cpu_count()} cores shared"
        " by curl, nginx, the sink and session-lens."
    )


if __name__ == "__main__":
    main()
