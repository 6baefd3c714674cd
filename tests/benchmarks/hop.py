"""The hop, side by side with references, in one run: hits, passthrough and invalid IDs.

    python -m tests.benchmarks.hop [--seconds 5]

Needs `nginx` and `wrk` (Debian: nginx-light, wrk). nginx is the upstream (one
worker, a 55-byte JSON body); the same requests go straight to it, through nginx
as a keep-alive `proxy_pass` (one worker) and through `session-lens serve` (one
process). Invalid IDs are compared with a bare aiohttp handler returning the same
answer. Prints a markdown table of absolute figures and ratios.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.tools import require, wait_for, wrk
from tests.conftest import free_port

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    require("nginx", "wrk")
    work = Path(tempfile.mkdtemp())
    origin, nginx_proxy, lens, admin, bare = (free_port() for _ in range(5))
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
        for label, path in (("hits", HIT), ("passthrough", PASS)):
            figures = {
                name: (wrk(url + path, 32, args.seconds)[0], *wrk(url + path, 1, args.seconds)[1:])
                for name, url in targets.items()
            }
            nginx_rate = figures["nginx proxy_pass"][0]
            direct_p50 = figures["direct"][1]
            for name, (rate, p50, p99) in figures.items():
                rows.append(
                    f"| {label} | {name} | {rate:,.0f} | {rate / nginx_rate:.0%} |"
                    f" {p50:.0f} µs | {p99:.0f} µs | +{p50 - direct_p50:.0f} µs |"
                )
        wait_for(f"http://127.0.0.1:{bare}/")
        bare_rate = wrk(f"http://127.0.0.1:{bare}{INVALID}", 32, args.seconds)[0]
        lens_rate = wrk(f"http://127.0.0.1:{lens}{INVALID}", 32, args.seconds)[0]
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    print(
        "| requests | path | req/s at c=32 | of nginx | p50 at c=1 | p99 at c=1 | p50 over direct |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print("| invalid IDs | req/s at c=32 | of the bare handler |")
    print("|---|---:|---:|")
    print(f"| bare aiohttp handler | {bare_rate:,.0f} | 100% |")
    print(f"| session-lens | {lens_rate:,.0f} | {lens_rate / bare_rate:.0%} |")


if __name__ == "__main__":
    main()
