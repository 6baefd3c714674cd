"""The hop beside references, in one run: hits, passthrough, invalid IDs, workers.

    python -m tests.benchmarks.hop [--seconds 5]

Needs `nginx` and `wrk` (Debian: nginx-light, wrk). nginx is the upstream (one
worker, a 55-byte JSON body); the same requests go straight to it, through nginx
as a keep-alive `proxy_pass` (one worker) and through `session-lens serve` (one
process). Invalid IDs are compared with a bare aiohttp handler returning the same
answer; hits through `session-lens serve --workers 2` with one worker's. Prints
markdown tables of absolute figures and ratios, and the targets met or not.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.benchmarks.tools import require, wait_for, wrk
from tests.conftest import free_port, parents

NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{origin};
    location / {{ default_type application/json;
                 return 200 '{{"id":"exec_20251230_020944_4ad060d9","state":"ACTIVE"}}'; }}
  }}
  server {{
    listen 127.0.0.1:{proxy};
    location / {{ proxy_pass http://origin; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_set_header Host $host; }}
  }}
}}
"""

BARE = """
import json, sys
from aiohttp import web
body = json.dumps({"title": "Not Found", "status": 404, "reason": "invalid_format"}).encode()
async def handle(request):
    return web.Response(status=404, body=body, content_type="application/problem+json")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

HIT = "/api/sessions/exec_20251230_020944_4ad060d9"
PASS = "/api/other/thing"
INVALID = "/api/sessions/not-a-session"


def latencies(targets: dict[str, str], path: str, seconds: int) -> dict[str, tuple[float, float]]:
    """p50 and p99 at one connection for each target: the median of three turns each."""
    turns: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    for _ in range(3):
        for name, url in targets.items():
            turns[name].append(wrk(url + path, 1, max(2, seconds // 2))[1:])
    return {
        name: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
        for name, runs in turns.items()
    }


@contextmanager
def pinned(pids: list[int]) -> Iterator[None]:
    """Everything (these processes, their children and wrk) on CPU 0 meanwhile.

    At one connection each request wakes every process on its way in turn; on a
    virtual machine waking an idle CPU costs tens of microseconds a time, which
    one core avoids. The difference between the two columns is that cost.
    """
    everything = set(range(os.cpu_count() or 1))
    family = descendants(pids)
    for pid in family:
        os.sched_setaffinity(pid, {0})
    os.sched_setaffinity(0, {0})  # wrk inherits it
    try:
        yield
    finally:
        for pid in family:
            os.sched_setaffinity(pid, everything)
        os.sched_setaffinity(0, everything)


def descendants(pids: list[int]) -> set[int]:
    """The processes and all their children, from /proc."""
    every = parents()
    family = set(pids)
    while True:
        more = {pid for pid, parent in every.items() if parent in family} - family
        if not more:
            return family
        family |= more


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    require("nginx", "wrk")
    work = Path(tempfile.mkdtemp())
    origin, nginx_proxy, lens, admin, bare, lens2, admin2 = (free_port() for _ in range(7))
    (work / "nginx.conf").write_text(NGINX.format(dir=work, origin=origin, proxy=nginx_proxy))
    (work / "bare.py").write_text(BARE)
    processes = [
        subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]),
        subprocess.Popen([sys.executable, str(work / "bare.py"), str(bare)]),
        subprocess.Popen(
            [sys.executable, "-m", "session_lens", "serve", "--upstream",
             f"http://127.0.0.1:{origin}", "--listen", f"127.0.0.1:{lens}",
             "--admin-listen", f"127.0.0.1:{admin}", "--data-dir", str(work / "data"),
             "--log-level", "error"],
        ),
        subprocess.Popen(
            [sys.executable, "-m", "session_lens", "serve", "--upstream",
             f"http://127.0.0.1:{origin}", "--listen", f"127.0.0.1:{lens2}",
             "--admin-listen", f"127.0.0.1:{admin2}", "--data-dir", str(work / "data"),
             "--log-level", "error", "--workers", "2"],
        ),
    ]  # fmt: skip
    rows: list[str] = []
    try:
        wait_for(f"http://127.0.0.1:{origin}/")
        wait_for(f"http://127.0.0.1:{admin}/healthz")
        targets = {
            "direct": f"http://127.0.0.1:{origin}",
            "nginx proxy_pass": f"http://127.0.0.1:{nginx_proxy}",
            "session-lens": f"http://127.0.0.1:{lens}",
        }
        servers = [p.pid for p in processes[:3]]
        for label, path in (("hits", HIT), ("passthrough", PASS)):
            rates = {name: wrk(url + path, 32, args.seconds)[0] for name, url in targets.items()}
            spread = latencies(targets, path, args.seconds)
            with pinned(servers):
                packed = latencies(targets, path, args.seconds)
            nginx_rate = rates["nginx proxy_pass"]
            for name, rate in rates.items():
                (p50, p99), (one_p50, _) = spread[name], packed[name]
                rows.append(
                    f"| {label} | {name} | {rate:,.0f} | {rate / nginx_rate:.0%} |"
                    f" {p50:.0f} µs | {p99:.0f} µs | {p50 - spread['direct'][0]:+.0f} µs |"
                    f" {one_p50 - packed['direct'][0]:+.0f} µs |"
                )
            if label == "hits":
                hit_ratio = rates["session-lens"] / nginx_rate
                added_p50 = spread["session-lens"][0] - spread["direct"][0]
                added_one = packed["session-lens"][0] - packed["direct"][0]
        wait_for(f"http://127.0.0.1:{bare}/")
        bare_rate = wrk(f"http://127.0.0.1:{bare}{INVALID}", 32, args.seconds)[0]
        lens_rate = wrk(f"http://127.0.0.1:{lens}{INVALID}", 32, args.seconds)[0]
        wait_for(f"http://127.0.0.1:{lens2}/")
        workers = {
            connections: (
                wrk(f"http://127.0.0.1:{lens}{HIT}", connections, args.seconds)[0],
                wrk(f"http://127.0.0.1:{lens2}{HIT}", connections, args.seconds)[0],
            )
            for connections in (32, 64)
        }
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    print(
        "| requests | path | req/s at c=32 | of nginx | p50 at c=1 | p99 at c=1 | p50 over direct"
        " | p50 over direct, one core |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print("| invalid IDs | req/s at c=32 | of the bare handler |")
    print("|---|---:|---:|")
    print(f"| bare aiohttp handler | {bare_rate:,.0f} | 100% |")
    print(f"| session-lens | {lens_rate:,.0f} | {lens_rate / bare_rate:.0%} |")
    print()
    print("| hits through session-lens | 1 worker | 2 workers | 2 workers / 1 |")
    print("|---|---:|---:|---:|")
    for connections, (one, two) in workers.items():
        print(f"| wrk c={connections} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x |")
    best = max(two / one for one, two in workers.values())
    print()
    print("| target | wanted | measured | met |")
    print("|---|---|---|---|")
    for name, wanted, measured, met in (
        ("hits, share of nginx's rate", "≥ 30%", f"{hit_ratio:.0%}", hit_ratio >= 0.3),
        ("added p50 at c=1", "≤ +120 µs", f"{added_p50:+.0f} µs", added_p50 <= 120),
        ("the same, all on one core", "≤ +120 µs", f"{added_one:+.0f} µs", added_one <= 120),
        ("invalid IDs, share of the bare handler", "≥ 90%", f"{lens_rate / bare_rate:.0%}",
         lens_rate / bare_rate >= 0.9),
        ("2 workers over 1", "≥ 1.7x", f"{best:.2f}x", best >= 1.7),
    ):  # fmt: skip
        print(f"| {name} | {wanted} | {measured} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
