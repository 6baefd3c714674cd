"""Shared fixtures: real upstreams on loopback, the proxy in front, raw HTTP helpers."""

import asyncio
import fcntl
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from session_lens.app import LANE, create_proxy_app
from session_lens.config import load_config
from session_lens.embedded import start_embedded
from session_lens.explain import Breaker, Explainer
from session_lens.lane import HopSite
from session_lens.metrics import Metrics
from session_lens.migrations import migrate
from session_lens.recorder import Recorder, recorder_for
from session_lens.schema import Tables

from .questdb import QuestDB
from .questdb import missing as questdb_missing

VALID_ID = "exec_20251230_020944_4ad060d9"


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


Respond = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True, "path": request.path})


@dataclass
class Upstream:
    """A recording aiohttp upstream; tests swap `respond` to shape its answers."""

    respond: Respond = _ok
    seen: list[Seen] = field(default_factory=list)
    read_body: bool = True
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        body = await request.read() if self.read_body else b""
        self.seen.append(Seen(request.method, request.raw_path, headers, body))
        return await self.respond(request)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    recorder = Upstream()
    app = web.Application(
        client_max_size=1 << 30,
        # It records bytes as they arrive: no decompression on its side either.
        handler_args={"max_field_size": 65536, "max_line_size": 65536, "auto_decompress": False},
    )
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server: TestServer = await aiohttp_server(app)
    recorder.url = str(server.make_url("")).rstrip("/")
    return recorder


