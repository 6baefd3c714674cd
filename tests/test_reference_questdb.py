"""The QuestDB-backed reference service against a real QuestDB: the store and its faults."""

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from session_lens.demo import QUESTDB_TABLE, QUESTDB_TTL_DAYS
from session_lens.reference_questdb import (
    QuestDBReferenceService,
    StoreFaults,
    create_table,
    new_session_id,
    seed,
)

from .questdb import QuestDB
from .test_demo import CLI, Places, environment

Service = tuple[TestClient[Any, Any], QuestDBReferenceService]


@pytest.fixture
async def service(questdb: QuestDB, aiohttp_client: Any) -> AsyncIterator[Service]:
    """The service on a table of its own, no fault striking unless a test makes it."""
    table = "sessions_" + uuid.uuid4().hex[:12]
    pool = await asyncpg.create_pool(questdb.url, min_size=1, max_size=4)
    await create_table(pool, table, ttl_days=30)
    faults = StoreFaults(enabled=frozenset())
    reference = QuestDBReferenceService(pool, faults, table)
    client = await aiohttp_client(reference.app())
    try:
        yield client, reference
    finally:
        await client.close()
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.close()


async def status_of(client: TestClient[Any, Any], path: str) -> int:
    async with client.get(path) as response:
        await response.read()
        return response.status


async def eventually(client: TestClient[Any, Any], path: str, status: int) -> None:
    """Wait until `path` answers `status`: QuestDB applies its WAL a moment after a write."""
    deadline = time.monotonic() + 15
    while (seen := await status_of(client, path)) != status:
        assert time.monotonic() < deadline, f"{path} still answers {seen}, not {status}"
        await asyncio.sleep(0.05)


async def test_the_table_is_wal_partitioned_by_day_with_a_ttl(service: Service) -> None:
    _, reference = service
    row = await reference.pool.fetchrow(
        "SELECT partitionBy, ttlValue, ttlUnit, walEnabled, designatedTimestamp FROM tables()"
        " WHERE table_name = $1",
        reference.table,
    )
    assert tuple(row) == ("DAY", 30, "DAY", True, "created_at")


async def test_lifecycle_with_soft_delete_and_include_deleted(service: Service) -> None:
    client, reference = service
    async with client.post("/api/sessions", json={}) as response:
        assert response.status == 201
        session_id = (await response.json())["id"]
    path = f"/api/sessions/{session_id}"
    await eventually(client, path, 200)
    for action, state in (("pause", "PAUSED"), ("stop", "STOPPED")):
        async with client.post(f"{path}/{action}") as response:
            assert response.status == 200 and (await response.json())["state"] == state
        await until_state(reference, session_id, state)
    async with client.delete(path) as response:
        assert response.status == 200
    await until_state(reference, session_id, "DELETED")
    assert await status_of(client, path) == 404
    async with client.get(path, params={"include_deleted": "true"}) as response:
        body = await response.json()
        assert response.status == 200 and body["state"] == "DELETED" and body["deleted_at"]
    async with client.post(f"{path}/resume") as response:
        assert response.status == 409  # DELETED -> ACTIVE is not a move of the model
    row = await reference.find(session_id)
    assert row is not None and row.created_at == datetime.strptime(
        session_id[5:20], "%Y%m%d_%H%M%S"
    )  # the designated timestamp is the moment the ID names


async def until_state(reference: QuestDBReferenceService, session_id: str, state: str) -> None:
    deadline = time.monotonic() + 15
    while (found := await reference.find(session_id)) is None or found.state != state:
        assert time.monotonic() < deadline, f"{session_id} never became {state}"
        await asyncio.sleep(0.05)


async def test_a_suspended_wal_accepts_creations_and_shows_none(service: Service) -> None:
    client, reference = service
    await reference.suspend()
    try:
        created = []
        for _ in range(3):
            async with client.post("/api/sessions", json={}) as response:
                assert response.status == 201  # accepted, as QuestDB accepts the INSERT
                created.append((await response.json())["id"])
        wal = await reference.pool.fetchrow(
            "SELECT suspended, writerTxn, sequencerTxn FROM wal_tables() WHERE name = $1",
            reference.table,
        )
        assert wal["suspended"] and wal["sequencerTxn"] >= wal["writerTxn"] + 3
        await asyncio.sleep(1)  # time enough for an apply that is not coming
        for session_id in created:
            assert await status_of(client, f"/api/sessions/{session_id}") == 404
    finally:
        await reference.resume()
    for session_id in created:
        await eventually(client, f"/api/sessions/{session_id}", 200)


