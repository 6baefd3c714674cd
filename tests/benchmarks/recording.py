"""What recording lifecycle events costs: observed mode beside database mode, one run.

    python -m tests.benchmarks.recording [--seconds 10]

Needs `nginx` and `wrk` (Debian: nginx-light, wrk). nginx is the upstream: it answers
`POST /api/sessions` (a create) with `201 {"id": …}`, the ID the request named in
`X-Id`, and `POST /api/sessions/{id}/pause` with a small JSON body. wrk sends each
kind with a new ID every request, at c=1 and c=16, straight to nginx, then through
session-lens in database mode (`lifecycle_source = database`: nothing recorded) and in
observed mode (the create's ID read from the answer, every event spooled and written to
the embedded PostgreSQL); medians of five turns, the three paths taking turns in an
order that shifts every round, with the lowest and highest of the rounds' ratios.

nginx records nothing, so there database mode records nothing either: the ratio is
observed mode's whole recording cost against none. `--upstream service` puts a real
service in nginx's place, the reference service (`session_lens.reference`, no faults)
writing each session and its audit entry into PostgreSQL: in database mode into the
lifecycle tables session-lens reads (recording done by the service's own write, as a
database-mode deployment has it), in observed mode into a store of its own (the same
tables in another database), session-lens recording what it sees into a third.

`--steps` says where observed mode's CPU goes, CPU time of the session-lens process per
create (wrk at c=16 against nginx), with the steps of a create's observation switched
off one by one in the sidecar's process (a `sitecustomize` this benchmark writes; the
code under measurement is not changed).
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from session_lens.embedded import start_embedded
from session_lens.migrations import migrate
from session_lens.schema import Tables
from tests.benchmarks.tools import require, wait_for, wrk
from tests.conftest import free_port, with_database

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location = /api/sessions {{
      default_type application/json; return 201 '{{"id":"$http_x_id"}}';
    }}
    location / {{ default_type application/json; return 200 '{{"done":true}}'; }}
  }}
}}
"""

WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local id = string.format("exec_20251230_020944_%08x", counter)
  return wrk.format("POST", "/api/sessions/" .. id .. "/pause", nil, "")
end
"""

CREATE_SCRIPT = """
counter = 0
math.randomseed(os.time())
local base = math.random(0, 65535) * 65536
request = function()
  counter = counter + 1
  local id = string.format("exec_20251230_020944_%08x", base + counter)
  return wrk.format("POST", "/api/sessions", {["X-Id"] = id}, "")
end
"""


SERVICE_CREATE = """
request = function()
  return wrk.format("POST", "/api/sessions", {["Content-Type"] = "application/json"}, "{}")
