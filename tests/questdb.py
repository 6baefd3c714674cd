"""A real QuestDB server for the tests: the pinned jar, free loopback ports, a fresh data dir.

The jar is `org.questdb:questdb` at the version `.ci/questdb.env` pins, as `.ci/questdb-jar`
fetches it into the local Maven repository (or wherever SESSION_LENS_TEST_QUESTDB_JAR says).
One JVM at a time, with a small heap: the suite shares the machine.
"""

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
HEAP = "512m"
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned() -> dict[str, str]:
    """The version and SHA-256 `.ci/questdb.env` pins."""
    found: dict[str, str] = {}
    for line in (ROOT / ".ci" / "questdb.env").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#"):
            found[name.strip()] = value.strip()
    return found


def jar_path() -> Path | None:
    """The QuestDB jar: SESSION_LENS_TEST_QUESTDB_JAR, else the pinned one in ~/.m2."""
    given = os.environ.get("SESSION_LENS_TEST_QUESTDB_JAR")
    if given:
        return Path(given)
    version = pinned()["QUESTDB_VERSION"]
    repo = Path(os.environ.get("MAVEN_REPOSITORY", Path.home() / ".m2" / "repository"))
    jar = repo / "org" / "questdb" / "questdb" / version / f"questdb-{version}.jar"
    return jar if jar.is_file() else None


def missing() -> str | None:
    """Why QuestDB cannot be started here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (Debian: openjdk-17-jre-headless)"
    jar = jar_path()
    if jar is None or not jar.is_file():
        return "the QuestDB jar is not fetched: run .ci/questdb-jar"
    return None


@dataclass
class QuestDB:
    """A QuestDB server this process started; `stop` and `start` keep its data."""

    data_dir: Path
    pg_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: "subprocess.Popen[bytes] | None" = None
    settings: dict[str, str] = field(default_factory=dict)
    """More server settings, as QuestDB reads them from its environment (`QDB_...`)."""

    @property
    def url(self) -> str:
        """Its PostgreSQL wire endpoint."""
        return f"postgresql://admin:quest@127.0.0.1:{self.pg_port}/qdb"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Start the server and wait until it answers a query."""
        jar = jar_path()
        assert jar is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        environ = {
            **os.environ,
            "QDB_PG_NET_BIND_TO": f"127.0.0.1:{self.pg_port}",
            "QDB_HTTP_BIND_TO": f"127.0.0.1:{self.http_port}",
            "QDB_HTTP_MIN_ENABLED": "false",
            "QDB_LINE_TCP_ENABLED": "false",
            "QDB_LINE_UDP_ENABLED": "false",
            "QDB_TELEMETRY_ENABLED": "false",
            "QDB_SHARED_WORKER_COUNT": "1",
            # `ALTER TABLE ... SUSPEND WAL`, the fault the tests cause, needs dev mode.
            "QDB_DEV_MODE_ENABLED": "true",
            **self.settings,
        }
        command = ["java", f"-Xmx{HEAP}", "-cp", str(jar), "io.questdb.ServerMain"]
        log = (self.data_dir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [*command, "-d", str(self.data_dir)],
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        # Its own thread and loop: the caller may be a fixture set up while a loop runs.
        failed: list[BaseException] = []
        waiter = threading.Thread(target=self._wait, args=(failed,))
        waiter.start()
        waiter.join()
        if failed:
            self.stop()
            raise failed[0]

    def _wait(self, failed: list[BaseException]) -> None:
        try:
            asyncio.run(self._ready())
        except BaseException as exc:  # handed to the starting thread
            failed.append(exc)

    async def _ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"QuestDB exited; see {self.data_dir / 'server.log'}")
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError("QuestDB did not start in time") from None
                await asyncio.sleep(0.1)
                continue
            try:
                await conn.fetchval("SELECT 1")
                return
            finally:
                await conn.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s); its data stays."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None
