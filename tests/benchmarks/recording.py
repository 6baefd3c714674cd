"""What recording lifecycle events costs: observed mode beside database mode, one run.

    python -m tests.benchmarks.recording [--seconds 10]

Needs `nginx` and `wrk` (Debian: nginx-light, wrk). nginx is the upstream: it answers
`POST /api/sessions` (a create) with `201 {"id": …}`, the ID the request named in
`X-Id`, and `POST /api/sessions/{id}/pause` with a small JSON body. wrk sends each
kind with a new ID every request, at c=1 and c=16, straight to nginx, then through
session-lens in database mode (`lifecycle_source = database`: nothing recorded) and in
observed mode (the create's ID read from the answer, every event spooled and written to
the embedded PostgreSQL); medians of three turns, the three paths taking turns.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.tools import require, wait_for, wrk
from tests.conftest import free_port

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


def lens(upstream: str, data_dir: Path, source: str) -> tuple[subprocess.Popen[bytes], str]:
    port, admin = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "session_lens", "serve", "--upstream", upstream,
         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--data-dir", str(data_dir), "--lifecycle-source", source, "--log-level", "warning"],
    )  # fmt: skip
    wait_for(f"http://127.0.0.1:{admin}/healthz")
    return process, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    require("nginx", "wrk")
    work = Path(tempfile.mkdtemp())
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
        runs: dict[tuple[str, int, str], list[tuple[float, float, float]]] = {}
        for _ in range(3):
            for kind, script in scripts.items():
                for connections in (1, 16):
                    for name, url in paths.items():
                        figures = wrk(url, connections, args.seconds, script, all_ok=True)
                        runs.setdefault((kind, connections, name), []).append(figures)
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        nginx.terminate()
        nginx.wait()
    print("| requests | c | path | req/s | p50 | p99 | req/s against database mode |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for (kind, connections, name), figures in runs.items():
        rate, p50, p99 = (statistics.median(column) for column in zip(*figures, strict=True))
        off = statistics.median(
            f[0] for f in runs[kind, connections, "session-lens, database mode"]
        )
        print(
            f"| {kind} | {connections} | {name} | {rate:.0f} | {p50:.0f} µs | {p99:.0f} µs"
            f" | {rate / off:.2f}x |"
        )


if __name__ == "__main__":
    main()
