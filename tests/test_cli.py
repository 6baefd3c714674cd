"""The command line, run as a user runs it: in a subprocess."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .conftest import VALID_ID, Upstream, free_port, wait_until_healthy

CLI = [sys.executable, "-m", "session_lens"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_LENS_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=30, env={**environ, **(env or {})}
    )


def test_check_config_prints_effective_config_masked(tmp_path: Path) -> None:
    config = tmp_path / "lens.toml"
    config.write_text('upstream = "http://127.0.0.1:8000"\nvalidation = "observe"\n')
    result = run(
        "check-config",
        "--config",
        str(config),
        "--invalid-status",
        "422",
        env={"SESSION_LENS_DATABASE_URL": "postgresql://lens:hunter2@db:5432/lens"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hunter2" not in out
    assert 'database_url = "postgresql://lens:***@db:5432/lens"' in out
    assert f"# file {config}" in out
    assert "invalid_status = 422" in out and "# flag --invalid-status" in out
    assert 'validation = "observe"' in out


def test_config_errors_exit_2_with_one_line_each(tmp_path: Path) -> None:
    config = tmp_path / "lens.toml"
    config.write_text('upstream = "http://127.0.0.1:8000"\nlisen = "0.0.0.0:80"\n')
    result = run(
        "serve",
        "--config",
        str(config),
        "--listen",
        "localhost:http",
        env={"SESSION_LENS_SHUTDOWN_GRACE": "ten seconds"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert sorted(lines) == sorted(
        [
            f"session-lens: lisen: unknown setting; did you mean listen? (from file {config})",
            "session-lens: listen: 'localhost:http' is not host:port (e.g. 127.0.0.1:8080) "
            "(from flag --listen)",
            "session-lens: shutdown_grace: 'ten seconds' is not a duration (e.g. 500ms, 30s, 5m) "
            "(from env SESSION_LENS_SHUTDOWN_GRACE)",
        ]
    )
    assert "Traceback" not in result.stderr


def test_missing_config_file_and_missing_upstream(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "nope.toml"))  # fails before any database
    assert result.returncode == 2
    assert "No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("check-config")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "session-lens: upstream: is required: --upstream or SESSION_LENS_UPSTREAM (from nowhere)"
    )


def test_busy_port_is_a_clear_error(postgres_url: str) -> None:
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{free_port()}",
            "--database-url",
            postgres_url,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"session-lens: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stderr


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self, field: str = "VmRSS") -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        [line] = [line for line in status.splitlines() if line.startswith(field + ":")]
        return int(line.split()[1])


@asynccontextmanager
async def serving(upstream_url: str, database_url: str, *args: str) -> AsyncIterator[Served]:
    port, admin_port = free_port(), free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [
            *CLI,
            "serve",
            "--upstream",
            upstream_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--database-url",
            database_url,
            *args,
        ],
        stderr=subprocess.PIPE,
    )
    served = Served(process, port, admin_port)
    try:
        await wait_until_healthy(admin_port, process)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


async def test_sigterm_drains_the_request_in_flight(upstream: Upstream, db: str) -> None:
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(1.0)
        return web.json_response({"finished": True})

    upstream.respond = slow
    async with serving(upstream.url, db, "--shutdown-grace", "5s") as served:
        async with aiohttp.ClientSession() as client:
            pending = asyncio.create_task(client.get(f"{served.url}/api/sessions/{VALID_ID}"))
            await asyncio.wait_for(arrived.wait(), 10)
            served.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with client.get(f"http://127.0.0.1:{served.admin_port}/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["status"] == "draining"
            response = await asyncio.wait_for(pending, 10)
            assert response.status == 200
            assert await response.json() == {"finished": True}
            response.release()
        exit_code = await asyncio.to_thread(served.process.wait, 10)
        assert exit_code == 0
        assert served.process.stderr is not None
        log = served.process.stderr.read().decode()
        assert '"message": "shutting down"' in log
        assert '"message": "stopped"' in log
        assert "Traceback" not in log
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as client, client.get(served.url + "/"):
                pass


async def test_grace_period_bounds_the_shutdown(upstream: Upstream, db: str) -> None:
    arrived = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(30)
        return web.Response()

    upstream.respond = endless
    async with serving(upstream.url, db, "--shutdown-grace", "1s") as served:
        async with aiohttp.ClientSession() as client:
            pending = asyncio.create_task(client.get(f"{served.url}/endless"))
            await asyncio.wait_for(arrived.wait(), 10)
            started = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(served.process.wait, 10) == 0
            took = time.monotonic() - started
            with pytest.raises(aiohttp.ClientError):
                await pending
        assert 1.0 <= took < 3.0, f"shutdown took {took:.1f}s with a 1s grace period"
        assert served.process.stderr is not None
        log = served.process.stderr.read().decode()
        assert '"message": "grace period over", "cut_requests": 1' in log
        assert "Traceback" not in log


async def test_open_websockets_are_told_going_away(upstream: Upstream, db: str) -> None:
    upstream_saw: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def holds(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        upstream_saw.set_result(ws.close_code)
        return ws

    upstream.respond = holds
    async with serving(upstream.url, db, "--shutdown-grace", "5s") as served:
        async with aiohttp.ClientSession() as client, client.ws_connect(f"{served.url}/ws") as ws:
            served.process.send_signal(signal.SIGTERM)
            message = await asyncio.wait_for(ws.receive(), 5)
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert await asyncio.wait_for(upstream_saw, 5) == 1001
        assert await asyncio.to_thread(served.process.wait, 10) == 0


async def test_sigterm_with_nothing_in_flight_exits_at_once(upstream: Upstream, db: str) -> None:
    async with serving(upstream.url, db) as served:
        started = time.monotonic()
        served.process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(served.process.wait, 10) == 0
        assert time.monotonic() - started < 5


GIB = 1 << 30
CHUNK = b"\xa5" * (1 << 20)


async def test_one_gib_each_way_with_flat_memory(upstream: Upstream, db: str) -> None:
    received = 0

    async def sink_or_source(request: web.Request) -> web.StreamResponse:
        nonlocal received
        if request.method == "PUT":
            async for chunk in request.content.iter_any():
                received += len(chunk)
            return web.json_response({"received": received})
        response = web.StreamResponse(headers={"Content-Length": str(GIB)})
        await response.prepare(request)
        for _ in range(GIB // len(CHUNK)):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    upstream.respond = sink_or_source
    upstream.read_body = False

    async def produce() -> AsyncIterator[bytes]:
        for _ in range(GIB // len(CHUNK)):
            yield CHUNK

    async with serving(upstream.url, db) as served, aiohttp.ClientSession() as client:
        async with client.get(f"{served.url}/warm-up") as response:
            await response.read()
        baseline = served.rss_kib()
        async with client.put(
            f"{served.url}/upload", data=produce(), headers={"Content-Length": str(GIB)}
        ) as response:
            assert await response.json() == {"received": GIB}
        downloaded = 0
        async with client.get(f"{served.url}/download") as response:
            async for chunk in response.content.iter_any():
                downloaded += len(chunk)
        assert downloaded == GIB
        growth_mib = (served.rss_kib("VmHWM") - baseline) / 1024
        assert growth_mib <= 32, f"session-lens grew by {growth_mib:.1f} MiB"


def test_explain_prints_state_timeline_and_reason(db: str) -> None:
    async def setup() -> None:
        import asyncpg

        conn = await asyncpg.connect(db)
        await conn.execute(f"INSERT INTO sessions (id) VALUES ('{VALID_ID}')")
        await conn.execute(f"DELETE FROM sessions WHERE id = '{VALID_ID}'")
        await conn.close()

    asyncio.run(setup())
    result = run("explain", VALID_ID, "--database-url", db)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"session   {VALID_ID}"
    assert "state     (no row)" in lines
    assert "a miss now would be: purged" in lines
    assert any("(none) -> ACTIVE" in line and "sql by postgres" in line for line in lines)
    assert any("ACTIVE -> (none)" in line for line in lines)
    bad = run("explain", "exec_1", "--database-url", db)
    assert bad.returncode == 2
    assert "not a valid session ID (pattern)" in bad.stdout


def test_database_down_is_a_clear_error() -> None:
    result = run("migrate", "--database-url", "postgresql://lens:secret@127.0.0.1:1/x")
    assert result.returncode == 1
    assert result.stderr.startswith("session-lens: cannot connect to postgresql://lens:***@")
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_under_load_finishes_every_request(upstream: Upstream, db: str) -> None:
    arrived = 0
    all_in = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        nonlocal arrived
        arrived += 1
        if arrived == 40:
            all_in.set()
        await asyncio.sleep(0.5)
        return web.json_response({"n": request.path})

    upstream.respond = slow
    async with serving(upstream.url, db, "--shutdown-grace", "5s") as served:
        async with aiohttp.ClientSession() as client:

            async def one(n: int) -> int:
                async with client.get(f"{served.url}/load/{n}") as response:
                    assert await response.json() == {"n": f"/load/{n}"}
                    return response.status

            pending = [asyncio.create_task(one(n)) for n in range(40)]
            await asyncio.wait_for(all_in.wait(), 10)
            served.process.send_signal(signal.SIGTERM)
            assert await asyncio.gather(*pending) == [200] * 40
        assert await asyncio.to_thread(served.process.wait, 10) == 0


# --- hostile and mistaken input: one line, exit 2, nothing lost --------------------------


def test_a_file_that_is_not_utf8_is_blamed_on_its_line(tmp_path: Path) -> None:
    config = tmp_path / "lens.toml"
    config.write_bytes(
        b'upstream = "http://127.0.0.1:8000"\n# caf\xc3\xa9\nlisten = "\xc3\xa9\xff"\n'
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == (
        "session-lens: config: line 3, column 12: byte 0xff is not UTF-8, which TOML requires"
        f" (from file {config})\n"
    )


def test_nesting_too_deep_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("lifecycle_routes = " + "[" * 3000 + "]" * 3000 + "\n")
    result = run("check-config", "--upstream", "http://u:1", "--config", str(deep))
    assert (result.returncode, result.stderr) == (
        2,
        f"session-lens: config: arrays or tables nested too deep to be read (from file {deep})\n",
    )
    routes = "[" * 40_000 + "]" * 40_000
    result = run(
        "check-config", "--upstream", "http://u:1", env={"SESSION_LENS_LIFECYCLE_ROUTES": routes}
    )
    assert (result.returncode, result.stderr) == (
        2,
        "session-lens: lifecycle_routes: is nested too deep to be read"
        " (from env SESSION_LENS_LIFECYCLE_ROUTES)\n",
    )


def test_only_a_regular_file_of_reasonable_size_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes: an open without care would wait for ever
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)
    for path, env, complaint in [
        ("/dev/zero", {"SESSION_LENS_CONFIG": "/dev/zero"}, "is not a regular file"),
        (str(fifo), {"SESSION_LENS_CONFIG": str(fifo)}, "is not a regular file"),
        (str(big), {"SESSION_LENS_CONFIG": str(big)}, "is larger than 1MiB"),
    ]:
        started = time.monotonic()
        result = run("check-config", "--upstream", "http://u:1", env=env)
        assert time.monotonic() - started < 10
        assert result.returncode == 2
        assert result.stderr.startswith(f"session-lens: config: {complaint}")
        assert result.stderr.endswith(f" (from file {path})\n")
        assert result.stderr.count("\n") == 1


def test_settings_that_are_not_utf8_are_refused_before_anything_starts(tmp_path: Path) -> None:
    # os.environ and argv keep bytes that are not UTF-8 as surrogates.
    token = "a-long-enough-secret-\udcff"
    result = run(
        "check-config", "--upstream", "http://u:1", env={"SESSION_LENS_ADMIN_TOKEN": token}
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "session-lens: admin_token: is not a usable token: must be UTF-8 text, and character 22"
        " is not (from env SESSION_LENS_ADMIN_TOKEN)\n"
    )
    assert "a-long-enough" not in result.stderr
    started = time.monotonic()
    result = run(
        "serve", "--upstream", "http://u:1", "--data-dir", str(tmp_path / "data"),
        "--listen", "127.0.0.1:8\udcfe", env={"SESSION_LENS_ADMIN_TOKEN": token},
    )  # fmt: skip
    assert time.monotonic() - started < 10  # refused before the embedded PostgreSQL starts
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == [
        "session-lens: admin_token: is not a usable token: must be UTF-8 text, and character 22"
        " is not (from env SESSION_LENS_ADMIN_TOKEN)",
        "session-lens: listen: must be UTF-8 text, and character 12 is not (from flag --listen)",
    ]
    assert not (tmp_path / "data").exists()


def test_every_secret_parameter_of_the_database_url_is_masked() -> None:
    url = (
        "postgresql://lens:pw1@db/x?password=pw2&sslpassword=pw3&%70assword=pw4"
        "&sslkey=/etc/lens/key.pem&sslmode=verify-full"
    )
    result = run("check-config", "--upstream", "http://u:1", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert not any(secret in result.stdout for secret in ("pw1", "pw2", "pw3", "pw4"))
    assert (
        'database_url = "postgresql://lens:***@db/x?password=***&sslpassword=***&%70assword=***'
        '&sslkey=/etc/lens/key.pem&sslmode=verify-full"'
    ) in result.stdout


def test_a_mistyped_flag_or_setting_gets_a_did_you_mean(tmp_path: Path) -> None:
    for flags, line in [
        (["--listn", "127.0.0.1:1"], "--listn: unknown flag; did you mean --listen?"),
        # Abbreviations are not taken: this one used to be --upstream-read-timeout, silently.
        (["--upstream-read", "5s"], "--upstream-read: unknown flag; did you mean"
         " --upstream-read-timeout?"),
    ]:  # fmt: skip
        result = run("serve", "--upstream", "http://u:1", *flags)
        assert (result.returncode, result.stderr) == (
            2,
            f"session-lens serve: {line} (see session-lens serve --help)\n",
        )
    config = tmp_path / "lens.toml"
    config.write_text('upstream = "http://u:1"\nupstream_read_timout = "5s"\n')
    result = run("check-config", "--config", str(config))
    assert (result.returncode, result.stderr) == (
        2,
        "session-lens: upstream_read_timout: unknown setting; did you mean"
        f" upstream_read_timeout? (from file {config})\n",
    )


def test_a_near_miss_variable_is_warned_of_and_still_ignored() -> None:
    others = {  # what Kubernetes injects for a service named session-lens, and ours
        "SESSION_LENS_PORT": "tcp://10.0.0.1:8080",
        "SESSION_LENS_PORT_8080_TCP_ADDR": "10.0.0.1",
        "SESSION_LENS_SERVICE_HOST": "10.0.0.1",
        "SESSION_LENS_SERVICE_PORT": "8080",
        "SESSION_LENS_TEST_DATABASE_URL": "postgresql://x@db/x",  # this suite's own
    }
    result = run(
        "check-config",
        "--upstream",
        "http://u:1",
        env={**others, "SESSION_LENS_UPSTREAM_READ_TIMOUT": "5s"},
    )
    assert result.returncode == 0
    assert result.stderr == (
        "session-lens: warning: SESSION_LENS_UPSTREAM_READ_TIMOUT is not a setting, and is"
        " ignored; did you mean SESSION_LENS_UPSTREAM_READ_TIMEOUT?\n"
    )
    assert 'upstream_read_timeout = "1m"' in result.stdout


# --- serve: what it says at start and at a second signal ---------------------------------


async def test_an_unreachable_upstream_is_said_at_start_up(db: str) -> None:
    upstream = f"http://lens:hunter2@127.0.0.1:{free_port()}"  # nobody listens there
    async with serving(upstream, db) as served, aiohttp.ClientSession() as client:
        async with client.get(f"{served.url}/anything") as response:
            assert response.status == 502  # served all the same
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(served.process.wait, 10) == 0
        assert served.process.stderr is not None
        log = [json.loads(line) for line in served.process.stderr.read().decode().splitlines()]
    [warning] = [line for line in log if "upstream cannot be reached" in line["message"]]
    assert warning["level"] == "WARNING"
    assert warning["upstream"] == upstream.replace("hunter2", "***")
    assert "Connection refused" in warning["problem"]
    assert not any("hunter2" in json.dumps(line) for line in log)


async def wait_until_readyz(admin_port: int, status: str) -> None:
    """Wait for /readyz to say `status` (every worker listening, or draining)."""
    async with aiohttp.ClientSession() as client:
        while True:
            async with client.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                if (await ready.json())["status"] == status:
                    return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_second_ctrl_c_stops_at_once(upstream: Upstream, db: str, workers: str) -> None:
    arrived = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(60)
        return web.Response()

    upstream.respond = endless
    async with (
        serving(upstream.url, db, "--shutdown-grace", "60s", "--workers", workers) as served,
        aiohttp.ClientSession() as client,
    ):
        await asyncio.wait_for(wait_until_readyz(served.admin_port, "ready"), 20)
        pending = asyncio.create_task(client.get(f"{served.url}/endless"))
        await asyncio.wait_for(arrived.wait(), 10)
        served.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(wait_until_readyz(served.admin_port, "draining"), 10)
        started = time.monotonic()
        served.process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(served.process.wait, 10) == 0
        assert time.monotonic() - started < 5, "the second Ctrl-C waited for the grace period"
        with pytest.raises(aiohttp.ClientError):
            await pending
        assert served.process.stderr is not None
        log = served.process.stderr.read().decode()
    assert (
        '"message": "a second Ctrl-C or SIGTERM stops at once, cutting what is in flight",'
        ' "signal": "SIGINT"'
    ) in log
    assert '"message": "stopping at once"' in log
    assert "Traceback" not in log and '"level": "ERROR"' not in log


def test_the_commands_that_ask_questdb_take_its_pool_size() -> None:
    for command in ("serve", "explain", "triage", "check-config"):
        result = run(command, "--help")
        assert "--questdb-pool-size" in result.stdout, command
    assert "--questdb-pool-size" not in run("migrate", "--help").stdout
    result = run("explain", "--questdb-pool-size", "0", "exec_20260101_000000_0000000a")
    assert (result.returncode, result.stderr) == (
        2,
        "session-lens: questdb_pool_size: '0' is not a whole number from 1 to 64"
        " (from flag --questdb-pool-size)\n",
    )
    result = run("triage", "lookups.jsonl", env={"SESSION_LENS_QUESTDB_POOL_SIZE": "lots"})
    assert result.returncode == 2 and result.stderr == (
        "session-lens: questdb_pool_size: 'lots' is not a whole number from 1 to 64"
        " (from env SESSION_LENS_QUESTDB_POOL_SIZE)\n"
    )
