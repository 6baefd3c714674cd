"""The hop beside references, in one run: hits, passthrough, HEAD, uploads, invalid IDs, workers.

    python -m tests.benchmarks.hop [--seconds 5] [--before DIR]

Needs `nginx`, `wrk` and `ab` (Debian: nginx-light, wrk, apache2-utils). nginx is the
upstream (one worker, a 55-byte JSON body); the same requests go straight to it, through
nginx as a keep-alive `proxy_pass` (one worker) and through `session-lens serve` (one
process): GET of a hit and of a path passed through, HEAD of the hit (with ab: wrk 4.1
cannot, see `tools.ab_head`) and a 1 MiB chunked upload. The upload is sent raw by wrk,
16 chunks of 64 KiB. The upstream reads all of it before it answers: nginx's `return`
answers at once and drops the body as it comes, so the mirror module reads the body first,
then a content handler (stub_status) refuses the POST with 405 and `error_page` turns that
into a small 200. nginx as a proxy streams the body on as session-lens does
(`proxy_request_buffering off`). Invalid IDs are compared with a bare aiohttp handler
returning the same answer; hits through `session-lens serve --workers 2` with one worker's.
The CPU time the session-lens process spends on a hit, a passthrough and an invalid ID is
read from /proc with the process on a core of its own, the steadiest figure on a shared
machine.

With `--before DIR` (a checkout of an earlier commit), a second session-lens runs from
DIR/src beside the current one, measured the same way in the same run: every table gets
its rows, and a last table sets each figure before against after. Every figure is the
median of three runs, the targets taking turns. Prints markdown tables of absolute figures
and ratios, and the targets met or not.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

from tests.benchmarks.tools import ab_head, require, wait_for, wrk
from tests.conftest import free_port, parents

NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_max_body_size 2m; client_body_buffer_size 2m;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{origin};
    location / {{ default_type application/json;
                 return 200 '{{"id":"exec_20251230_020944_4ad060d9","state":"ACTIVE"}}'; }}
    location = /upload {{ mirror /read; stub_status; error_page 405 =200 @uploaded; }}
    location = /read {{ internal; return 204; }}
    location @uploaded {{ default_type application/json; return 200 '{{"uploaded":true}}'; }}
  }}
  server {{
    listen 127.0.0.1:{proxy};
    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_request_buffering off;
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
CHUNK, CHUNKS = 64 * 1024, 16
UPLOAD = (
    b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    + (b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n") * CHUNKS
    + b"0\r\n\r\n"
)
UPLOAD_LUA = """
local file = assert(io.open("{request}", "rb"))
local raw = file:read("*a")
file:close()
request = function() return raw end
"""
UPLOADERS = 32
"""Connections uploading at once."""
LENS, BEFORE = "session-lens", "session-lens, before"
NOISE = 0.05
"""How much worse than before a figure may come out and still count as unchanged."""

Load = Callable[[str, int, int], tuple[float, float, float]]
K = TypeVar("K")
KINDS: tuple[tuple[str, str, Load], ...] = (
    ("hits", HIT, wrk),
    ("passthrough", PASS, wrk),
    ("HEAD lookups", HIT, ab_head),
)
"""Requests measured for rate and latency: label, path, the tool that sends them."""
CPU_KINDS = (("hits", HIT), ("passthrough", PASS), ("invalid IDs", INVALID))
"""Requests whose CPU cost to the session-lens process is measured."""


class Run(NamedTuple):
    """What a load tool measured: requests per second, p50 and p99 in microseconds."""

    rate: float
    p50: float
    p99: float


class Hop(NamedTuple):
    """What one kind of request measured through one target."""

    rate: float
    p50: float
    p99: float
    one_core_p50: float


class Change(NamedTuple):
    """One figure of the current session-lens set against the one before."""

    figure: str
    unit: str
    before: float
    after: float
    higher_is_better: bool

    @property
    def worse(self) -> bool:
        if self.higher_is_better:
            return self.after < self.before * (1 - NOISE)
        return self.after > self.before * (1 + NOISE)


def in_turns(
    targets: Mapping[K, str], path: str, connections: int, seconds: int, load: Load = wrk
) -> dict[K, Run]:
    """Requests per second, p50 and p99 through each target: each the median of three runs.

    The targets take turns, so that a slow moment of the machine falls on all of them.
    """
    runs: dict[K, list[tuple[float, float, float]]] = {name: [] for name in targets}
    for _ in range(3):
        for name, url in targets.items():
            runs[name].append(load(url + path, connections, seconds))
    return {
        name: Run(*(statistics.median(figures) for figures in zip(*found, strict=True)))
        for name, found in runs.items()
    }


@contextmanager
def pinned(pids: list[int]) -> Iterator[None]:
    """Everything (these processes, their children and the load tool) on CPU 0 meanwhile.

    At one connection each request wakes every process on its way in turn; on a
    virtual machine waking an idle CPU costs tens of microseconds a time, which
    one core avoids. The difference between the two columns is that cost.
    """
    everything = set(range(os.cpu_count() or 1))
    family = descendants(pids)
    for pid in family:
        os.sched_setaffinity(pid, {0})
    os.sched_setaffinity(0, {0})  # wrk and ab inherit it
    try:
        yield
    finally:
        for pid in family:
            os.sched_setaffinity(pid, everything)
        os.sched_setaffinity(0, everything)


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used, user and system, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_request(
    servers: Mapping[str, tuple[int, str]], path: str, seconds: int
) -> dict[str, float]:
    """CPU microseconds each server process spends on a request, at c=32: the server on
    CPU 1, the load tool and the upstream on CPU 0; medians of three turns.

    Rates swing with the other processes sharing the cores; the CPU a request costs
    the server swings far less.
    """
    everything = set(range(os.cpu_count() or 1))
    found: dict[str, list[float]] = {name: [] for name in servers}
    os.sched_setaffinity(0, {0})
    try:
        for _ in range(3):
            for name, (pid, url) in servers.items():
                os.sched_setaffinity(pid, {1})
                before = cpu_seconds(pid)
                rate, _, _ = wrk(url + path, 32, seconds)
                found[name].append((cpu_seconds(pid) - before) / (rate * seconds) * 1e6)
                os.sched_setaffinity(pid, everything)
    finally:
        os.sched_setaffinity(0, everything)
    return {name: statistics.median(figures) for name, figures in found.items()}


def descendants(pids: list[int]) -> set[int]:
    """The processes and all their children, from /proc."""
    every = parents()
    family = set(pids)
    while True:
        more = {pid for pid, parent in every.items() if parent in family} - family
        if not more:
            return family
        family |= more


def from_source(source: Path) -> dict[str, str]:
    """The environment in which Python imports session_lens from `source`/src, checked."""
    src = (source / "src").resolve()
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    found = subprocess.run(
        [sys.executable, "-c", "import session_lens; print(session_lens.__file__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(src):
        raise SystemExit(f"--before {source}: session_lens is imported from {found}")
    return env


def session_lens(
    origin: int, listen: int, data: Path, workers: int, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    """`session-lens serve` in front of the origin, from the code `env` makes Python import."""
    return subprocess.Popen(
        [sys.executable, "-m", "session_lens", "serve", "--upstream", f"http://127.0.0.1:{origin}",
         "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{free_port()}",
         "--data-dir", str(data), "--log-level", "error", "--workers", str(workers)],
        env=env,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument(
        "--before", type=Path, metavar="DIR", help="also measure the session-lens in DIR/src"
    )
    args = parser.parse_args()
    require("nginx", "wrk", "ab")
    builds = {LENS: None} | ({BEFORE: from_source(args.before)} if args.before else {})
    work = Path(tempfile.mkdtemp())
    origin, nginx_proxy, bare = free_port(), free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX.format(dir=work, origin=origin, proxy=nginx_proxy))
    (work / "bare.py").write_text(BARE)
    (work / "upload.http").write_bytes(UPLOAD)
    (work / "upload.lua").write_text(UPLOAD_LUA.format(request=work / "upload.http"))
    processes = [
        subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]),
        subprocess.Popen([sys.executable, str(work / "bare.py"), str(bare)]),
    ]
    one: dict[str, str] = {}  # each build's session-lens, one process
    two: dict[str, str] = {}  # and with --workers 2
    single: dict[str, tuple[int, str]] = {}  # the one process's pid, and its URL
    for name, env in builds.items():
        for urls, workers in ((one, 1), (two, 2)):
            port = free_port()
            processes.append(session_lens(origin, port, work / "data", workers, env))
            urls[name] = f"http://127.0.0.1:{port}"
            if workers == 1:
                single[name] = (processes[-1].pid, urls[name])
    measured: dict[tuple[str, str], Hop] = {}
    try:
        for port in (origin, bare):
            wait_for(f"http://127.0.0.1:{port}/")
        for url in (*one.values(), *two.values()):
            wait_for(url + "/")
            wrk(url + HIT, 32, 1)  # a warm-up: upstream connections opened, code paths run
        targets = {
            "direct": f"http://127.0.0.1:{origin}",
            "nginx proxy_pass": f"http://127.0.0.1:{nginx_proxy}",
            **one,
        }
        short = max(2, args.seconds // 2)  # each run at one connection
        for label, path, load in KINDS:
            rates = in_turns(targets, path, 32, args.seconds, load)
            spread = in_turns(targets, path, 1, short, load)
            with pinned([p.pid for p in processes]):
                packed = in_turns(targets, path, 1, short, load)
            for name in targets:
                measured[label, name] = Hop(
                    rates[name].rate, spread[name].p50, spread[name].p99, packed[name].p50
                )
        upload = partial(wrk, script=work / "upload.lua", all_ok=True)
        uploads = in_turns(targets, "/upload", UPLOADERS, args.seconds, upload)
        bare_url = f"http://127.0.0.1:{bare}"
        invalid = in_turns({"bare aiohttp handler": bare_url, **one}, INVALID, 32, args.seconds)
        servers = {(name, n): urls[name] for name in builds for n, urls in ((1, one), (2, two))}
        scaling = {c: in_turns(servers, HIT, c, args.seconds) for c in (32, 64)}
        cpu = {kind: cpu_per_request(single, path, args.seconds) for kind, path in CPU_KINDS}
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    print(
        "| requests | path | req/s at c=32 | of nginx | p50 at c=1 | p99 at c=1 | p50 over direct"
        " | p50 over direct, one core |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, _, _ in KINDS:
        direct, nginx = measured[label, "direct"], measured[label, "nginx proxy_pass"]
        for name in targets:
            hop = measured[label, name]
            print(
                f"| {label} | {name} | {hop.rate:,.0f} | {hop.rate / nginx.rate:.0%} |"
                f" {hop.p50:.0f} µs | {hop.p99:.0f} µs | {hop.p50 - direct.p50:+.0f} µs |"
                f" {hop.one_core_p50 - direct.one_core_p50:+.0f} µs |"
            )
    size = CHUNK * CHUNKS / (1 << 20)
    print()
    print(
        f"| {size:.0f} MiB chunked upload in {CHUNKS} chunks of {CHUNK // 1024} KiB | req/s at"
        f" c={UPLOADERS} | MiB/s | of nginx |"
    )
    print("|---|---:|---:|---:|")
    for name, run in uploads.items():
        print(
            f"| {name} | {run.rate:,.0f} | {run.rate * size:,.0f} |"
            f" {run.rate / uploads['nginx proxy_pass'].rate:.0%} |"
        )
    print()
    print("| invalid IDs | req/s at c=32 | of the bare handler |")
    print("|---|---:|---:|")
    bare_rate = invalid["bare aiohttp handler"].rate
    for name, run in invalid.items():
        print(f"| {name} | {run.rate:,.0f} | {run.rate / bare_rate:.0%} |")
    print()
    print("| hits through session-lens | 1 worker | 2 workers | 2 workers / 1 |")
    print("|---|---:|---:|---:|")
    for connections, found in scaling.items():
        for name in builds:
            single, double = found[name, 1].rate, found[name, 2].rate
            print(
                f"| wrk c={connections}{name.removeprefix(LENS)} | {single:,.0f} |"
                f" {double:,.0f} | {double / single:.2f}x |"
            )
    print()
    print("| CPU per request, at c=32 | " + " | ".join(builds) + " |")
    print("|---|" + "---:|" * len(builds))
    for kind, _ in CPU_KINDS:
        print(f"| {kind} | " + " | ".join(f"{cpu[kind][name]:.0f} µs" for name in builds) + " |")
    changes: list[Change] = []
    if BEFORE in builds:
        changes += [
            Change(f"CPU per request, {kind}", " µs", cpu[kind][BEFORE], cpu[kind][LENS], False)
            for kind, _ in CPU_KINDS
        ]
        for label, _, _ in KINDS:
            then, now = measured[label, BEFORE], measured[label, LENS]
            changes += [
                Change(f"{label}, req/s at c=32", "", then.rate, now.rate, True),
                Change(f"{label}, p50 at c=1", " µs", then.p50, now.p50, False),
                Change(f"{label}, p99 at c=1", " µs", then.p99, now.p99, False),
                Change(f"{label}, p50 at c=1, one core", " µs", then.one_core_p50,
                       now.one_core_p50, False),
            ]  # fmt: skip
        changes += [
            Change(f"chunked upload, MiB/s at c={UPLOADERS}", " MiB/s",
                   uploads[BEFORE].rate * size, uploads[LENS].rate * size, True),
            Change("invalid IDs, req/s at c=32", "", invalid[BEFORE].rate, invalid[LENS].rate,
                   True),
            *(Change(f"hits, 2 workers, req/s at c={connections}", "",
                     found[BEFORE, 2].rate, found[LENS, 2].rate, True)
              for connections, found in scaling.items()),
        ]  # fmt: skip
        print()
        print("| session-lens, before → after | before | after | after / before | worse |")
        print("|---|---:|---:|---:|---|")
        for change in changes:
            print(
                f"| {change.figure} | {change.before:,.0f}{change.unit} |"
                f" {change.after:,.0f}{change.unit} | {change.after / change.before:.2f}x |"
                f" {'yes' if change.worse else ''} |"
            )
    hits = {name: measured["hits", name] for name in targets}
    hit_ratio = hits[LENS].rate / hits["nginx proxy_pass"].rate
    added_p50 = hits[LENS].p50 - hits["direct"].p50
    added_one = hits[LENS].one_core_p50 - hits["direct"].one_core_p50
    invalid_ratio = invalid[LENS].rate / bare_rate
    best = max(found[LENS, 2].rate / found[LENS, 1].rate for found in scaling.values())
    checks = [
        ("hits, share of nginx's rate", "≥ 30%", f"{hit_ratio:.0%}", hit_ratio >= 0.3),
        ("added p50 at c=1", "≤ +120 µs", f"{added_p50:+.0f} µs", added_p50 <= 120),
        ("the same, all on one core", "≤ +120 µs", f"{added_one:+.0f} µs", added_one <= 120),
        ("invalid IDs, share of the bare handler", "≥ 90%", f"{invalid_ratio:.0%}",
         invalid_ratio >= 0.9),
        ("2 workers over 1", "≥ 1.7x", f"{best:.2f}x", best >= 1.7),
    ]  # fmt: skip
    if changes:
        worse = [change.figure for change in changes if change.worse]
        checks.append(
            ("no figure worse than before", f"none worse by more than {NOISE:.0%}",
             "; ".join(worse) or "none", not worse)
        )  # fmt: skip
    print()
    print("| target | wanted | measured | met |")
    print("|---|---|---|---|")
    for name, wanted, measured_as, met in checks:
        print(f"| {name} | {wanted} | {measured_as} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
