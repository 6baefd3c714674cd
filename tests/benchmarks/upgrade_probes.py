"""The upgrade probes of tests/test_hostile.py, counted rather than asserted.

    python -m tests.benchmarks.upgrade_probes          # this checkout
    PYTHONPATH=OTHER/src python -m tests.benchmarks.upgrade_probes   # another one

Each probe goes through a proxy of the session_lens found first on the path, in front
of nginx and of gunicorn (one sync worker, 5 s timeout), each started afresh. Prints a
markdown table: the answers the client read within 6 s, the requests the upstream
logged, and what they were.
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

import session_lens
from session_lens.app import LANE, create_proxy_app
from session_lens.config import load_config
from session_lens.lane import HopSite
from session_lens.metrics import Metrics
from tests.conftest import _GUNICORN_APP, _NGINX_ORIGIN, _wait_for_port, free_port
from tests.test_hostile import UPGRADE_PROBES, _send_and_listen


def _answers(data: bytes) -> int:
    count = 0
    while data.startswith(b"HTTP/1."):
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        count += 1
        data = rest[length:]
    return count


def _origin(name: str, work: Path, port: int) -> "subprocess.Popen[bytes]":
    if name == "nginx":
        (work / "nginx.conf").write_text(_NGINX_ORIGIN.format(dir=work, port=port))
        command = ["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]
        environ = dict(os.environ)
    else:
        (work / "origin_app.py").write_text(_GUNICORN_APP)
        command = [sys.executable, "-m", "gunicorn", "--chdir", str(work), "--workers", "1"]
        command += ["--timeout", "5", "--bind", f"127.0.0.1:{port}", "origin_app:app"]
        environ = {**os.environ, "ORIGIN_LOG": str(work / "seen.log")}
    process = subprocess.Popen(command, env=environ, stderr=subprocess.DEVNULL)
    _wait_for_port(port, process)
    return process


async def _probe(name: str, data: bytes) -> tuple[int, list[str]]:
    work = Path(tempfile.mkdtemp())
    port = free_port()
    process = _origin(name, work, port)
    config = load_config(
        flags={"upstream": f"http://127.0.0.1:{port}", "spool_dir": str(work / "spool")}
    )
    app = create_proxy_app(config, Metrics(CollectorRegistry(), config.session_routes))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.25)
    await runner.setup()
    site = HopSite(runner, app[LANE], "127.0.0.1", 0)
    await site.start()
    try:
        received = await _send_and_listen(site.port, data, quiet=6.0)
        await asyncio.sleep(6)  # gunicorn's timeout passes; nginx logs what it finished
    finally:
        await runner.cleanup()
        process.terminate()
        process.wait()
    log = work / "seen.log"
    seen = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    said = [
        f"{s['method'] or '(none)'} {s['path'] or ''}".strip()
        + (f", body {len(s['body'])} B" if "body" in s else f", {s['request_length']} B read")
        for s in seen
    ]
    return _answers(received), said


async def main() -> None:
    print(f"session_lens from {Path(session_lens.__file__).parent}\n")
    print("| upstream | probe | answers | requests seen | what the upstream saw |")
    print("|---|---|---:|---:|---|")
    for name in ("nginx", "gunicorn"):
        for probe, data in UPGRADE_PROBES.items():
            answers, said = await _probe(name, data)
            print(f"| {name} | {probe} | {answers} | {len(said)} | {'; '.join(said)} |")


if __name__ == "__main__":
    asyncio.run(main())
