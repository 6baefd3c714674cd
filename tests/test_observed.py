"""Lifecycle recorded from observed traffic, for upstreams whose store cannot be reached."""

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from session_lens.config import load_config
from session_lens.metrics import Metrics
from session_lens.recorder import Event, Recorder, SpoolError, spooled
from session_lens.routes import Action

from .conftest import MakeProxy, ProxyUnderTest, Upstream, raw_exchange

SID = "exec_20251230_020944_4ad060d9"
PURGING = json.dumps(
    [
        {"method": "POST", "path": "/api/sessions", "action": "create", "id_from": "response:/id"},
        {"method": "POST", "path": "/api/sessions/{session_id}/stop", "action": "stop"},
        {"method": "DELETE", "path": "/api/sessions/{session_id}", "action": "purge"},
    ]
)


def minted(moment: datetime, suffix: str = "0000000f") -> str:
    """A session ID minted at `moment` (UTC)."""
    return f"exec_{moment:%Y%m%d_%H%M%S}_{suffix}"


class SessionService:
    """A REST session service in memory; `fail_creates` answers creations with a 503."""

    def __init__(self) -> None:
        self.fail_creates = False
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        parts = request.path.strip("/").split("/")  # api, sessions, [id, [action]]
        if request.method == "POST" and len(parts) == 2:
            raw = await request.read()
            body = json.loads(raw) if raw else {}
            session_id = body.get("id", SID)
            if self.fail_creates:
                return web.json_response({"id": session_id, "error": "disk full"}, status=503)
            return web.json_response(
                {"id": session_id}, status=201, headers={"Location": f"/api/sessions/{session_id}"}
            )
        if request.method in ("POST", "DELETE") and len(parts) >= 3:
            return web.json_response({"id": parts[2], "done": parts[3:] or ["delete"]})
        return web.json_response({"error": "session_not_found"}, status=404)


@pytest.fixture
async def service(upstream: Upstream) -> SessionService:
    fake = SessionService()
    upstream.respond = fake.handle
    return fake


async def call(proxy: ProxyUnderTest, method: str, path: str, **kwargs: Any) -> int:
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, proxy.url + path, **kwargs) as response,
    ):
        await response.read()
        return response.status


async def settled(proxy: ProxyUnderTest) -> None:
    assert proxy.recorder is not None
    await asyncio.wait_for(proxy.recorder.drained(), 10)


async def timeline(conn: asyncpg.Connection, session_id: str = SID) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT old_state, new_state, trigger FROM session_audit WHERE session_id = $1 ORDER BY id",
        session_id,
    )
    return [tuple(row) for row in rows]


