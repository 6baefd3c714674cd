"""Many sidecars, one truth: several recorders of one store, links cut, events in any order.

Each store ends where each session's history ends in time, whichever recorder
brought each event and whenever its link to the database let it.
"""

import asyncio
import itertools
import json
import os
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client import CollectorRegistry

from session_lens.app import create_admin_app
from session_lens.config import load_config
from session_lens.explain import Explainer
from session_lens.metrics import Metrics
from session_lens.recorder import Event, Recorder
from session_lens.routes import TARGET_STATE, Action

from .conftest import Forwarder, Upstream, link, parents
from .test_observed import SessionService
from .test_ordering import Recorders
from .test_outage import Lens

SEED = int(os.environ.get("SESSION_LENS_MANY_SEED", "20261130"))
"""Fixed, so a run is reproducible; set SESSION_LENS_MANY_SEED to explore others."""
CHANGES = (Action.PAUSE, Action.RESUME, Action.STOP, Action.DELETE, Action.RESTORE,
           Action.ARCHIVE, Action.PURGE)  # fmt: skip


async def metric(admin_port: int, name: str, **labels: str) -> float:
    """A metric summed over its series (and over workers) that carry `labels`."""
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        text = await response.text()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
        and all(label in line.partition(" ")[0] for label in wanted)
    )


async def until(condition: Any, what: str, seconds: float = 30) -> None:
    """Poll an async condition until it holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds:g} s"
        await asyncio.sleep(0.05)


# --- the scenario, with processes ---------------------------------------------


async def test_a_creation_spooled_behind_a_cut_link_does_not_undo_a_delete(
    upstream: Upstream, db: str, tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    upstream.respond = SessionService().handle
    link_a, through_a = await link(forwarders, db)
    a = Lens(upstream.url, through_a, tmp_path / "spool-a")
    b = Lens(upstream.url, db, tmp_path / "spool-b")
    await a.start()
    await b.start()
    conn = await asyncpg.connect(db)
    sid = "exec_20251230_020944_4ad060d9"
    try:
        async with aiohttp.ClientSession() as client:

            async def call(lens: Lens, method: str, path: str, **kwargs: Any) -> int:
                url = f"http://127.0.0.1:{lens.port}{path}"
                async with client.request(method, url, **kwargs) as response:
                    await response.read()
                    return response.status

            link_a.cut()
            assert await call(a, "POST", "/api/sessions", json={"id": sid}) == 201
            await until(lambda: spooled(a, 1), "A spools the creation")
            assert await conn.fetchval("SELECT count(*) FROM session_lens_events") == 0

            assert await call(b, "POST", f"/api/sessions/{sid}/stop") == 200
            assert await call(b, "DELETE", f"/api/sessions/{sid}") == 200
            await until(lambda: spooled(b, 0), "B writes at once")
            assert await conn.fetchval("SELECT state FROM sessions WHERE id = $1", sid) == "DELETED"

            link_a.restore()
            await until(lambda: spooled(a, 0), "A replays the creation")
            row = await conn.fetchrow("SELECT state, created_at FROM sessions WHERE id = $1", sid)
            trail = await conn.fetch(
                "SELECT new_state, trigger FROM session_audit WHERE session_id = $1"
                " ORDER BY occurred_at, id",
                sid,
            )
            assert row["state"] == "DELETED"
            assert [tuple(entry) for entry in trail] == [
                ("ACTIVE", "observed"),
                ("STOPPED", "observed"),
                ("DELETED", "observed"),
            ]
            assert row["created_at"] == await conn.fetchval(
                "SELECT min(occurred_at) FROM session_lens_events WHERE session_id = $1", sid
            )
            for lens in (a, b):
                async with client.get(f"http://127.0.0.1:{lens.port}/api/sessions/{sid}") as got:
                    assert got.status == 404
                    assert got.headers["X-Session-Not-Found-Reason"] == "deleted"
            late = await metric(
                a.admin, "session_lens_lifecycle_events_total", action="create", result="late"
            )
            assert late == 1
    finally:
        await conn.close()
        # Off the loop: A flushes through the forwarder, which this loop runs.
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))


async def spooled(lens: Lens, count: int) -> bool:
    return await metric(lens.admin, "session_lens_spooled_events") == count


# --- a randomised fleet of in-process recorders -----------------------------------------


@dataclass
class History:
    """One session's events, in the order they happened."""

    session_id: str
    events: list[Event] = field(default_factory=list)

    def expected_state(self) -> str | None:
        last = self.events[-1]
        target = TARGET_STATE[last.action]
        return target.value if target is not None and last.ok else None