end
"""


def lens(
    upstream: str, data_dir: Path, source: str, database_url: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port, admin = free_port(), free_port()
    store = ["--database-url", database_url] if database_url else []
    process = subprocess.Popen(
        [sys.executable, "-m", "session_lens", "serve", "--upstream", upstream,
         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--data-dir", str(data_dir), "--lifecycle-source", source, "--log-level", "warning",
         *store],
    )  # fmt: skip
    wait_for(f"http://127.0.0.1:{admin}/healthz")
    return process, f"http://127.0.0.1:{port}"


def service(database_url: str) -> tuple[subprocess.Popen[bytes], str]:
    """The reference service, no faults, its sessions in `database_url`."""
    port = free_port()
    environ = {**os.environ, "SESSION_LENS_DATABASE_URL": database_url,
               "REFERENCE_LISTEN": f"127.0.0.1:{port}", "REFERENCE_FAULTS": ""}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "session_lens.reference"], env=environ)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/api/sessions")
    return process, url


async def databases(url: str, names: list[str]) -> dict[str, str]:
    """Fresh databases of those names, migrated; their URLs."""
    admin = await asyncpg.connect(url)
    try:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    made = {}
    for name in names:
        made[name] = with_database(url, name)
        conn = await asyncpg.connect(made[name])
        try:
            await migrate(conn, Tables())
        finally:
            await conn.close()
    return made


@contextmanager
def stopped_after(processes: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
            process.wait()


ROUNDS = 5


def turns(
    paths: Mapping[str, str], scripts: Mapping[str, Path], seconds: int, rounds: int = ROUNDS
) -> dict[tuple[str, int, str], list[tuple[float, float, float]]]:
    """`rounds` turns of every kind, c=1 and c=16, the paths taking turns in an order
    that shifts by one each round: none always runs right after another (the database's
    checkpoints and autovacuum after a turn of writes fall on each in turn)."""
    runs: dict[tuple[str, int, str], list[tuple[float, float, float]]] = {}
    names = list(paths)
    for index in range(rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        for kind, script in scripts.items():
            for connections in (1, 16):
                for name in order:
                    figures = wrk(paths[name], connections, seconds, script, all_ok=True)
                    runs.setdefault((kind, connections, name), []).append(figures)
    return runs


def table(runs: dict[tuple[str, int, str], list[tuple[float, float, float]]]) -> None:
    """Medians of the turns; each path's rate against database mode's, as the medians'
    ratio and as the lowest and highest of the rounds' own ratios."""
    print(
        "| requests | c | path | req/s | p50 | p99 | req/s against database mode"
        " | rounds' lowest to highest | p99 against database mode |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for (kind, connections, name), figures in runs.items():
        rate, p50, p99 = (statistics.median(column) for column in zip(*figures, strict=True))
        base = runs[kind, connections, "session-lens, database mode"]
        off = statistics.median(f[0] for f in base)
        off_p99 = statistics.median(f[2] for f in base)
        each = [mine[0] / theirs[0] for mine, theirs in zip(figures, base, strict=True)]
        print(
            f"| {kind} | {connections} | {name} | {rate:.0f} | {p50:.0f} µs | {p99:.0f} µs"
            f" | {rate / off:.2f}x | {min(each):.2f}x to {max(each):.2f}x"
            f" | {(p99 - off_p99) / 1000:+.1f} ms |"
        )


def with_service(work: Path, seconds: int) -> None:
    """The reference service as the upstream: creates, database mode against observed."""
    work.mkdir()
    database = start_embedded(work / "pg", delete_on_exit=True)
    urls = asyncio.run(databases(database.url, ["lens_database", "own_store", "lens_observed"]))
    script = work / "service-create.lua"
    script.write_text(SERVICE_CREATE)
    processes: list[subprocess.Popen[bytes]] = []
    with stopped_after(processes):
        served, served_url = service(urls["lens_database"])
        own, own_url = service(urls["own_store"])
        processes += [served, own]
        database_mode, database_url = lens(
            served_url, work / "database", "database", urls["lens_database"]
        )
        observed_mode, observed_url = lens(
            own_url, work / "observed", "observed", urls["lens_observed"]
        )
        processes += [database_mode, observed_mode]
        paths = {
            "direct to the service": served_url,
            "session-lens, database mode": database_url,
            "session-lens, observed mode": observed_url,
        }
        runs = turns(paths, {"create": script}, seconds)
    table(runs)


STEPS = {
    "database mode": "",
    "observed mode, nothing observed": """
ob.Observer.observe = lambda self, exchange, method, path: None
""",
    "+ the observation, answer not read": """
def answer(self, status, location):
    self.answered = True
    return False
ob.Observation.answer = answer
""",
    "+ the answer's body read for the ID": """
ob.Observer.record = lambda self, *a, **k: None
""",
    "+ the event made": """
def record(self, exchange, found, session_id, ok, detail, at):
    rec.Event.new(session_id, found.route.action, exchange.request_id, ok, detail, at)
ob.Observer.record = record
""",
    "+ spooled": """
def spooled(self, event):
    self._spool.append(event.line())
rec.Recorder.record = spooled
""",
    "+ indexed in flight (and taken out again)": """
def indexed(self, event):
    self._spool.append(event.line())
    self.in_flight.add(event)
    self.in_flight.stored([event])
rec.Recorder.record = indexed
""",
    "+ written by the writer (observed mode)": "",
}
"""Each step's patch of the sidecar, cumulative from the top: what it switches off."""


def steps(work: Path, seconds: int) -> None:
    """CPU per create of the session-lens process, step by step (see `--steps`)."""
    from tests.benchmarks.hop import cpu_seconds

    work.mkdir(exist_ok=True)
    port = free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=port))
    script = work / "create.lua"
    script.write_text(CREATE_SCRIPT)
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    upstream = f"http://127.0.0.1:{port}"
    processes, servers = [nginx], {}
    with stopped_after(processes):
        wait_for(upstream)
        for index, (name, patch) in enumerate(STEPS.items()):
            site = work / f"step{index}"
            site.mkdir()
            header = "import session_lens.observation as ob, session_lens.recorder as rec\n"
            (site / "sitecustomize.py").write_text(header + patch if patch else "")
            source = "database" if index == 0 else "observed"
            environ = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, str(site)])}
            lens_port, admin = free_port(), free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "session_lens", "serve", "--upstream", upstream,
                 "--listen", f"127.0.0.1:{lens_port}", "--admin-listen", f"127.0.0.1:{admin}",
                 "--data-dir", str(site / "data"), "--lifecycle-source", source,
                 "--log-level", "error"], env=environ,
            )  # fmt: skip
            processes.append(process)
            wait_for(f"http://127.0.0.1:{admin}/healthz")
            servers[name] = (process.pid, f"http://127.0.0.1:{lens_port}")
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(3):
            for name, (pid, url) in servers.items():
                before = cpu_seconds(pid)
                rate = wrk(url, 16, seconds, script, all_ok=True)[0]
                time.sleep(1.0)  # the writer's last batch
                cpu[name].append((cpu_seconds(pid) - before) / (rate * seconds) * 1e6)
    print("| step (cumulative) | CPU per create | added by the step |")
    print("|---|---:|---:|")
    previous = None
    for name, figures in cpu.items():
        each = statistics.median(figures)
        added = "" if previous is None else f"{each - previous:+.1f} µs"
        print(f"| {name} | {each:.1f} µs | {added} |")
        previous = each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--upstream", choices=("nginx", "service", "both"), default="both")
    parser.add_argument("--steps", action="store_true", help="where observed mode's CPU goes")
    args = parser.parse_args()
    require("nginx", "wrk")
    work = Path(tempfile.mkdtemp())
    if args.steps:
        steps(work, args.seconds)
        return
    if args.upstream != "nginx":
        print("With the reference service as the upstream:\n")
        with_service(work / "service", args.seconds)
        if args.upstream == "service":
            return
        print("\nWith nginx as the upstream, answering from memory:\n")
    port = free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=port))
    scripts = {"create": work / "create.lua", "pause": work / "pause.lua"}
    scripts["create"].write_text(CREATE_SCRIPT)
    scripts["pause"].write_text(WRK_SCRIPT)
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    upstream = f"http://127.0.0.1:{port}"
    processes = []
    try:
        wait_for(upstream)
        paths = {"direct to nginx": upstream}
        for source, label in (("database", "database mode"), ("observed", "observed mode")):
            process, url = lens(upstream, work / source, source)
            processes.append(process)
            paths[f"session-lens, {label}"] = url
        runs = turns(paths, scripts, args.seconds)
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        nginx.terminate()
        nginx.wait()
    table(runs)
    if args.upstream == "both":
        print("\nWhere observed mode's CPU goes (`--steps`):\n")
        steps(work / "steps", args.seconds)


if __name__ == "__main__":
    main()
