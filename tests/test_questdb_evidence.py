"""End to end: the hop before the QuestDB-backed service, the service's QuestDB as evidence."""

import asyncio
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from session_lens.app import EXPLAINER, create_admin_app
from session_lens.config import load_config
from session_lens.explain import report_json
from session_lens.lookups import REASON_HEADER
from session_lens.operate import TriageOptions, run_explain, run_triage
from session_lens.reference_questdb import QuestDBReferenceService, StoreFaults, create_table, seed
from session_lens.triage import Fields

from .conftest import MakeProxy, ProxyUnderTest, track_since
from .questdb import QuestDB, free_port
from .test_cli import run

ROUTE = "/api/sessions/{session_id}"
DAYS, PER_DAY = 4, 10
STEP = timedelta(seconds=86_400 // PER_DAY)


def seeded(days_ago: int, state: str) -> str:
    """The ID `seed` gave a session of that state on that day."""
    start = (datetime.now(UTC) - timedelta(days=DAYS)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    offset = ["ACTIVE", "PAUSED", "STOPPED", "DELETED", "ARCHIVED"].index(state)
    x = (DAYS - days_ago) * PER_DAY + (offset or 5)  # x % 5 names the state, x from 1
    return f"exec_{start + (x - 1) * STEP:%Y%m%d_%H%M%S}_{x:08d}"


def unseen(days_ago: int) -> str:
    """An ID minted on that day that no one wrote."""
    day = datetime.now(UTC) - timedelta(days=days_ago)
    return day.strftime("exec_%Y%m%d_%H%M%S_") + "ffff0000"


@dataclass
class Stack:
    service: QuestDBReferenceService
    url: str
    table: str


@pytest.fixture
async def stack(questdb: QuestDB, aiohttp_server: Any) -> AsyncIterator[Stack]:
    """The QuestDB-backed service on a seeded table of its own, no fault striking by itself."""
    table = "evidence_" + uuid.uuid4().hex[:12]
    pool = await asyncpg.create_pool(questdb.url, min_size=1, max_size=4)
    await create_table(pool, table, ttl_days=30)
    async with pool.acquire() as conn:
        await seed(conn, table, DAYS, PER_DAY)
    service = QuestDBReferenceService(pool, StoreFaults(enabled=frozenset()), table)
    server = await aiohttp_server(service.app())
    deadline = time.monotonic() + 15
    while await pool.fetchval(f"SELECT count() FROM {table}") < DAYS * PER_DAY:
        assert time.monotonic() < deadline, "the seed never became visible"
        await asyncio.sleep(0.05)
    try:
        yield Stack(service, str(server.make_url("")).rstrip("/"), table)
    finally:
        await server.close()  # its shutdown resumes the WAL, through the pool
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.close()


def flags(upstream: str, db: str, questdb_url: str, table: str) -> dict[str, str]:
    return {
        "upstream": upstream,
        "database_url": db,
        "questdb_url": questdb_url,
        "questdb_table": table,
        "questdb_budget": "2s",
        "classification_budget": "5s",  # a busy machine: the cases, not the budget, are tested
    }


async def hop(make_proxy: MakeProxy, settings: dict[str, str]) -> ProxyUnderTest:
    rest = {name: value for name, value in settings.items() if name != "upstream"}
    return await make_proxy(settings["upstream"], **rest)


async def miss(proxy: ProxyUnderTest, session_id: str, query: str = "") -> tuple[int, str, Any]:
    url = f"{proxy.url}/api/sessions/{session_id}{query}"
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        body = await response.read()
        return response.status, response.headers.get(REASON_HEADER, ""), body


async def reason_becomes(proxy: ProxyUnderTest, session_id: str, reason: str) -> Any:
    """Ask until the miss reads `reason` (the store's metadata is read every few seconds)."""
    deadline = time.monotonic() + 20
    while True:
        status, said, body = await miss(proxy, session_id)
        if said == reason:
            assert status == 404
            return json.loads(body)
        assert time.monotonic() < deadline, f"{session_id}: still {status} {said!r}"
        await asyncio.sleep(0.2)


async def explained(
    proxy: ProxyUnderTest, settings: dict[str, str], session_id: str
) -> tuple[dict[str, Any], str]:
    """`explain` as JSON (the admin endpoint's) and as the CLI prints it."""
    assert proxy.runner is not None
    report = report_json(await proxy.runner.app[EXPLAINER].report(session_id))
    config = load_config(flags=settings)
    out = io.StringIO()
    assert await run_explain(config, session_id, out=out) == 0
    return report, out.getvalue()


def counted(proxy: ProxyUnderTest, reason: str) -> float:
    return proxy.metric("session_lens_not_found_total", route=ROUTE, reason=reason)


async def test_absent_from_a_present_partition_never_existed_even_before_the_horizon(
    stack: Stack, db: str, questdb: QuestDB, make_proxy: MakeProxy, conn: asyncpg.Connection
) -> None:
    await track_since(conn, datetime.now(UTC))  # every seeded day predates the records
    settings = flags(stack.url, db, questdb.url, stack.table)
    proxy = await hop(make_proxy, settings)
    body = await reason_becomes(proxy, unseen(2), "never_existed")
    assert body["reason"] == "never_existed"
    assert counted(proxy, "never_existed") >= 1
    report, printed = await explained(proxy, settings, unseen(2))
    assert report["reason"] == "never_existed"
    assert report["questdb"]["row"] is None
    assert report["questdb"]["partitions"][0]["present"] is True
    assert "never written" in report["why"]
    assert "row absent" in printed and "present" in printed
    # Without the store the same miss has no evidence either way.
    blind = await make_proxy(stack.url, database_url=db, classification_budget="5s")
    assert (await miss(blind, unseen(2)))[1] == "predates_tracking"


async def test_a_row_the_service_does_not_serve(
    stack: Stack, db: str, questdb: QuestDB, make_proxy: MakeProxy
) -> None:
    settings = flags(stack.url, db, questdb.url, stack.table)
    proxy = await hop(make_proxy, settings)
    deleted, archived = seeded(2, "DELETED"), seeded(2, "ARCHIVED")
    await reason_becomes(proxy, deleted, "deleted")
    await reason_becomes(proxy, archived, "archived")
    report, _ = await explained(proxy, settings, archived)
    assert report["questdb"]["row"]["state"] == "ARCHIVED"
    assert report["questdb"]["row"]["id"] == archived
    report, _ = await explained(proxy, settings, deleted)  # its time from the store's row
    stamp = datetime.fromisoformat(report["questdb"]["row"]["deleted_at"])
    assert (
        f"deleted at {stamp:%Y-%m-%d %H:%M:%S} UTC, as the service's store holds it"
        in (report["why"])
    )


async def test_a_row_present_but_404_is_upstream_inconsistent_with_the_row_as_proof(
    stack: Stack, db: str, questdb: QuestDB, make_proxy: MakeProxy, aiohttp_server: Any
) -> None:
    async def lost(request: web.Request) -> web.Response:
        return web.json_response({"error": "session_not_found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lost)
    server = await aiohttp_server(app)
    settings = flags(str(server.make_url("")).rstrip("/"), db, questdb.url, stack.table)
    proxy = await hop(make_proxy, settings)
    active = seeded(1, "ACTIVE")
    body = await reason_becomes(proxy, active, "upstream_inconsistent")
    assert body["error"] == "session_not_found"  # merged into the upstream's body
    report, printed = await explained(proxy, settings, active)
    assert report["questdb"]["row"]["state"] == "ACTIVE"
    assert "its own store holds" in report["why"]
    assert active in printed


async def test_a_dropped_partition_is_expired_from_what_the_store_says(
    stack: Stack, db: str, questdb: QuestDB, make_proxy: MakeProxy
) -> None:
    settings = flags(stack.url, db, questdb.url, stack.table)
    proxy = await hop(make_proxy, settings)
    active = seeded(DAYS, "ACTIVE")
    await reason_becomes(proxy, seeded(DAYS, "DELETED"), "deleted")  # its partition is there
    dropped = await stack.service.drop_oldest_partition()
    assert dropped == (datetime.now(UTC) - timedelta(days=DAYS)).strftime("%Y-%m-%d")
    await reason_becomes(proxy, active, "expired")
    assert counted(proxy, "expired") >= 1
    report, printed = await explained(proxy, settings, active)
    assert report["questdb"]["partitions"][0] == {"name": dropped, "present": False}
    assert "no longer has" in report["why"]
    assert "gone" in printed


async def test_a_suspended_wal_then_resumed(
    stack: Stack,
    db: str,
    questdb: QuestDB,
    make_proxy: MakeProxy,
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "session_lens")
    settings = flags(stack.url, db, questdb.url, stack.table)
    proxy = await hop(make_proxy, settings)
    assert proxy.runner is not None
    explainer = proxy.runner.app[EXPLAINER]
    await stack.service.suspend()
    created = []
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.post(f"{proxy.url}/api/sessions", json={}) as response:
                    assert response.status == 201  # accepted, as QuestDB accepts the write
                    created.append((await response.json())["id"])
        for session_id in created:
            body = await reason_becomes(proxy, session_id, "store_suspended")
            assert body["reason"] == "store_suspended"
        assert counted(proxy, "store_suspended") >= 3
        logged = [r for r in caplog.records if getattr(r, "reason", None) == "store_suspended"]
        assert logged and all(r.questdb["wal"]["suspended"] for r in logged)  # type: ignore[attr-defined]
        assert {r.session_id for r in logged} == set(created)  # type: ignore[attr-defined]
        assert proxy.metric("session_lens_questdb_wal_suspended") == 1
        assert proxy.metric("session_lens_questdb_wal_pending_transactions") >= 3
        report, printed = await explained(proxy, settings, created[0])
        assert report["questdb"]["wal"]["suspended"] is True
        assert "RESUME WAL" in report["why"]
        assert "WAL suspended" in printed
        admin = await aiohttp_client(
            create_admin_app(load_config(flags=settings), proxy.registry, explainer)
        )
        async with admin.get("/metrics") as response:
            assert "session_lens_questdb_wal_suspended 1.0" in await response.text()
    finally:
        await stack.service.resume()
    deadline = time.monotonic() + 20
    for session_id in created:  # resumed: what was accepted becomes visible
        while (await miss(proxy, session_id))[0] != 200:
            assert time.monotonic() < deadline, f"{session_id} never became visible"
            await asyncio.sleep(0.2)
    await asyncio.sleep(0)
    assert explainer.questdb is not None
    await explainer.questdb.refresh()
    assert proxy.metric("session_lens_questdb_wal_suspended") == 0


@pytest.fixture(scope="module")
def unapplied(tmp_path_factory: pytest.TempPathFactory, questdb: QuestDB) -> Iterator[QuestDB]:
    """A second QuestDB that applies no write-ahead log: every write is accepted and stays
    pending, no table suspended (QuestDB's `cairo.wal.apply.enabled=false`)."""
    server = QuestDB(
        tmp_path_factory.mktemp("questdb-unapplied"),
        settings={"QDB_CAIRO_WAL_APPLY_ENABLED": "false"},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_pending_transactions_make_a_fresh_session_not_yet_visible(
    unapplied: QuestDB,
    db: str,
    make_proxy: MakeProxy,
    aiohttp_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "session_lens")
    pool = await asyncpg.create_pool(unapplied.url, min_size=1, max_size=4)
    await create_table(pool, "sessions", ttl_days=30)
    service = QuestDBReferenceService(pool, StoreFaults(enabled=frozenset()), "sessions")
    server = await aiohttp_server(service.app())
    try:
        upstream = str(server.make_url("")).rstrip("/")
        settings = {**flags(upstream, db, unapplied.url, "sessions"), "visibility_window": "2m"}
        proxy = await hop(make_proxy, settings)
        created = []
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.post(f"{proxy.url}/api/sessions", json={}) as response:
                    assert response.status == 201  # accepted; applied, never
                    created.append((await response.json())["id"])
        for session_id in created:
            body = await reason_becomes(proxy, session_id, "not_yet_visible")
            assert body["reason"] == "not_yet_visible"
        assert counted(proxy, "not_yet_visible") >= 3
        logged = [r for r in caplog.records if getattr(r, "reason", None) == "not_yet_visible"]
        wal = [r.questdb["wal"] for r in logged]  # type: ignore[attr-defined]
        assert wal and all(w["suspended"] is False and w["pending"] >= 3 for w in wal)
        assert proxy.metric("session_lens_questdb_wal_suspended") == 0
        assert proxy.metric("session_lens_questdb_wal_pending_transactions") >= 3
        report, printed = await explained(proxy, settings, created[0])
        assert report["reason"] == "not_yet_visible"
        assert report["questdb"]["wal"]["pending"] >= 3 and report["questdb"]["row"] is None
        assert "transactions accepted and not applied" in report["why"]
        assert "not_yet_visible" in printed
        # Older than the window, its absence is not proved while writes are pending: the
        # lifecycle records decide (nothing of it there: tracked since long before).
        old = datetime.now(UTC) - timedelta(hours=1)
        assert (await miss(proxy, old.strftime("exec_%Y%m%d_%H%M%S_ffff0000")))[1] == (
            "never_existed"
        )
    finally:
        await server.close()
        await pool.close()


async def test_a_store_that_is_down_leaves_the_lifecycle_evidence_to_decide(
    stack: Stack,
    db: str,
    make_proxy: MakeProxy,
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nowhere = f"postgresql://admin:quest@127.0.0.1:{free_port()}/qdb"
    caplog.set_level(logging.WARNING, "session_lens.evidence.questdb")
    settings = flags(stack.url, db, nowhere, stack.table)
    proxy = await hop(make_proxy, settings)
    for _ in range(3):
        status, said, _ = await miss(proxy, unseen(2))
        assert (status, said) == (404, "never_existed")  # after the horizon: the lifecycle's say
    assert proxy.metric("session_lens_questdb_errors_total", kind="unavailable") >= 1
    assert proxy.metric("session_lens_classifier_errors_total", kind="unavailable") == 0
    logged = [r for r in caplog.records if r.getMessage() == "questdb store unavailable"]
    assert len(logged) == 1  # once for the run of failures
    assert "quest@" not in caplog.text  # the password masked
    assert proxy.runner is not None
    explainer = proxy.runner.app[EXPLAINER]
    admin = await aiohttp_client(
        create_admin_app(load_config(flags=settings), proxy.registry, explainer)
    )
    async with admin.get("/readyz") as response:
        ready = await response.json()
    assert response.status == 200 and ready["status"] == "degraded"
    assert ready["checks"]["questdb"].startswith("down: unavailable")
    report = report_json(await explainer.report(unseen(2)))
    assert report["questdb"] is None and report["questdb_problem"].startswith("unavailable")
    assert report["reason"] == "never_existed"
    config = load_config(flags=settings)
    out = io.StringIO()
    assert await run_explain(config, unseen(2), out=out) == 0
    assert "questdb   not asked: unavailable" in out.getvalue()


def test_check_config_shows_the_store_and_what_it_found(stack: Stack, questdb: QuestDB) -> None:
    result = run(
        "check-config", "--upstream", stack.url, "--questdb-url", questdb.url,
        "--questdb-table", stack.table, "--questdb-pool-size", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'questdb_table = "{stack.table}"' in result.stdout
    assert re.search(r"^questdb_pool_size = 3 +# flag --questdb-pool-size$", result.stdout, re.M)
    assert "admin:***@" in result.stdout and ":quest@" not in result.stdout
    found = result.stdout.splitlines()[-1]
    assert found.startswith(f"# questdb postgresql://admin:***@127.0.0.1:{questdb.pg_port}/qdb")
    assert f"partitioned by day, TTL 30d, {DAYS} partitions" in found
    assert "WAL applying, 0 transactions pending" in found
    nowhere = f"postgresql://admin:quest@127.0.0.1:{free_port()}/qdb"
    result = run("check-config", "--upstream", stack.url, "--questdb-url", nowhere)
    assert result.returncode == 0 and result.stderr == ""
    assert "not reachable (unavailable: " in result.stdout.splitlines()[-1]


async def test_check_config_says_a_table_without_partitions_as_such(
    stack: Stack, questdb: QuestDB
) -> None:
    name = f"layout_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(questdb.url)
    try:
        await conn.execute(
            f"CREATE TABLE {name}_flat (id VARCHAR, created_at TIMESTAMP)"
            " TIMESTAMP(created_at) PARTITION BY NONE"
        )
        await conn.execute(
            f"CREATE TABLE {name}_empty (id VARCHAR, created_at TIMESTAMP)"
            " TIMESTAMP(created_at) PARTITION BY DAY WAL"
        )
    finally:
        await conn.close()
    said = {}
    for kind in ("flat", "empty"):
        result = await asyncio.to_thread(
            run, "check-config", "--upstream", stack.url, "--questdb-url", questdb.url,
            "--questdb-table", f"{name}_{kind}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        said[kind] = result.stdout.splitlines()[-1]
    assert said["flat"].endswith(f"table {name}_flat: not partitioned, no TTL; not a WAL table")
    assert said["empty"].endswith(
        f"table {name}_empty: partitioned by day, no TTL, no partition yet;"
        " WAL applying, 0 transactions pending"
    ), said["empty"]


async def test_triage_takes_from_the_store_what_held_at_each_lookup(
    stack: Stack, questdb: QuestDB, db: str, tmp_path: Path
) -> None:
    """A log of misses triaged with the store as evidence: sessions the store holds that the
    lifecycle records know nothing of, looked up in one stretch, and IDs no one wrote."""
    start = datetime.now(UTC) - timedelta(hours=3)
    burst_at = start + timedelta(hours=1)
    held = [seeded(days, state) for days in (2, 3) for state in ("ACTIVE", "PAUSED", "STOPPED")]
    lines = [miss_line(sid, burst_at + timedelta(seconds=i)) for i, sid in enumerate(held * 2)]
    gone = [seeded(days, state) for days in (2, 3) for state in ("DELETED", "ARCHIVED")]
    lines += [miss_line(sid, start + timedelta(minutes=i * 40)) for i, sid in enumerate(gone)]
    day = datetime.now(UTC) - timedelta(days=2)
    absent = [day.strftime("exec_%Y%m%d_%H%M%S_") + f"ffff{i:04x}" for i in range(12)]
    lines += [miss_line(sid, start + timedelta(minutes=i * 15)) for i, sid in enumerate(absent)]
    log = tmp_path / "service.log"
    log.write_text("\n".join(lines) + "\n")

    # The lifecycle records alone: tracked since long before, they know none of these IDs.
    plain = {"database_url": db}
    everything = len(held) * 2 + len(gone) + 12
    assert (await triaged(plain, log))["reasons"] == {"never_existed": everything}
    conn = await asyncpg.connect(db)
    try:
        await track_since(conn, datetime.now(UTC))  # now: not a word on any of them
    finally:
        await conn.close()
    alone = await triaged(plain, log)
    assert alone["reasons"] == {"predates_tracking": everything}

    store = {**plain, "questdb_url": questdb.url, "questdb_table": stack.table}
    data = await triaged(store, log)
    assert data["reasons"] == {
        "upstream_inconsistent": len(held) * 2,  # written, and not served
        "never_existed": 12,
        "deleted": 2,  # deleted now: most likely deleted then
        "archived": 2,
    }
    burst = next(p for p in data["patterns"] if p["cause"] == "burst:upstream_inconsistent")
    assert "write-ahead log is suspended" in burst["statement"]

    # The store down: the lifecycle records decide alone, as before.
    down = {**store, "questdb_url": f"postgresql://admin:quest@127.0.0.1:{free_port()}/qdb"}
    assert (await triaged(down, log))["reasons"] == alone["reasons"]


def miss_line(session_id: str, at: datetime) -> str:
    data = {"session_id": session_id, "include_deleted": False}
    return json.dumps(
        {"event_type": "session_not_found", "timestamp": at.isoformat(), "data": data}
    )


async def triaged(settings: dict[str, str], log: Path) -> dict[str, Any]:
    """`triage --json` on `log` with `settings`; its reasons as a mapping."""
    out = io.StringIO()
    config = load_config(flags=settings, need_upstream=False)
    assert await run_triage(config, TriageOptions([str(log)], Fields(), json=True), out) == 0
    data: dict[str, Any] = json.loads(out.getvalue())
    data["reasons"] = {row["reason"]: row["misses"] for row in data["reasons"]}
    return data
