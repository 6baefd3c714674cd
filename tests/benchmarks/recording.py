"""Added latency of recording lifecycle events: observed mode against database mode, one run.

    python -m tests.benchmarks.recording [--seconds 10]

Needs `nginx` and `wrk` (Debian: nginx-light, wrk). nginx is the upstream, answering
every `POST /api/sessions/{id}/pause` with a small JSON body; wrk sends them one at a
time (c=1) with a new ID each, first straight to nginx, then through session-lens
with recording off (`lifecycle_source = database`), then on (`observed`, events
spooled and written to the embedded PostgreSQL).
"""

import argparse
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
    (work / "wrk.lua").write_text(WRK_SCRIPT)
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    upstream = f"http://127.0.0.1:{port}"
    try:
        wait_for(upstream)
        rows = [("direct to nginx", *wrk(upstream, 1, args.seconds, work / "wrk.lua"))]
        for source, label in (("database", "recording off"), ("observed", "recording on")):
            process, url = lens(upstream, work / source, source)
            try:
                rows.append(
                    (f"session-lens, {label}", *wrk(url, 1, args.seconds, work / "wrk.lua"))
                )
            finally:
                process.terminate()
                process.wait()
    finally:
        nginx.terminate()
        nginx.wait()
    direct = rows[0]
    print("| path | p50 | p99 | req/s | p99 added over direct |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, p50, p99 in rows:
        print(f"| {name} | {p50:.0f} µs | {p99:.0f} µs | {rate:.0f} | +{p99 - direct[3]:.0f} µs |")


if __name__ == "__main__":
    main()