def histories(rng: random.Random, sessions: int, start: float) -> list[History]:
    """Random histories over every action, legal in the model or not."""
    made = []
    for n in range(sessions):
        history = History(f"exec_20260301_120000_{n:08x}")
        at = start + rng.uniform(0, 60)
        if rng.random() < 0.05:
            steps = [(Action.CREATE, False)]
        else:
            steps = [(Action.CREATE, True)]
            steps += [(rng.choice(CHANGES), True) for _ in range(rng.randint(0, 9))]
        for k, (action, ok) in enumerate(steps):
            event_id = uuid.UUID(int=rng.getrandbits(128)).hex
            history.events.append(Event(event_id, history.session_id, action, ok, at, f"{n}.{k}"))
            at += rng.randint(1, 5000) / 1000  # whole milliseconds: distinct in PostgreSQL
        made.append(history)
    return made


async def test_a_fleet_of_recorders_with_flapping_links_ends_where_each_history_ends(
    db: str, tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    rng = random.Random(SEED)
    why = f"SESSION_LENS_MANY_SEED={SEED}"
    print(why)  # shown with any failure, a timeout included
    start = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    stories = histories(rng, 2000, start)
    fleet = Recorders(db, tmp_path)
    links = []
    for _ in range(4):
        forwarder, url = await link(forwarders, db)
        links.append(forwarder)
        await fleet.start(url)
    recorders: list[Recorder] = fleet.started
    arrivals = [(event, rng.randrange(len(recorders))) for h in stories for event in h.events]
    rng.shuffle(arrivals)
    total = len(arrivals)

    sending = True

    async def flap() -> None:
        flapper = random.Random(SEED + 1)
        while sending:
            await asyncio.sleep(flapper.uniform(0.02, 0.3))
            forwarder = flapper.choice(links)
            forwarder.restore() if not forwarder.up else forwarder.cut()

    flapping = asyncio.create_task(flap())
    try:
        for offset in range(0, total, 25):  # a few seconds of traffic while links flap
            for event, which in arrivals[offset : offset + 25]:
                recorders[which].record(event)
            await asyncio.sleep(0.01)
    finally:
        sending = False
        await flapping
    assert sum(forwarder.cuts for forwarder in links) > 5, why
    for forwarder in links:
        forwarder.restore()
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(recorder.drained() for recorder in recorders))
    finally:
        for recorder in recorders:
            await recorder.stop()
        fleet.started.clear()

    conn = await asyncpg.connect(db)
    try:
        states = dict(await conn.fetch("SELECT id, state FROM sessions"))
        created = dict(await conn.fetch("SELECT id, created_at FROM sessions"))
        trails: dict[str, list[str]] = defaultdict(list)
        for entry in await conn.fetch(
            "SELECT session_id, reason, trigger FROM session_audit ORDER BY occurred_at, id"
        ):
            assert entry["trigger"] == "observed", why
            trails[entry["session_id"]].append(entry["reason"])
        dead_deleted = await conn.fetchval(
            "SELECT count(*) FROM sessions WHERE state = 'DELETED' AND deleted_at IS NULL"
        )
        events = await conn.fetchval("SELECT count(*) FROM session_lens_events")
    finally:
        await conn.close()
    assert events == total, why
    wrong_state = [
        (h.session_id, states.get(h.session_id), h.expected_state())
        for h in stories
        if states.get(h.session_id) != h.expected_state()
    ]
    assert wrong_state == [], why
    wrong_trail = [
        h.session_id
        for h in stories
        if trails[h.session_id] != [f"request {e.request_id}" for e in h.events]
    ]
    assert wrong_trail == [], why
    wrong_creation = [
        h.session_id
        for h in stories
        if h.session_id in created
        and all(e.action is not Action.PURGE for e in h.events)
        and created[h.session_id] != datetime.fromtimestamp(h.events[0].at, UTC)
    ]
    assert wrong_creation == [], why
    assert dead_deleted == 0, why
    assert fleet.count("late") > 0, why


