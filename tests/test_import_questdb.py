"""`session-lens import` from a real QuestDB: SYMBOL, VARCHAR, TIMESTAMP columns, by pages."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from .questdb import QuestDB
from .test_import import PAGE, audit, lens, sessions, until_pages

STATUS_TO_STATE = (
    "CASE status WHEN 'live' THEN 'ACTIVE' WHEN 'gone' THEN 'DELETED'"
    " WHEN 'cold' THEN 'ARCHIVED' WHEN 'held' THEN 'PAUSED' END"
)
ROWS = 100_000
START = "2025-12-01T00:00:00.000000Z"
FILL = (
    "INSERT INTO {table} SELECT"
    " concat('exec_', to_str(ts, 'yyyyMMdd_HHmmss'), '_', lpad(cast(x AS string), 8, '0')),"
    " rnd_symbol('live', 'gone', 'cold', 'held'), ts, dateadd('m', 5, ts), 'owner-' || x"
    " FROM (SELECT x, dateadd('s', cast(x AS int), '" + START + "') ts FROM long_sequence({rows}))"
)
"""One session a second from 2025-12-01: IDs unique by the second they name."""


def query(table: str) -> str:
    return (
        "SELECT session_id AS id, status, created AS created_at, changed AS updated_at, owner"
        f" FROM {table}"
    )


async def visible(conn: asyncpg.Connection, table: str, rows: int) -> None:
    """Wait until QuestDB has applied its write-ahead log up to `rows` rows."""
    for _ in range(600):
        if await conn.fetchval(f"SELECT count() FROM {table}") == rows:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{table} never showed {rows} rows")


@pytest.fixture
async def service_table(questdb: QuestDB) -> AsyncIterator[str]:
    """A WAL table of the service's sessions, partitioned by day, of its own name."""
    table = "sessions_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(questdb.url)
    await conn.execute(
        f"CREATE TABLE {table} (session_id VARCHAR, status SYMBOL, created TIMESTAMP,"
        " changed TIMESTAMP, owner VARCHAR) TIMESTAMP(created) PARTITION BY DAY WAL"
    )
    try:
        yield table
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def fill(url: str, table: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(FILL.format(table=table, rows=rows))
        await visible(conn, table, rows)
    finally:
        await conn.close()


LIVE, GONE = "exec_20251201_000001_00000001", "exec_20251201_000002_00000002"


async def test_from_questdb(
    db: str, questdb: QuestDB, service_table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await asyncpg.connect(questdb.url)
    try:
        await conn.executemany(
            f"INSERT INTO {service_table} VALUES ($1, $2, $3, $4, $5)",
            [
                (LIVE, "live", datetime(2025, 12, 1, 0, 0, 1), datetime(2025, 12, 1, 1), "ann"),
                (GONE, "gone", datetime(2025, 12, 1, 0, 0, 2), None, "bob"),
            ],
        )
        await visible(conn, service_table, 2)
    finally:
        await conn.close()
    code, out, err = await asyncio.to_thread(
        lens, db, "--from-database", questdb.url, "--query", query(service_table),
        "--state-expression", STATUS_TO_STATE, capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "rows read      2\nimported       2\nalready known  0\nrefused        0" in out
    found = await asyncio.to_thread(sessions, db)
    # QuestDB's TIMESTAMP has no zone: read as UTC, as any naive timestamp is.
    assert found[LIVE] == (
        "ACTIVE",
        datetime(2025, 12, 1, 0, 0, 1, tzinfo=UTC),
        datetime(2025, 12, 1, 1, tzinfo=UTC),
        None,
    )
    state, created, updated, deleted = found[GONE]  # no updated_at: dated by its creation
    assert state == "DELETED" and created == datetime(2025, 12, 1, 0, 0, 2, tzinfo=UTC)
    assert updated == deleted == created
    trail = await asyncio.to_thread(audit, db)
    assert [(sid, new, trigger) for sid, _, new, trigger, _ in trail] == [
        (LIVE, "ACTIVE", "import"),
        (GONE, "DELETED", "import"),
    ]


async def test_questdb_import_interrupted_and_resumed(
    db: str, questdb: QuestDB, service_table: str
) -> None:
    await fill(questdb.url, service_table, ROWS)
    command = [
        sys.executable, "-m", "session_lens", "import", "--from-database", questdb.url,
        "--query", query(service_table), "--state-expression", STATUS_TO_STATE,
        "--page-size", str(PAGE), "--database-url", db, "--lifecycle-source", "observed",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_LENS_")}
    conn = await asyncpg.connect(db)
    try:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await until_pages(conn, process, 3)
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        cut = await conn.fetchval("SELECT count(*) FROM sessions")
        assert 3 * PAGE <= cut < ROWS
        assert cut % PAGE == 0, "a page was committed in part"
        assert await conn.fetchval("SELECT count(*) FROM session_audit") == cut

        done = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert f"imported       {ROWS - cut:,}\nalready known  {cut:,}\n" in done.stdout
        assert await conn.fetchval("SELECT count(*) FROM sessions") == ROWS
        assert await conn.fetchval(
            "SELECT count(DISTINCT session_id) FILTER (WHERE trigger = 'import') = $1"
            " AND count(*) = $1 FROM session_audit",
            ROWS,
        )
        states = await conn.fetch("SELECT state, count(*) FROM sessions GROUP BY state")
        assert {row["state"] for row in states} == {"ACTIVE", "DELETED", "ARCHIVED", "PAUSED"}
    finally:
        await conn.close()


async def test_a_column_asyncpg_cannot_decode_is_one_line(
    db: str, questdb: QuestDB, service_table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    table = service_table + "_ip"
    conn = await asyncpg.connect(questdb.url)
    try:
        await conn.execute(
            f"CREATE TABLE {table} (session_id VARCHAR, ip IPV4, created TIMESTAMP)"
            " TIMESTAMP(created) PARTITION BY DAY WAL"
        )
        await conn.execute(f"INSERT INTO {table} VALUES ('{LIVE}', '10.0.0.1', now())")
        await visible(conn, table, 1)
        select = f"SELECT session_id AS id, ip FROM {table}"
        code, _, err = await asyncio.to_thread(
            lens, db, "--from-database", questdb.url, "--query", select, capsys=capsys
        )
        assert code == 1 and "Traceback" not in err
        assert "cast such columns to text in --query (QuestDB: IPV4, GEOHASH)" in err
        cast = f"SELECT session_id AS id, cast(ip AS string) AS ip FROM {table}"
        code, out, err = await asyncio.to_thread(
            lens, db, "--from-database", questdb.url, "--query", cast, capsys=capsys
        )
        assert code == 0, err
        assert "imported       1\n" in out
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