async def test_every_action_is_recorded(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    assert await call(proxy, "POST", "/api/sessions", json={"id": SID}) == 201
    for action in ("pause", "resume", "stop"):
        assert await call(proxy, "POST", f"/api/sessions/{SID}/{action}") == 200
    assert await call(proxy, "DELETE", f"/api/sessions/{SID}") == 200
    for action in ("restore", "archive"):
        assert await call(proxy, "POST", f"/api/sessions/{SID}/{action}") == 200
    await settled(proxy)
    assert await timeline(conn) == [
        (None, "ACTIVE", "observed"),
        ("ACTIVE", "PAUSED", "observed"),
        ("PAUSED", "ACTIVE", "observed"),
        ("ACTIVE", "STOPPED", "observed"),
        ("STOPPED", "DELETED", "observed"),
        ("DELETED", "STOPPED", "observed"),
        ("STOPPED", "ARCHIVED", "observed"),
    ]
    assert (
        proxy.metric("session_lens_lifecycle_events_total", action="create", result="recorded") == 1
    )
    assert proxy.metric("session_lens_requests_total", kind="lifecycle", code="2xx") == 7
    assert await conn.fetchval("SELECT count(*) FROM session_lens_events") == 7


async def test_lifecycle_routes_match_a_path_in_another_spelling(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    assert await call(proxy, "POST", "/api/sessions", json={"id": SID}) == 201
    for head in (f"POST //api/sessions/{SID}/stop", f"DELETE /api/x/../sessions/{SID}"):
        request = f"{head} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        assert (await raw_exchange(proxy.port, request.encode())).status == 200
    await settled(proxy)
    assert await timeline(conn) == [
        (None, "ACTIVE", "observed"),
        ("ACTIVE", "STOPPED", "observed"),
        ("STOPPED", "DELETED", "observed"),
    ]
    sent = [seen.raw_path for seen in upstream.seen]
    assert sent[1:] == [f"//api/sessions/{SID}/stop", f"/api/x/../sessions/{SID}"]  # as sent


async def test_an_event_is_timed_before_its_answer_goes_back(
    upstream: Upstream, make_proxy: MakeProxy, db: str, conn: asyncpg.Connection
) -> None:
    """Causality: an answer whose body (with the ID) comes late is timed at its head, so
    that what the client does after seeing it sorts after it."""

    async def slow_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=201, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await asyncio.sleep(0.5)
        await response.write(json.dumps({"id": SID}).encode())
        return response

    upstream.respond = slow_body
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    async with (
        aiohttp.ClientSession() as client,
        client.post(proxy.url + "/api/sessions") as response,
    ):
        headed = datetime.now(UTC)
        await response.read()
    await settled(proxy)
    occurred = await conn.fetchval(
        "SELECT occurred_at FROM session_audit WHERE session_id = $1", SID
    )
    assert occurred <= headed, (occurred, headed)


async def test_lifecycle_requests_reuse_the_upstream_connection(
    upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    """Each lifecycle request used to take a kept-alive connection and leave it open,
    unused, opening a new one for itself."""
    ports: set[int] = set()

    async def answer(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.add(request.transport.get_extra_info("peername")[1])
        return web.json_response({"done": True})

    upstream.respond = answer
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    async with aiohttp.ClientSession() as client:
        for n in range(20):
            session_id = f"exec_20251230_020944_{n:08x}"
            async with client.post(f"{proxy.url}/api/sessions/{session_id}/pause") as response:
                assert response.status == 200
    assert len(ports) <= 2, f"{len(ports)} upstream connections for 20 sequential requests"
    await settled(proxy)


async def test_the_readmes_service_of_another_shape(
    upstream: Upstream, make_proxy: MakeProxy, db: str, conn: asyncpg.Connection
) -> None:
    """The README's worked example, as written there."""

    async def v2(request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/v2/exec":
            return web.json_response({"data": {"exec_id": SID}}, status=201)
        if request.method in ("POST", "DELETE"):
            return web.json_response({"ok": True})
        return web.json_response({"error": "not found"}, status=404)

    upstream.respond = v2
    routes = json.dumps(
        [
            {"method": "POST", "path": "/v2/exec", "action": "create",
             "id_from": "response:/data/exec_id"},
            {"method": "POST", "path": "/v2/exec/{session_id}:stop", "action": "stop",
             "id_from": "path"},
            {"method": "DELETE", "path": "/v2/exec/{session_id}", "action": "delete",
             "id_from": "path"},
        ]
    )  # fmt: skip
    proxy = await make_proxy(
        upstream.url,
        database_url=db,
        session_routes="/v2/exec/{session_id}",
        lifecycle_source="observed",
        lifecycle_routes=routes,
    )
    assert await call(proxy, "POST", "/v2/exec") == 201
    assert await call(proxy, "POST", f"/v2/exec/{SID}:stop") == 200
    assert await call(proxy, "DELETE", f"/v2/exec/{SID}") == 200
    await settled(proxy)
    assert await timeline(conn) == [
        (None, "ACTIVE", "observed"),
        ("ACTIVE", "STOPPED", "observed"),
        ("STOPPED", "DELETED", "observed"),
    ]
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/v2/exec/{SID}") as response,
    ):
        assert response.headers["X-Session-Not-Found-Reason"] == "deleted"


async def test_misses_are_classified_from_observed_tables(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str
) -> None:
    proxy = await make_proxy(
        upstream.url,
        database_url=db,
        lifecycle_source="observed",
        lifecycle_routes=PURGING,
        visibility_window="500ms",
    )
    deleted, purged, failed, old = (f"exec_20251230_020944_0000000{n}" for n in range(4))
    # Minted after recording began (the IDs name whole seconds: a little ahead), and
    # looked up once older than the visibility window (younger, it may be in flight).
    ahead = datetime.now(UTC) + timedelta(seconds=1)
    never = minted(ahead)
    for session_id in (deleted, purged):
        await call(proxy, "POST", "/api/sessions", json={"id": session_id})
        await call(proxy, "POST", f"/api/sessions/{session_id}/stop")
    await call(proxy, "DELETE", f"/api/sessions/{purged}")
    service.fail_creates = True
    assert await call(proxy, "POST", "/api/sessions", json={"id": failed}) == 503
    await settled(proxy)

    # DELETE is a purge here, so `deleted` is deleted with SQL as an operator would.
    writer = await asyncpg.connect(db)
    await writer.execute("UPDATE sessions SET state = 'DELETED' WHERE id = $1", deleted)
    await writer.close()

    await asyncio.sleep((ahead.replace(microsecond=0) - datetime.now(UTC)).total_seconds() + 0.6)
    reasons = {}
    async with aiohttp.ClientSession() as client:
        for session_id in (deleted, purged, failed, old, never):
            async with client.get(f"{proxy.url}/api/sessions/{session_id}") as response:
                reasons[session_id] = response.headers["X-Session-Not-Found-Reason"]
    assert reasons == {
        deleted: "deleted",
        purged: "purged",
        failed: "creation_failed",
        old: "predates_tracking",  # minted before this recorder began: no evidence either way
        never: "never_existed",
    }
    assert (
        proxy.metric(
            "session_lens_lifecycle_events_total", action="create", result="creation_failed"
        )
        == 1
    )


async def test_ids_from_request_body_and_location(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    routes = json.dumps(
        [
            {"method": "POST", "path": "/api/sessions", "action": "create",
             "id_from": "request:/id"},
            {"method": "POST", "path": "/v2/sessions", "action": "create", "id_from": "location"},
        ]
    )  # fmt: skip
    proxy = await make_proxy(
        upstream.url, database_url=db, lifecycle_source="observed", lifecycle_routes=routes
    )
    first, second = "exec_20251230_020944_000000a1", "exec_20251230_020944_000000a2"
    assert await call(proxy, "POST", "/api/sessions", json={"id": first}) == 201
    service_path = f"{proxy.url}/v2/sessions"
    async with (
        aiohttp.ClientSession() as client,
        client.post(service_path, json={"id": second}) as response,
    ):
        assert response.status == 201
        assert response.headers["Location"] == f"/api/sessions/{second}"
    await settled(proxy)
    assert await timeline(conn, first) == [(None, "ACTIVE", "observed")]
    assert await timeline(conn, second) == [(None, "ACTIVE", "observed")]  # from Location


async def test_unexpected_transitions_are_recorded_and_counted(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    await call(proxy, "POST", "/api/sessions", json={"id": SID})
    await call(proxy, "POST", f"/api/sessions/{SID}/archive")  # ACTIVE -> ARCHIVED: not a move
    await settled(proxy)
    assert (await timeline(conn))[-1] == ("ACTIVE", "ARCHIVED", "observed")
    assert (
        proxy.metric(
            "session_lens_lifecycle_events_total", action="archive", result="unexpected_transition"
        )
        == 1
    )


async def test_client_gone_before_the_answer_is_a_failed_creation(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    routes = json.dumps(
        [{"method": "POST", "path": "/api/sessions", "action": "create", "id_from": "request:/id"}]
    )
    proxy = await make_proxy(
        upstream.url, database_url=db, lifecycle_source="observed", lifecycle_routes=routes
    )
    service.delay = 1.0
    body = json.dumps({"id": SID}).encode()
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /api/sessions HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.2)
    await settled(proxy)
    assert await timeline(conn) == [("CREATING", None, "observed")]
    reason = await conn.fetchval("SELECT reason FROM session_audit WHERE session_id = $1", SID)
    assert reason == "the client went away first"


async def test_a_creation_cut_by_shutdown_says_so(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    routes = json.dumps(
        [{"method": "POST", "path": "/api/sessions", "action": "create", "id_from": "request:/id"}]
    )
    proxy = await make_proxy(
        upstream.url, database_url=db, lifecycle_source="observed", lifecycle_routes=routes,
        shutdown_grace="0.2s",
    )  # fmt: skip
    service.delay = 5.0
    body = json.dumps({"id": SID}).encode()
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /api/sessions HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    assert proxy.runner is not None
    await proxy.runner.cleanup()  # the grace period ends with the creation still upstream
    writer.close()
    assert await timeline(conn) == [("CREATING", None, "observed")]
    reason = await conn.fetchval("SELECT reason FROM session_audit WHERE session_id = $1", SID)
    assert reason == "cut at the end of the shutdown grace period"


async def test_database_down_spools_then_replays_in_order(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # First with no database reachable: the events wait in the spool on disk.
    down = await make_proxy(
        upstream.url,
        database_url="postgresql://nobody@127.0.0.1:1/none",
        lifecycle_source="observed",
        spool_dir=str(tmp_path / "spool"),
    )
    with caplog.at_level("WARNING", logger="session_lens"):
        assert await call(down, "POST", "/api/sessions", json={"id": SID}) == 201
        for action in ("pause", "resume", "stop"):
            assert await call(down, "POST", f"/api/sessions/{SID}/{action}") == 200
        assert down.recorder is not None
        assert down.recorder.pending == 4
        assert down.metric("session_lens_spooled_events") == 4
        await asyncio.sleep(0.3)  # the writer has tried and failed at least once
        await down.recorder.stop(timeout=0.5)
    assert any("spooling lifecycle events" in r.getMessage() for r in caplog.records)

    # A restart with the database back replays the spool, once, in order.
    recorder = recorder_on(db, tmp_path / "spool")
    replay_started = datetime.now(UTC)
    await recorder.start()
    try:
        assert recorder.pending == 4
        await asyncio.wait_for(recorder.drained(), 10)
    finally:
        await recorder.stop()
    conn = await asyncpg.connect(db)
    try:
        moves = [(old, new) for old, new, _ in await timeline(conn)]
        assert moves == [(None, "ACTIVE"), ("ACTIVE", "PAUSED"), ("PAUSED", "ACTIVE"),
                         ("ACTIVE", "STOPPED")]  # fmt: skip
        # The audit keeps when each event happened, not when it was written.
        audited = await conn.fetchval(
            "SELECT array_agg(occurred_at ORDER BY id) FROM session_audit"
        )
        seen = await conn.fetchval(
            "SELECT array_agg(occurred_at ORDER BY occurred_at) FROM session_lens_events"
        )
        assert audited == seen
        assert max(audited) < replay_started
    finally:
        await conn.close()


async def test_events_written_twice_land_once(db: str, tmp_path: Path) -> None:
    config = load_config(
        flags={"database_url": db, "lifecycle_source": "observed",
               "spool_dir": str(tmp_path / "spool")},
        need_upstream=False,
    )  # fmt: skip
    metrics = Metrics(CollectorRegistry(), ())
    event = Event.new(SID, Action.CREATE, "r1")
    for _ in range(2):  # the same event, as a replay after a crash would send it
        recorder = Recorder(config, metrics, db)
        await recorder.start()
        recorder.record(event)
        await asyncio.wait_for(recorder.drained(), 10)
        await recorder.stop()
    conn = await asyncpg.connect(db)
    try:
        assert await timeline(conn) == [(None, "ACTIVE", "observed")]
    finally:
        await conn.close()


async def test_full_spool_drops_loudly_and_forwarding_goes_on(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    proxy = await make_proxy(
        upstream.url,
        database_url="postgresql://nobody@127.0.0.1:1/none",
        lifecycle_source="observed",
        spool_max_bytes="64KiB",
    )
    with caplog.at_level("ERROR", logger="session_lens"):
        for n in range(800):
            assert (
                await call(proxy, "POST", f"/api/sessions/exec_20251230_020944_{n:08x}/stop") == 200
            )
    dropped = proxy.metric("session_lens_lifecycle_events_total", action="stop", result="dropped")
    assert 0 < dropped < 800
    assert proxy.metric("session_lens_spool_bytes") <= 64 * 1024
    assert [r.getMessage() for r in caplog.records].count("lifecycle events are being dropped") == 1
    assert proxy.recorder is not None
    assert proxy.recorder.health() is not None and "dropping events" in proxy.recorder.health()  # type: ignore[operator]


async def test_a_small_cap_is_no_problem_while_the_database_keeps_up(
    upstream: Upstream, service: SessionService, make_proxy: MakeProxy, db: str,
    conn: asyncpg.Connection,
) -> None:  # fmt: skip
    proxy = await make_proxy(
        upstream.url, database_url=db, lifecycle_source="observed", spool_max_bytes="64KiB"
    )
    for n in range(600):
        await call(proxy, "POST", f"/api/sessions/exec_20251230_020944_{n:08x}/stop")
        if n % 100 == 99:
            await settled(proxy)
    await settled(proxy)
    assert proxy.metric("session_lens_lifecycle_events_total", action="stop", result="dropped") == 0
    assert await conn.fetchval("SELECT count(*) FROM session_lens_events") == 600


def recorder_on(db: str, spool: Path, registry: CollectorRegistry | None = None) -> Recorder:
    """A recorder into `db` from the spool in `spool`, not started."""
    config = load_config(
        flags={"database_url": db, "lifecycle_source": "observed", "spool_dir": str(spool)},
        need_upstream=False,
    )
    return Recorder(config, Metrics(registry or CollectorRegistry(), ()), db)


async def test_an_event_the_database_refuses_does_not_hold_up_the_rest(
    db: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    registry = CollectorRegistry()
    recorder = recorder_on(db, tmp_path / "spool", registry)
    await recorder.start()
    try:
        recorder.record(Event.new("exec_bad\x00id", Action.CREATE, "r1"))  # text cannot hold NUL
        recorder.record(Event.new(SID, Action.CREATE, "r2"))
        await asyncio.wait_for(recorder.drained(), 10)
    finally:
        await recorder.stop()
    assert await timeline(conn) == [(None, "ACTIVE", "observed")]
    rejected = registry.get_sample_value(
        "session_lens_lifecycle_events_total", {"action": "create", "result": "rejected"}
    )
    assert rejected == 1


async def test_a_line_cut_by_a_crash_does_not_swallow_the_next_event(
    db: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "events.jsonl").write_bytes(Event.new(SID, Action.CREATE, "r0").line()[:-20])
    recorder = recorder_on(db, spool)
    await recorder.start()
    try:
        recorder.record(Event.new(SID, Action.CREATE, "r1"))
        await asyncio.wait_for(recorder.drained(), 10)
    finally:
        await recorder.stop()
    assert await timeline(conn) == [(None, "ACTIVE", "observed")]


async def test_awkward_bodies_and_locations(
    upstream: Upstream, make_proxy: MakeProxy, db: str, conn: asyncpg.Connection
) -> None:
    async def answers(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/nested":
            return web.Response(body=b"[" * 100_000, status=201, content_type="application/json")
        if request.path == "/located":
            return web.json_response({}, status=201, headers={"Location": "/api/sessions/"})
        return web.json_response({"got": len(body)}, status=201)

    upstream.respond = answers
    routes = json.dumps(
        [
            {"method": "POST", "path": "/nested", "action": "create", "id_from": "response:/id"},
            {"method": "POST", "path": "/located", "action": "create", "id_from": "location"},
            {"method": "POST", "path": "/chunked", "action": "create", "id_from": "request:/id"},
        ]
    )
    proxy = await make_proxy(
        upstream.url, database_url=db, lifecycle_source="observed", lifecycle_routes=routes
    )
    assert await call(proxy, "POST", "/nested") == 201
    assert await call(proxy, "POST", "/located") == 201

    async def chunks() -> Any:
        yield b'{"id": "'
        yield SID.encode() + b'"}'

    assert await call(proxy, "POST", "/chunked", data=chunks()) == 201
    await settled(proxy)
    assert [row[0] for row in await conn.fetch("SELECT session_id FROM session_audit")] == [SID]


async def test_events_without_an_id_are_counted_and_told_once_per_route_and_cause(
    upstream: Upstream, make_proxy: MakeProxy, db: str, conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    async def answers(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path == "/api/sessions":  # a service that moved the ID under /data
            kind = request.query.get("kind")
            if kind == "text":
                return web.Response(text="created", status=201)
            if kind == "string":
                return web.json_response(SID, status=201)
            if kind == "failed":
                return web.json_response({"error": "disk full"}, status=503)
            return web.json_response({"data": {"id": SID}}, status=201)
        return web.json_response({}, status=201)  # no Location, no ID

    upstream.respond = answers
    routes = json.dumps(
        [
            {"method": "POST", "path": "/api/sessions", "action": "create",
             "id_from": "response:/id"},
            {"method": "POST", "path": "/v2/sessions", "action": "create", "id_from": "location"},
            {"method": "POST", "path": "/v3/sessions", "action": "create",
             "id_from": "request:/session/id"},
            {"method": "POST", "path": "/api/sessions/{session_id}/stop", "action": "stop"},
        ]
    )  # fmt: skip
    proxy = await make_proxy(
        upstream.url,
        database_url=db,
        lifecycle_source="observed",
        lifecycle_routes=routes,
        merge_slashes="false",  # so that `/api/sessions//stop` has an empty ID segment
    )
    with caplog.at_level("WARNING", logger="session_lens"):
        for _ in range(3):
            assert await call(proxy, "POST", "/api/sessions") == 201
        assert await call(proxy, "POST", "/api/sessions?kind=text") == 201
        assert await call(proxy, "POST", "/api/sessions?kind=string") == 201
        assert await call(proxy, "POST", "/api/sessions?kind=failed") == 503
        assert await call(proxy, "POST", "/api/sessions") == 201
        assert await call(proxy, "POST", "/v2/sessions") == 201
        assert await call(proxy, "POST", "/v3/sessions", json={"session": "exec"}) == 201
        assert await call(proxy, "POST", "/api/sessions//stop") == 201
        assert await call(proxy, "POST", f"/api/sessions/{SID}/stop") == 201  # has its ID
        await settled(proxy)

    told = [
        (r.__dict__["route"], r.__dict__["id_from"], r.__dict__["missing"])
        for r in caplog.records
        if r.getMessage().startswith("lifecycle event not recorded")
    ]
    # One line the first time a route lacks its ID in a way, never one per request.
    assert told == [
        ("POST /api/sessions", "response:/id", "the answer's body has nothing at /id"),
        ("POST /api/sessions", "response:/id", "the answer's body is not JSON"),
        ("POST /api/sessions", "response:/id",
         "the answer's body holds a string at its top, not an object or an array"),
        ("POST /v2/sessions", "location", "the answer has no Location header"),
        ("POST /v3/sessions", "request:/session/id",
         "the request's body holds a string at /session, not an object or an array"),
        ("POST /api/sessions/{session_id}/stop", "path",
         "the path's {session_id} segment is empty"),
    ]  # fmt: skip
    unidentified = {
        action: proxy.metric(
            "session_lens_lifecycle_events_total", action=action, result="unidentified"
        )
        for action in ("create", "stop")
    }
    # Each one counted: seven on the first route (the failed creation's answer carries
    # no ID either), one by Location, one by the request's body; one stop.
    assert unidentified == {"create": 9, "stop": 1}
    assert await conn.fetchval("SELECT count(*) FROM session_lens_events") == 1


async def test_a_template_naming_the_id_stands_in_for_an_answer_without_one(
    upstream: Upstream, make_proxy: MakeProxy, db: str, conn: asyncpg.Connection
) -> None:
    async def answers(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"created": True}, status=201)

    upstream.respond = answers
    routes = json.dumps(
        [{"method": "PUT", "path": "/api/sessions/{session_id}", "action": "create",
          "id_from": "response:/id"}]
    )  # fmt: skip
    proxy = await make_proxy(
        upstream.url, database_url=db, lifecycle_source="observed", lifecycle_routes=routes
    )
    assert await call(proxy, "PUT", f"/api/sessions/{SID}") == 201
    await settled(proxy)
    assert await timeline(conn) == [(None, "ACTIVE", "observed")]
    assert (
        proxy.metric("session_lens_lifecycle_events_total", action="create", result="unidentified")
        == 0
    )


DAMAGED_LINES = [
    b"garbage\rjunk\n",  # a carriage return is no end of line
    b'[1,"exec_20251230_020944_00000009","create",true,1,"r",null]\n',
    b'["0123456789abcdef0123456789abcdef",["x"],"create",true,1,"r",null]\n',
    b"[" * 100_000 + b"\n",
    b'["0123456789abcdef0123456789abcdef","exec_x","create",true,NaN,"r",null]\n',
    b'["0123456789abcdef0123456789abcdef","exec_x","create",true,1e300,"r",null]\n',
    b"x" * (5 << 20) + b"\n",  # longer than a read of the spool
]


async def test_damaged_spool_lines_are_skipped_and_what_follows_them_is_read(
    db: str, tmp_path: Path, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    good = Event.new(SID, Action.CREATE, "r0")
    (spool / "events.jsonl").write_bytes(b"".join(DAMAGED_LINES) + good.line())
    (spool / "events.checkpoint").write_bytes(b"99999999999999999999999999999\n")
    assert [e.event_id for e in spooled(tmp_path / "nowhere").of(SID)] == []
    (spool / "events.checkpoint").write_bytes(b"0\n")
    assert [e.event_id for e in spooled(spool).of(SID)] == [good.event_id]
    damaged = [r for r in caplog.records if r.getMessage() == "skipping damaged spool lines"]
    assert sum(r.lines for r in damaged) == len(DAMAGED_LINES)  # type: ignore[attr-defined]
    assert len(damaged) <= 2  # one line for each read of the file, not one a line
    recorder = recorder_on(db, spool)
    await recorder.start()
    try:
        await asyncio.wait_for(recorder.drained(), 10)
    finally:
        await recorder.stop()
    assert await timeline(conn) == [(None, "ACTIVE", "observed")]


def test_explain_reads_regular_spool_files_only(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "worker-1").mkdir(parents=True)
    (spool / "worker-2").symlink_to("/")
    (spool / "worker-3").symlink_to(spool / "worker-3")  # a loop
    os.mkfifo(spool / "events.checkpoint")
    (spool / "events.jsonl").symlink_to("/dev/zero")
    event = Event.new(SID, Action.CREATE, "r0")
    (spool / "worker-1" / "events.jsonl").write_bytes(event.line())
    (spool / "worker-1" / "events.checkpoint").symlink_to("/dev/zero")
    assert [e.event_id for e in spooled(spool).of(SID)] == [event.event_id]


async def test_a_spool_has_one_writer(db: str, tmp_path: Path) -> None:
    first = recorder_on(db, tmp_path)
    await first.start()
    try:
        second = recorder_on(db, tmp_path)
        with pytest.raises(SpoolError, match="in use by another session-lens process"):
            await second.start()
    finally:
        await first.stop()
    again = recorder_on(db, tmp_path)
    await again.start()  # the first let go of it
    await again.stop()
