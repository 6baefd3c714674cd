"""`session-lens import`: the sessions a service already has, seeded into the observed store."""

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from session_lens.cli import main
from session_lens.config import mask_url

from .conftest import MakeProxy, Upstream, with_database

LIVE, GONE, COLD, PAUSED = (f"exec_20250101_000000_0000000{n}" for n in range(1, 5))
STATUS_TO_STATE = (
    "CASE status WHEN 'live' THEN 'ACTIVE' WHEN 'gone' THEN 'DELETED'"
    " WHEN 'cold' THEN 'ARCHIVED' WHEN 'held' THEN 'PAUSED' END"
)
QUERY = (
    "SELECT session_key AS id, status, born AS created_at, changed AS updated_at,"
    " removed AS deleted_at, owner FROM service_sessions"
)
BORN = datetime(2025, 1, 1, tzinfo=UTC)


def at(hours: int) -> datetime:
    return BORN + timedelta(hours=hours)


def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def lens(db: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `session-lens import` in this process, in observed mode, on `db`."""
    code = main(
        ["import", "--database-url", db, "--lifecycle-source", "observed", *args], environ={}
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
async def foreign(postgres_url: str) -> AsyncIterator[str]:
    """The service's own store, of its own shape: another database on the same server."""
    name = "sl_foreign_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(postgres_url, name)
    conn = await asyncpg.connect(url)
    await conn.execute(
        "CREATE TABLE service_sessions (session_key varchar(64) PRIMARY KEY, status text,"
        " born timestamp, changed timestamptz, removed timestamptz, owner text)"
    )
    await conn.executemany(
        "INSERT INTO service_sessions VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (LIVE, "live", at(0).replace(tzinfo=None), at(1), None, "ann"),
            (GONE, "gone", at(0).replace(tzinfo=None), at(2), at(3), "bob"),
            (COLD, "cold", at(0).replace(tzinfo=None), at(4), None, "cy"),
            (PAUSED, "held", None, None, None, "dee"),
        ],
    )
    await conn.close()
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def sessions(db: str) -> dict[str, tuple[Any, ...]]:
    rows = query(db, "SELECT id, state, created_at, updated_at, deleted_at FROM sessions")
    return {row["id"]: tuple(row)[1:] for row in rows}


def audit(db: str) -> list[tuple[Any, ...]]:
    rows = query(
        db,
        "SELECT session_id, old_state, new_state, trigger, occurred_at FROM session_audit"
        " ORDER BY session_id, id",
    )
    return [tuple(row) for row in rows]