# --- two workers behind one port ---------------------------------------------------------


def worker_of(proxy_port: int, client_port: int, workers: set[int]) -> int | None:
    """The worker process holding the proxy's end of one client connection."""
    target = f":{proxy_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(target) and fields[2].endswith(f":{client_port:04X}"):
            inode = fields[9]
    if inode is None:
        return None
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


class Slot:
    """One kept-alive client connection (opened again if the proxy closes it) and its worker."""

    def __init__(self, proxy_port: int, workers: set[int]) -> None:
        self._proxy_port = proxy_port
        self._workers = workers
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._owner: int | None = None
        self._turn = asyncio.Lock()

    async def request(self, method: str, path: str, request_id: str, body: bytes = b"") -> int:
        """Send one request and wait for its answer; the worker that took it."""
        async with self._turn:  # one request at a time on a connection
            return await self._exchange(method, path, request_id, body)

    async def _exchange(self, method: str, path: str, request_id: str, body: bytes) -> int:
        if self._stream is None:
            self._stream = await asyncio.open_connection("127.0.0.1", self._proxy_port)
            self._owner = None
        reader, writer = self._stream
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: lens\r\nX-Request-ID: {request_id}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
        }
        if "content-length" in fields:
            await reader.readexactly(int(fields["content-length"]))
        else:
            assert fields.get("transfer-encoding") == "chunked", head
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        assert status < 300 or method == "GET", (method, path, status)
        if self._owner is None:
            port = writer.get_extra_info("sockname")[1]
            self._owner = worker_of(self._proxy_port, port, self._workers)
        owner = self._owner
        if fields.get("connection", "").lower() == "close":
            self.close()
        assert owner is not None
        return owner

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None


async def test_two_workers_record_one_history_in_time_order(
    upstream: Upstream, db: str, tmp_path: Path
) -> None:
    upstream.respond = SessionService().handle
    rng = random.Random(SEED)
    why = f"SESSION_LENS_MANY_SEED={SEED}"
    print(why)
    lens = Lens(upstream.url, db, tmp_path / "spool")
    lens.args += ["--workers", "2"]
    await lens.start()
    assert lens.process is not None
    slots: list[Slot] = []
    try:
        supervisor = lens.process.pid
        workers: set[int] = set()
        deadline = time.monotonic() + 20
        while len(workers) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            workers = {
                child
                for child, parent in parents().items()
                if parent == supervisor and b"spawn_main" in _cmdline(child)
            }
            await asyncio.sleep(0.05)
        # Connections until each worker holds three: consecutive events alternate between them.
        by_worker: dict[int, list[Slot]] = defaultdict(list)
        while min(len(by_worker[pid]) for pid in workers) < 3:
            assert time.monotonic() < deadline, "the kernel gave every connection to one worker"
            slot = Slot(lens.port, workers)
            slots.append(slot)
            try:
                owner = await slot.request("GET", "/ping", "warm-up")
            except ConnectionRefusedError:  # no worker listens yet
                await asyncio.sleep(0.05)
                continue
            assert owner in workers
            by_worker[owner].append(slot)
            await asyncio.sleep(0.01)
        sides = [by_worker[pid] for pid in sorted(workers)]

        plans: list[list[str]] = []
        for _ in range(240):
            plan = ["create"] + [
                rng.choice(["pause", "resume", "stop", "delete", "restore", "archive"])
                for _ in range(rng.randint(2, 6))
            ]
            plans.append(plan)
        taken: dict[int, list[int]] = defaultdict(list)

        async def run(n: int) -> None:
            sid = f"exec_20251230_020944_{n:08x}"
            side = n % 2
            for k, action in enumerate(plans[n]):
                slot = rng.choice(sides[(side + k) % 2])
                request_id = f"{n}.{k}"
                if action == "create":
                    body = json.dumps({"id": sid}).encode()
                    owner = await slot.request("POST", "/api/sessions", request_id, body)
                elif action == "delete":
                    owner = await slot.request("DELETE", f"/api/sessions/{sid}", request_id)
                else:
                    owner = await slot.request("POST", f"/api/sessions/{sid}/{action}", request_id)
                taken[n].append(owner)

        pending = list(range(len(plans)))

        async def client() -> None:
            while pending:
                await run(pending.pop())

        await asyncio.gather(*(client() for _ in range(12)))
        total = sum(len(plan) for plan in plans)
        conn = await asyncpg.connect(db)
        try:

            async def settled() -> bool:
                written = await conn.fetchval("SELECT count(*) FROM session_lens_events")
                return written == total and await spooled_in(lens) == 0

            await until(settled, "both workers' spools drain")
            states = dict(await conn.fetch("SELECT id, state FROM sessions"))
            trails: dict[str, list[str]] = defaultdict(list)
            for entry in await conn.fetch(
                "SELECT session_id, reason FROM session_audit ORDER BY occurred_at, id"
            ):
                trails[entry["session_id"]].append(entry["reason"])
        finally:
            await conn.close()

        late = await metric(lens.admin, "session_lens_lifecycle_events_total", result="late")
        switches = sum(a != b for owners in taken.values() for a, b in itertools.pairwise(owners))
        pairs = sum(len(owners) - 1 for owners in taken.values())
        assert switches >= 0.9 * pairs, (switches, pairs)
        target = {a.value: (t.value if t else None) for a, t in TARGET_STATE.items()}
        for n, plan in enumerate(plans):
            sid = f"exec_20251230_020944_{n:08x}"
            assert states.get(sid) == target[plan[-1]], (sid, plan, why)
            assert trails[sid] == [f"request {n}.{k}" for k in range(len(plan))], (sid, why)
        assert late > 0, "no event overtook another: nothing was shown"
    finally:
        for slot in slots:
            slot.close()
        lens.stop()