async def not_found(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": "session_not_found"}, status=404)


@pytest.fixture
async def missing(upstream: Upstream) -> Upstream:
    """An upstream that finds nothing, as the one in the story."""
    upstream.respond = not_found
    return upstream


@dataclass
class ProxyUnderTest:
    host: str
    port: int
    registry: CollectorRegistry
    recorder: Recorder | None = None
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


MakeProxy = Callable[..., Awaitable[ProxyUnderTest]]


def _spool_free(tmp_path: Path) -> Path:
    """`tmp_path`/spool, unless a proxy running in the test has it (a spool has one
    writer): then the first of spool-1, spool-2, ... that none has."""
    for index in itertools.count():
        spool = tmp_path / ("spool" if index == 0 else f"spool-{index}")
        spool.mkdir(exist_ok=True)
        fd = os.open(spool / "events.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        finally:
            os.close(fd)
        return spool
    raise AssertionError("unreachable")


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    """session-lens' proxy listener as `serve` runs it: the fast lane, then aiohttp."""
    runners: list[web.AppRunner] = []

    async def start(
        upstream_url: str, breaker: Breaker | None = None, **settings: Any
    ) -> ProxyUnderTest:
        settings.setdefault("spool_dir", str(_spool_free(tmp_path)))
        config = load_config(flags={"upstream": upstream_url, **settings})
        registry = CollectorRegistry()
        metrics = Metrics(registry, config.session_routes, config.exemplars)
        explainer = Explainer(config, metrics, config.database_url, breaker)
        recorder = recorder_for(config, metrics)
        app = create_proxy_app(config, metrics, explainer, recorder)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.25
        )
        await runner.setup()
        runners.append(runner)
        site = HopSite(runner, app[LANE], "127.0.0.1", 0)
        await site.start()
        return ProxyUnderTest("127.0.0.1", site.port, registry, recorder, runner)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def proxy(upstream: Upstream, make_proxy: MakeProxy) -> ProxyUnderTest:
    return await make_proxy(upstream.url)


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    """The body as it crossed the wire (chunk framing included, when chunked)."""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def content(self) -> bytes:
        """The body with chunk framing removed."""
        if "chunked" not in ",".join(self.header("Transfer-Encoding")).lower():
            return self.body
        out, rest = b"", self.body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return out
            out, rest = out + rest[:size], rest[size + 2 :]

    def json(self) -> Any:
        return json.loads(self.content)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    return RawResponse(int(status), reason, headers, body)  # type: ignore[arg-type]


async def raw_exchange(port: int, data: bytes, host: str = "127.0.0.1") -> RawResponse:
    """Send bytes as they are, read until the server closes, parse the first response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    return parse_response(received)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """A bare TCP upstream whose handler writes whatever bytes a test wants."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers a raw upstream received."""
    return await reader.readuntil(b"\r\n\r\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- PostgreSQL: the embedded server, or SESSION_LENS_TEST_DATABASE_URL -------------


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    given = os.environ.get("SESSION_LENS_TEST_DATABASE_URL")
    if given:
        return given
    return start_embedded(tmp_path_factory.mktemp("embedded"), delete_on_exit=True).url


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@pytest.fixture
async def empty_db(postgres_url: str) -> AsyncIterator[str]:
    """A fresh, empty database of its own for one test."""
    name = "sl_test_" + uuid.uuid4().hex[:16]
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(postgres_url, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


TRACKED_SINCE = datetime(2025, 1, 1, tzinfo=UTC)
"""The horizon of the `db` fixture: the suite's IDs (minted 2025-12-30) lie after it."""


async def track_since(conn: asyncpg.Connection, moment: datetime) -> None:
    """Set the tracking horizon, as if migration 001 had run at `moment`."""
    await conn.execute("UPDATE session_lens_tracking SET migrated_at = $1", moment)


@pytest.fixture
async def db(empty_db: str) -> str:
    """A fresh database with the lifecycle tables migrated in, tracked since 2025-01-01."""
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, Tables())
        await track_since(conn, TRACKED_SINCE)
    finally:
        await conn.close()
    return empty_db


@pytest.fixture
async def conn(db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db)
    yield connection
    await connection.close()


async def wait_until_healthy(admin_port: int, process: "subprocess.Popen[bytes]") -> None:
    """Wait for a `session-lens` process to answer /healthz; fail if it exits first."""
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as client:
        while True:
            try:
                async with client.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert process.poll() is None, "session-lens exited"
            assert time.monotonic() < deadline, "session-lens did not start"
            await asyncio.sleep(0.05)


def parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            found[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return found


# --- other servers as upstreams: nginx and gunicorn, each logging what it receives ---


@dataclass
class Origin:
    """A real HTTP server of another make, logging one line per request it received."""

    name: str
    url: str
    log: Path

    def requests(self) -> list[dict[str, Any]]:
        """What it logged: method, path and, by how much of it the server saw, the body."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


_NGINX_ORIGIN = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    log_format seen escape=json '{{"method": "$request_method", "path": "$request_uri",'
        ' "length": "$content_length", "request_length": $request_length}}';
    server {{
        listen 127.0.0.1:{port};
        access_log {dir}/seen.log seen;
        client_body_timeout 5s;
        client_max_body_size 0;
        location / {{ return 200 "nginx saw $request_method $request_uri\\n"; }}
    }}
}}
"""

_GUNICORN_APP = """\
import json
import os


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    seen = {"method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
            "body": body.decode("latin-1")}
    with open(os.environ["ORIGIN_LOG"], "a") as log:
        log.write(json.dumps(seen) + "\\n")
    answer = ("gunicorn saw %s %s\\n" % (seen["method"], seen["path"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(answer)))])
    return [answer]
"""


def need(tool: str, package: str) -> str:
    """The path of `tool`; without it the test is skipped, or fails in CI, which installs it."""
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; .ci/run installs it")
        pytest.skip(f"{tool} is not installed (Debian: {package})")
    return found


def _wait_for_port(port: int, process: "subprocess.Popen[bytes]") -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert process.poll() is None, f"{process.args[0]} exited"
            assert time.monotonic() < deadline, f"{process.args[0]} did not start"
            time.sleep(0.05)


@pytest.fixture(params=["nginx", "gunicorn"])
def origin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Origin]:
    """nginx, or gunicorn's pre-forking sync worker (timeout 5 s), each logging requests."""
    port = free_port()
    work = tmp_path / request.param
    work.mkdir()
    log = work / "seen.log"
    if request.param == "nginx":
        (work / "nginx.conf").write_text(_NGINX_ORIGIN.format(dir=work, port=port))
        command = [
            need("nginx", "nginx-light"),
            "-c",
            str(work / "nginx.conf"),
            "-g",
            "daemon off;",
        ]
        environ = dict(os.environ)
    else:
        (work / "origin_app.py").write_text(_GUNICORN_APP)
        command = [sys.executable, "-m", "gunicorn", "--chdir", str(work), "--workers", "1"]
        command += ["--timeout", "5", "--bind", f"127.0.0.1:{port}", "origin_app:app"]
        environ = {**os.environ, "ORIGIN_LOG": str(log)}
    process = subprocess.Popen(command, env=environ, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        yield Origin(request.param, f"http://127.0.0.1:{port}", log)
    finally:
        process.terminate()
        process.wait(10)


# --- a link to PostgreSQL that can be cut --------------------------------------------


class Forwarder:
    """A TCP relay to PostgreSQL that can be cut (live connections closed, new ones
    refused) or stalled (connections open, nothing passing, as to a frozen server) and
    restored, like a network link between one sidecar and the database."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        self._socket = f"{host}/.s.PGSQL.{parts.port or 5432}" if host.startswith("/") else None
        self._address = (host, parts.port or 5432)
        self._database_url = database_url
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.up = True
        self.cuts = 0
        self.connections = 0
        """Connections accepted so far."""

    async def start(self) -> str:
        """Listen on loopback; the database URL through this link."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._database_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc, query=""))

    def cut(self) -> None:
        self.up = False
        self.cuts += 1
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def stall(self) -> None:
        self._flowing.clear()

    def stall_open_ones(self) -> None:
        """Stall the connections open now; new ones flow (a pool's connection gone dead)."""
        self._flowing.clear()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def restore(self) -> None:
        self.up = True
        self._flowing.set()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if not self.up:
            writer.transport.abort()
            return
        try:
            if self._socket is not None:
                far_reader, far_writer = await asyncio.open_unix_connection(self._socket)
            else:
                far_reader, far_writer = await asyncio.open_connection(*self._address)
        except OSError:
            writer.transport.abort()
            return
        if not self.up:  # cut while connecting
            far_writer.transport.abort()
            writer.transport.abort()
            return
        self._links |= {writer, far_writer}
        flowing = self._flowing
        await asyncio.gather(_pump(reader, far_writer, flowing), _pump(far_reader, writer, flowing))
        self._links -= {writer, far_writer}


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    try:
        while data := await reader.read(65536):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


@pytest.fixture
async def forwarders(db: str) -> AsyncIterator[list[Forwarder]]:
    made: list[Forwarder] = []
    yield made
    for forwarder in made:
        await forwarder.close()


async def link(forwarders: list[Forwarder], db: str) -> tuple[Forwarder, str]:
    forwarder = Forwarder(db)
    forwarders.append(forwarder)
    return forwarder, await forwarder.start()


# --- QuestDB: the pinned server jar, started once for the session --------------------


@pytest.fixture(scope="session")
def questdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuestDB]:
    """A real QuestDB on free loopback ports with a fresh data directory."""
    why = questdb_missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run fetches it")
        pytest.skip(why)
    server = QuestDB(tmp_path_factory.mktemp("questdb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