def test_from_a_foreign_store(
    db: str, foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    code, out, err = lens(
        db, "--from-database", foreign, "--query", QUERY, "--state-expression", STATUS_TO_STATE,
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "rows read      4\nimported       4\nalready known  0\nrefused        0" in out
    found = sessions(db)
    assert found[LIVE] == ("ACTIVE", at(0), at(1), None)  # a naive timestamp is read as UTC
    assert found[GONE] == ("DELETED", at(0), at(2), at(3))
    assert found[COLD] == ("ARCHIVED", at(0), at(4), None)
    # No timestamps: the time its ID was minted, never the import's moment.
    assert found[PAUSED] == ("PAUSED", BORN, BORN, None)
    updated = BORN
    assert audit(db) == [
        (LIVE, None, "ACTIVE", "import", at(1)),
        (GONE, None, "DELETED", "import", at(2)),
        (COLD, None, "ARCHIVED", "import", at(4)),
        (PAUSED, None, "PAUSED", "import", updated),
    ]
    [reason] = {row["reason"] for row in query(db, "SELECT reason FROM session_audit")}
    assert reason.startswith("imported ") and reason.endswith(f"UTC from {mask_url(foreign)}")


def write_source(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


FILE_ROWS = [
    {"session_id": LIVE, "state": "ACTIVE", "created_at": "2025-01-01T00:00:00Z",
     "updated_at": "2025-01-01 01:00:00+00"},
    {"session_id": GONE, "state": "DELETED", "created_at": "2025-01-01T00:00:00Z",
     "updated_at": "2025-01-01T02:00:00Z"},
    {"session_id": COLD, "state": "ARCHIVED", "created_at": "", "updated_at": ""},
]  # fmt: skip


@pytest.mark.parametrize("name", ["sessions.csv", "sessions.jsonl"])
def test_from_a_file(
    db: str, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    path = tmp_path / name
    rows = [dict(row) for row in FILE_ROWS]
    if name.endswith(".jsonl"):
        rows[2] = {"session_id": COLD, "state": "ARCHIVED", "created_at": None}
    write_source(path, rows)
    code, out, err = lens(db, "--from-file", str(path), capsys=capsys)
    assert code == 0, err
    assert "imported       3\n" in out
    found = sessions(db)
    assert found[LIVE] == ("ACTIVE", at(0), at(1), None)
    assert found[GONE] == ("DELETED", at(0), at(2), at(2))  # deleted_at: its updated_at
    assert found[COLD][0] == "ARCHIVED"
    assert [(sid, trigger) for sid, _, _, trigger, _ in audit(db)] == [
        (LIVE, "import"),
        (GONE, "import"),
        (COLD, "import"),
    ]


def test_twice_adds_nothing_twice(
    db: str, foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    args = ("--from-database", foreign, "--query", QUERY, "--state-expression", STATUS_TO_STATE)
    assert lens(db, *args, capsys=capsys)[0] == 0
    # One of them is purged meanwhile: its audit trail still knows it.
    query(db, "DELETE FROM sessions WHERE id = $1", COLD)
    code, out, _ = lens(db, *args, capsys=capsys)
    assert code == 0
    assert "rows read      4\nimported       0\nalready known  4\n" in out
    assert len(sessions(db)) == 3
    counts = query(db, "SELECT trigger, count(*) FROM session_audit GROUP BY trigger")
    assert {row["trigger"]: row["count"] for row in counts} == {"import": 4, "sql": 1}


def test_json_lines_name_the_id_either_way(db: str, tmp_path: Path) -> None:
    path = tmp_path / "sessions.jsonl"
    write_source(
        path,
        [
            {"id": LIVE, "state": "ACTIVE"},
            {"session_id": GONE, "state": "DELETED"},
            {"id": None, "session_id": COLD, "state": "ARCHIVED"},
            {"id": PAUSED, "session_id": "exec_20250101_000000_0000000f", "state": "PAUSED"},
        ],
    )
    command, env = import_command(db, path)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rows read      4\nimported       4\nalready known  0\nrefused        0" in result.stdout
    assert {sid: row[0] for sid, row in sessions(db).items()} == {
        LIVE: "ACTIVE",
        GONE: "DELETED",
        COLD: "ARCHIVED",
        PAUSED: "PAUSED",  # a line with both: `id`, as for a table with both columns
    }


def test_bad_rows_are_reported_and_skipped(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    path = tmp_path / "sessions.csv"
    path.write_text(
        "id,status,created_at\n"
        f"{LIVE},live,2025-01-01T00:00:00Z\n"
        "exec_20251399_000000_00000001,live,\n"
        f'{GONE},"gone\n'
        f'for good",\n'
        f"{COLD},live,yesterday-ish\n"
        f"{PAUSED},live\n"
        "exec_20250101_000000_0000000a,live,2025-01-01 00:00\n"
        "exec_20250101_000000_0000000b,,2025-01-01 00:00\n"
    )
    code, out, err = lens(
        db, "--from-file", str(path), "--state-expression",
        "CASE status WHEN 'live' THEN 'ACTIVE' ELSE status END", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "rows read      7\nimported       2\nalready known  0\nrefused        5\n" in out
    refused = [line.strip() for line in out.splitlines() if line.startswith("  line ")]
    assert refused == [
        "line 3: 'exec_20251399_000000_00000001': invalid ID (calendar)",
        f"line 4: {GONE}: state 'gone\\nfor good' is not one of"
        " CREATING ACTIVE PAUSED STOPPED DELETED ARCHIVED",
        f"line 6: {COLD}: created_at 'yesterday-ish' is not a timestamp (ISO 8601)",
        "line 7: has 2 fields, the header 3",
        "line 9: exec_20250101_000000_0000000b: the state expression gave NULL",
    ]
    assert set(sessions(db)) == {LIVE, "exec_20250101_000000_0000000a"}


@pytest.mark.parametrize("name", ["sessions.csv", "sessions.jsonl"])
def test_times_that_are_not_times_are_refused(
    db: str, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """PostgreSQL reads `yesterday` or `epoch` as a time; an import must not."""
    ids = [f"exec_20251230_020944_0000000{n}" for n in range(8)]
    rows = [
        {"id": ids[0], "created_at": "2025-12-30T02:09:44Z"},
        {"id": ids[1], "created_at": "yesterday"},
        {"id": ids[2], "created_at": "now"},
        {"id": ids[3], "created_at": "epoch"},
        {"id": ids[4], "created_at": "infinity"},
        {"id": ids[5], "created_at": "2024-12-30T02:09:44Z"},  # a year before its ID
        {"id": ids[6], "created_at": "2025-12-30 13:00:00+01:00"},  # the same day: fine
        {"id": ids[7], "created_at": "2025-12-30T02:09:44Z", "updated_at": "tomorrow"},
    ]
    path = tmp_path / name
    write_source(path, [{"updated_at": None, **row} for row in rows])
    code, out, err = lens(db, "--from-file", str(path), capsys=capsys)
    assert code == 0, err
    assert "rows read      8\nimported       2\nalready known  0\nrefused        6\n" in out
    header = 1 if name.endswith(".csv") else 0  # the line of row n is n + 1 + header
    refused = [line.strip() for line in out.splitlines() if line.startswith("  line ")]
    assert refused == [
        f"line {n + 1 + header}: {ids[n]}: {why}"
        for n, why in [
            (1, "created_at 'yesterday' is not a timestamp (ISO 8601)"),
            (2, "created_at 'now' is not a timestamp (ISO 8601)"),
            (3, "created_at 'epoch' is not a timestamp (ISO 8601)"),
            (4, "created_at 'infinity' is not a timestamp (ISO 8601)"),
            (
                5,
                "created_at '2024-12-30T02:09:44Z' is more than a day off the time the ID"
                " was minted (2025-12-30 02:09:44)",
            ),
            (7, "updated_at 'tomorrow' is not a timestamp (ISO 8601)"),
        ]
    ]
    found = sessions(db)
    assert set(found) == {ids[0], ids[6]}
    assert found[ids[0]][1] == datetime(2025, 12, 30, 2, 9, 44, tzinfo=UTC)
    assert found[ids[6]][1] == datetime(2025, 12, 30, 12, 0, tzinfo=UTC)


def test_a_store_s_special_values_are_refused_too(
    db: str, foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """A timestamp column may hold `infinity`; a text column may hold `epoch`."""
    infinite, far, spoken = (f"exec_20250101_000000_0000001{n}" for n in range(3))

    async def more() -> None:
        conn = await asyncpg.connect(foreign)
        try:
            await conn.execute("ALTER TABLE service_sessions ADD COLUMN said text")
            await conn.execute(
                "INSERT INTO service_sessions (session_key, status, born, said) VALUES"
                " ($1, 'live', 'infinity', NULL), ($2, 'live', '2024-01-01', NULL),"
                " ($3, 'live', NULL, 'epoch')",
                infinite,
                far,
                spoken,
            )
        finally:
            await conn.close()

    asyncio.run(more())
    code, out, err = lens(
        db, "--from-database", foreign, "--state-expression", STATUS_TO_STATE, "--query",
        "SELECT session_key AS id, status, coalesce(born::text, said) AS created_at"
        " FROM service_sessions ORDER BY session_key",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "rows read      7\nimported       4\nalready known  0\nrefused        3\n" in out
    refused = [line.strip() for line in out.splitlines() if line.startswith("  row ")]
    assert refused == [
        f"row 5: {infinite}: created_at 'infinity' is not a timestamp (ISO 8601)",
        f"row 6: {far}: created_at '2024-01-01 00:00:00' is more than a day off the time the"
        " ID was minted (2025-01-01 00:00:00)",
        f"row 7: {spoken}: created_at 'epoch' is not a timestamp (ISO 8601)",
    ]


def test_a_time_given_in_another_zone_is_checked_against_the_ids_zone(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """IDs minted in Tokyo: 09:00 there is midnight UTC, so 2025-12-29 00:30 UTC is fine."""
    path = tmp_path / "sessions.csv"
    path.write_text(
        "id,created_at\n"
        "exec_20251230_090000_00000001,2025-12-29T00:30:00Z\n"
        "exec_20251230_090000_00000002,2025-12-28T23:00:00Z\n"
    )
    code = main(
        ["import", "--database-url", db, "--lifecycle-source", "observed",
         "--id-timezone", "Asia/Tokyo", "--from-file", str(path)],
        environ={},
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "imported       1\n" in out
    assert (
        "line 3: exec_20251230_090000_00000002: created_at '2025-12-28T23:00:00Z' is more than"
        " a day off the time the ID was minted (2025-12-30 09:00:00)"
    ) in out


def test_a_row_the_state_expression_cannot_take(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    path = tmp_path / "sessions.jsonl"
    path.write_text(
        json.dumps({"id": LIVE, "level": "1"}) + "\n\n"
        + json.dumps({"id": GONE, "level": "x"}) + "\n"
        + "{not json\n"
        + json.dumps({"id": COLD, "level": "4"}) + "\n"
    )  # fmt: skip
    code, out, err = lens(
        db, "--from-file", str(path), "--state-expression",
        "CASE WHEN level::int > 3 THEN 'ARCHIVED' ELSE 'ACTIVE' END", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "rows read      4\nimported       2\n" in out
    assert f"  line 3: {GONE}: the state expression failed: invalid input syntax" in out
    assert "  line 4: not JSON: " in out
    assert {sid: row[0] for sid, row in sessions(db).items()} == {
        LIVE: "ACTIVE",
        COLD: "ARCHIVED",
    }


def test_dry_run_changes_nothing(
    db: str, foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    code, out, err = lens(
        db, "--from-database", foreign, "--query", QUERY, "--state-expression", STATUS_TO_STATE,
        "--dry-run", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "would import   4\n" in out and "dry run: nothing was changed" in out
    assert sessions(db) == {}
    assert audit(db) == []


def test_database_mode_is_refused(db: str, tmp_path: Path) -> None:
    path = tmp_path / "sessions.csv"
    write_source(path, FILE_ROWS)
    result = subprocess.run(
        [sys.executable, "-m", "session_lens", "import", "--from-file", str(path),
         "--database-url", db],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("SESSION_LENS_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("session-lens: import is for observed mode")
    assert "Traceback" not in result.stderr
    assert sessions(db) == {}


def test_usage_and_runtime_errors_are_one_line(
    db: str, foreign: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    path = tmp_path / "sessions.csv"
    path.write_text("key,state\nexec_20250101_000000_00000001,ACTIVE\n")
    code, _, err = lens(db, "--from-file", str(path), capsys=capsys)
    assert (code, err.strip()) == (
        2,
        "session-lens: the source has no id or session_id column (it has: key, state)",
    )
    code, _, err = lens(db, "--from-file", str(tmp_path / "sessions.txt"), capsys=capsys)
    assert code == 2 and "--format csv|jsonl" in err
    code, _, err = lens(
        db, "--from-database", foreign, "--query", QUERY, "--state-expression", "colour",
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and 'column "colour" does not exist' in err
    code, out, err = lens(
        db, "--from-database", "postgresql://lens:hunter2@127.0.0.1:1/x", "--query", QUERY,
        capsys=capsys,
    )  # fmt: skip
    assert code == 1
    assert err.strip().startswith("session-lens: cannot connect to postgresql://lens:***@")
    assert "hunter2" not in out + err and "Traceback" not in err


ROWS = 60_000
PAGE = 1_000


def import_command(db: str, path: Path) -> tuple[list[str], dict[str, str]]:
    """`session-lens import` of a file in pages of PAGE, and an environment free of settings."""
    command = [
        sys.executable, "-m", "session_lens", "import", "--from-file", str(path),
        "--page-size", str(PAGE), "--database-url", db, "--lifecycle-source", "observed",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_LENS_")}
    return command, env


async def until_pages(
    conn: asyncpg.Connection, process: "subprocess.Popen[Any]", pages: int
) -> None:
    """Wait until the running import has committed `pages` pages."""
    deadline = time.monotonic() + 60
    while await conn.fetchval("SELECT count(*) FROM sessions") < pages * PAGE:
        assert process.poll() is None, "the import ended too soon"
        assert time.monotonic() < deadline, "no page was committed"
        await asyncio.sleep(0.02)


async def test_interrupted_and_resumed(db: str, tmp_path: Path) -> None:
    path = tmp_path / "sessions.csv"
    with path.open("w") as handle:
        handle.write("id,state,updated_at\n")
        for n in range(ROWS):
            handle.write(f"exec_20250101_000000_{n:08x},ACTIVE,2025-01-01 00:00:00\n")
    command, env = import_command(db, path)
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
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert f"imported       {ROWS - cut:,}\nalready known  {cut:,}\n" in done.stdout
        assert await conn.fetchval("SELECT count(*) FROM sessions") == ROWS
        assert await conn.fetchval(
            "SELECT count(DISTINCT session_id) FILTER (WHERE trigger = 'import') = $1"
            " AND count(*) = $1 FROM session_audit",
            ROWS,
        )
    finally:
        await conn.close()


async def test_the_store_going_away_stops_the_import_clearly(db: str, tmp_path: Path) -> None:
    path = tmp_path / "sessions.csv"
    path.write_text("id\n" + "".join(f"exec_20250101_000000_{n:08x}\n" for n in range(ROWS)))
    command, env = import_command(db, path)
    conn = await asyncpg.connect(db)
    try:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        await until_pages(conn, process, 2)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        out, err = await asyncio.to_thread(process.communicate, timeout=30)
        assert process.returncode == 1, err[-2000:]
        said = [line for line in err.splitlines() if line.startswith("session-lens: ")]
        assert len(said) == 1, err[-3000:]
        [message] = said
        assert message.startswith("session-lens: lost the lifecycle store postgresql://")
        assert message.endswith("pages before it are committed")
        assert "Traceback" not in err
        kept = await conn.fetchval("SELECT count(*) FROM sessions")
        assert kept % PAGE == 0 and f"imported       {kept:,}\n" in out
    finally:
        await conn.close()


async def test_misses_after_import_carry_evidence(
    db: str, foreign: str, missing: Upstream, make_proxy: MakeProxy
) -> None:
    code = await asyncio.to_thread(
        main,
        ["import", "--database-url", db, "--lifecycle-source", "observed", "--from-database",
         foreign, "--query", QUERY, "--state-expression", STATUS_TO_STATE],
        {},
    )  # fmt: skip
    assert code == 0
    proxy = await make_proxy(missing.url, database_url=db, lifecycle_source="observed")

    async def reason(path: str) -> str:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + path) as response:
            assert response.status == 404
            return response.headers["X-Session-Not-Found-Reason"]

    assert await reason(f"/api/sessions/{GONE}?include_deleted=true") == "deleted_not_served"
    assert await reason(f"/api/sessions/{GONE}") == "deleted"
    assert await reason(f"/api/sessions/{LIVE}") == "upstream_inconsistent"
    assert await reason(f"/api/sessions/{COLD}") == "archived"
    # Not in the store when it was imported, minted before recording began: it may have
    # been deleted before anyone watched, so there is no evidence either way.
    assert await reason("/api/sessions/exec_20250101_000000_000000ff") == "predates_tracking"