async def spooled_in(lens: Lens) -> float:
    return await metric(lens.admin, "session_lens_spooled_events")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_readyz_says_what_is_true_now_once_the_database_is_back(
    forwarders: list[Forwarder], db: str, tmp_path: Path, aiohttp_client: Any
) -> None:
    forwarder, dsn = await link(forwarders, db)
    made = Recorders(dsn, tmp_path)
    recorder = await made.start()
    config = load_config(flags={"upstream": "http://127.0.0.1:1"})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), None)
    admin = await aiohttp_client(
        create_admin_app(config, CollectorRegistry(), explainer, recorder=recorder)
    )

    async def recorder_check() -> str:
        response = await admin.get("/readyz")
        return str((await response.json())["checks"]["recorder"])

    try:
        forwarder.cut()
        for n in range(20):
            recorder.record(Event.new(f"exec_20251230_020944_{n:08x}", Action.CREATE, "r"))
        await asyncio.sleep(8)  # long enough for the writer's back-off to reach its longest
        assert (await recorder_check()).startswith("spooling 20 events")
        forwarder.restore()
        said = await recorder_check()
        assert "spooling" not in said, f"said {said!r} with the database back"
        await asyncio.wait_for(recorder.drained(), 10)
        assert await recorder_check() == "ok"
    finally:
        await recorder.stop()


async def test_readyz_answers_within_seconds_when_the_database_stops_answering(
    forwarders: list[Forwarder], db: str, tmp_path: Path, aiohttp_client: Any
) -> None:
    # A link that goes silent (a frozen database, a network that drops packets): the
    # probe's query is given up after a second, and giving it up must not wait on the
    # silent link for the server to confirm a cancel.
    forwarder, dsn = await link(forwarders, db)
    made = Recorders(dsn, tmp_path)
    recorder = await made.start()
    config = load_config(flags={"upstream": "http://127.0.0.1:1", "database_url": dsn})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), dsn)
    await explainer.open()
    admin = await aiohttp_client(
        create_admin_app(config, CollectorRegistry(), explainer, recorder=recorder)
    )

    async def checks() -> tuple[float, dict[str, str]]:
        started = time.monotonic()
        response = await admin.get("/readyz")
        return time.monotonic() - started, (await response.json())["checks"]

    try:
        _, said = await checks()
        assert said["database"] == "ok", said
        forwarder.stall()
        for _ in range(3):
            took, said = await checks()
            assert took < 3, f"/readyz took {took:.1f} s"
            assert said["database"].startswith("down: no answer within"), said
    finally:
        forwarder.restore()
        await recorder.stop()
        await explainer.close()