async def test_a_dropped_partition_takes_its_sessions(service: Service) -> None:
    client, reference = service
    await seed(reference.pool, reference.table, days=3, per_day=4)
    oldest = (datetime.now(UTC) - timedelta(days=3)).strftime("exec_%Y%m%d_000000_00000001")
    await eventually(client, f"/api/sessions/{oldest}", 200)
    deleted = oldest.replace("000000_00000001", "120000_00000003")  # the third: DELETED
    assert await status_of(client, f"/api/sessions/{deleted}") == 404
    async with client.get(f"/api/sessions/{deleted}?include_deleted=1") as response:
        body = await response.json()
        assert body["state"] == "DELETED" and body["deleted_at"] == body["created_at"]
    dropped = await reference.drop_oldest_partition()
    assert dropped == f"{oldest[5:9]}-{oldest[9:11]}-{oldest[11:13]}"
    await eventually(client, f"/api/sessions/{oldest}", 404)
    partitions = await reference.pool.fetch(
        f"SELECT name FROM table_partitions('{reference.table}')"
    )
    assert dropped not in {row["name"] for row in partitions}


async def test_the_faults_run_in_the_background(questdb: QuestDB, aiohttp_client: Any) -> None:
    table = "sessions_" + uuid.uuid4().hex[:12]
    async with asyncpg.create_pool(questdb.url, min_size=1, max_size=4) as pool:
        await create_table(pool, table, ttl_days=30)
        faults = StoreFaults(
            enabled=frozenset({"suspended_wal", "ignore_include_deleted"}),
            suspend_every=0.2,
            suspend_for=30,
        )
        client = await aiohttp_client(QuestDBReferenceService(pool, faults, table).app())
        try:
            query = "SELECT suspended FROM wal_tables() WHERE name = $1"
            deadline = time.monotonic() + 15
            while not await pool.fetchval(query, table):
                assert time.monotonic() < deadline, "the table was never suspended"
                await asyncio.sleep(0.05)
            async with client.post("/api/sessions", json={"id": new_session_id()}) as response:
                assert response.status == 201
        finally:
            await client.close()  # its cleanup resumes the table
        assert await pool.fetchval(query, table) is False
        await pool.execute(f"DROP TABLE {table}")


async def test_bad_requests(service: Service) -> None:
    client, _ = service
    async with client.post("/api/sessions", json={"id": "sess-42"}) as response:
        assert response.status == 400
    assert await status_of(client, "/api/sessions/sess-42") == 404
    async with client.post(f"/api/sessions/{new_session_id()}/fly") as response:
        assert response.status == 404


async def test_the_demo_runs_against_a_questdb(questdb: QuestDB, tmp_path: Path) -> None:
    places = Places.free(tmp_path / "data")
    command = [*CLI, "demo", "--questdb", questdb.url, "--duration", "25", "--rate", "20"]
    result = await asyncio.to_thread(
        subprocess.run, [*command, *places.flags], capture_output=True, text=True, timeout=180,
        env=environment(),
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: some reason did not show
    assert "Traceback" not in result.stderr
    cells = [[cell.strip() for cell in line.split("│")] for line in result.stdout.splitlines()]
    seen = {
        row[1].strip(): int(row[2]) for row in cells if len(row) > 3 and row[2].strip().isdigit()
    }
    # The summary (the last table) counts sessions looked up straight after their creation
    # while QuestDB had not applied it yet, and IDs older than the table's TTL.
    assert seen["not_yet_visible"] > 0 and seen["expired"] > 0
    assert "not-found reasons seen" in result.stdout
    conn = await asyncpg.connect(questdb.url)
    try:
        row = await conn.fetchrow(
            "SELECT partitionBy, ttlValue, walEnabled FROM tables() WHERE table_name = $1",
            QUESTDB_TABLE,
        )
        assert tuple(row) == ("DAY", QUESTDB_TTL_DAYS, True)
        assert await conn.fetchval(f"SELECT count() FROM {QUESTDB_TABLE}") > 0
        await conn.execute(f"DROP TABLE {QUESTDB_TABLE}")
    finally:
        await conn.close()
