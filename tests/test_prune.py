"""Audit retention: the horizon moved first, only older evidence removed, answers kept true."""

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from session_lens.config import Config, load_config
from session_lens.evidence.retention import Period
from session_lens.metrics import Metrics
from session_lens.operate import run_prune
from session_lens.recorder import Event, Recorder
from session_lens.routes import Action

from .conftest import TRACKED_SINCE, MakeProxy, ProxyUnderTest, Upstream

GONE = "exec_20251230_020944_4ad060d9"  # created and purged long ago
LATE = "exec_20251230_020944_0000beef"  # created long ago, purged just now
KEPT = "exec_20251230_020944_0000cafe"  # created long ago, still there
LONG_AGO = datetime(2026, 1, 10, tzinfo=UTC)
CLI = [sys.executable, "-m", "session_lens"]


async def written_at(conn: asyncpg.Connection, moment: datetime, *statements: str) -> None:
    """Run statements whose audit entries are stamped `moment`, as a late writer would."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('session_lens.occurred_at', $1, true)", str(moment))
        for statement in statements:
            await conn.execute(statement)


async def histories(conn: asyncpg.Connection) -> None:
    """Three sessions minted 2025-12-30: purged long ago, purged just now, still there."""
    await written_at(
        conn,
        LONG_AGO,
        f"INSERT INTO sessions (id) VALUES ('{GONE}'), ('{LATE}'), ('{KEPT}')",
        f"DELETE FROM sessions WHERE id = '{GONE}'",
    )
    await conn.execute(f"UPDATE sessions SET state = 'STOPPED' WHERE id = '{LATE}'")
    await conn.execute(f"DELETE FROM sessions WHERE id = '{LATE}'")


def config(db: str, **settings: str) -> Config:
    return load_config(flags={"database_url": db, **settings}, need_upstream=False)


async def prune(db: str, period: str, **options: Any) -> tuple[int, str]:
    """`session-lens prune` as the CLI runs it; the exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    options.setdefault("batch_size", 2)  # several batches even for a few entries
    code = await run_prune(config(db), Period.parse(period), out=out, err=err, **options)
    return code, out.getvalue()


async def tracking(conn: asyncpg.Connection) -> asyncpg.Record:
    return await conn.fetchrow("SELECT pruned_before, horizon FROM session_lens_tracking")


async def audit(conn: asyncpg.Connection) -> list[tuple[str, str | None, datetime]]:
    rows = await conn.fetch(
        "SELECT session_id, new_state, occurred_at FROM session_audit ORDER BY id"
    )
    return [tuple(row) for row in rows]


async def test_older_entries_go_newer_stay_and_the_horizon_moves_first(
    conn: asyncpg.Connection, db: str
) -> None:
    await histories(conn)
    everything = await audit(conn)
    assert len(everything) == 6
    old = [entry for entry in everything if entry[2] == LONG_AGO]
    assert len(old) == 4

    before = datetime.now(UTC)
    code, out = await prune(db, "30d")
    after = datetime.now(UTC)
    assert code == 0
    assert await audit(conn) == [entry for entry in everything if entry not in old]
    pruned_before, horizon = await tracking(conn)
    assert before - timedelta(days=30) <= pruned_before <= after - timedelta(days=30)
    assert horizon == pruned_before  # later than the migration's 2025-01-01
    assert f"horizon   {TRACKED_SINCE} -> {horizon}" in out
    assert "removed   4 audit entries and 0 observed events" in out
    assert "took" in out

    # A longer period does not move it back; a shorter one moves it on.
    code, out = await prune(db, "1y")
    assert code == 0
    assert await tracking(conn) == (pruned_before, horizon)
    assert "removed   0 audit entries" in out and f"{horizon} (unchanged)" in out
    await prune(db, "1d")
    assert (await tracking(conn))["pruned_before"] > pruned_before + timedelta(days=28)
    assert len(await audit(conn)) == 2


async def reason(proxy: ProxyUnderTest, session_id: str) -> str:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/api/sessions/{session_id}") as response,
    ):
        assert response.status == 404
        return response.headers["X-Session-Not-Found-Reason"]


async def test_a_trail_pruned_whole_predates_tracking_a_newer_purge_stays_purged(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    await histories(conn)
    proxy = await make_proxy(missing.url, database_url=db, classification_budget="2s")
    assert await reason(proxy, GONE) == "purged"
    assert await reason(proxy, LATE) == "purged"

    assert (await prune(db, "30d"))[0] == 0
    # No evidence left of GONE, and it was minted before the horizon: nothing can be said.
    assert await reason(proxy, GONE) == "predates_tracking"
    assert await reason(proxy, LATE) == "purged"  # its purge is newer than the cut-off
    assert await reason(proxy, "exec_20251230_020944_00000bad") == "predates_tracking"
    moment = datetime.now(UTC) - timedelta(days=1)
    assert await reason(proxy, f"exec_{moment:%Y%m%d_%H%M%S}_00000bad") == "never_existed"


async def test_the_database_still_refuses_every_other_delete(
    conn: asyncpg.Connection, db: str
) -> None:
    await histories(conn)
    assert (await prune(db, "30d"))[0] == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute("DELETE FROM session_audit")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="older than the horizon"):
        async with conn.transaction():
            await conn.execute("SET LOCAL session_lens.pruning = 'on'")
            await conn.execute(f"DELETE FROM session_audit WHERE session_id = '{LATE}'")
    assert len(await audit(conn)) == 2
    # What lies before the horizon, and only that, may go with pruning said.
    await written_at(conn, LONG_AGO, f"INSERT INTO sessions (id) VALUES ('{GONE}')")
    async with conn.transaction():
        await conn.execute("SET LOCAL session_lens.pruning = 'on'")
        removed = await conn.execute(f"DELETE FROM session_audit WHERE occurred_at = '{LONG_AGO}'")
    assert removed == "DELETE 1"


async def test_dry_run_counts_and_changes_nothing(conn: asyncpg.Connection, db: str) -> None:
    await histories(conn)
    everything = await audit(conn)
    code, out = await prune(db, "30d", dry_run=True)
    assert code == 0
    assert out.startswith("cut-off   ")
    assert f"horizon   {TRACKED_SINCE} -> " in out and "(would move)" in out
    assert "would remove 4 audit entries and 0 observed events" in out
    assert "nothing changed" in out
    assert await audit(conn) == everything
    assert await tracking(conn) == (None, TRACKED_SINCE)
    indexes = await conn.fetchval(
        "SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%occurred_at_idx'"
    )
    assert indexes == 0


async def test_an_index_build_cut_short_is_built_again(conn: asyncpg.Connection, db: str) -> None:
    await histories(conn)
    # A failed concurrent build leaves an INVALID index behind, as an interrupted one does.
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "CREATE UNIQUE INDEX CONCURRENTLY session_audit_occurred_at_idx"
            " ON session_audit (session_id)"
        )
    assert (await prune(db, "30d"))[0] == 0
    index = await conn.fetchrow(
        "SELECT indisvalid, pg_get_indexdef(indexrelid) AS def FROM pg_index"
        " WHERE indexrelid = 'session_audit_occurred_at_idx'::regclass"
    )
    assert index["indisvalid"]
    assert index["def"].endswith("USING btree (occurred_at, id)")
    assert len(await audit(conn)) == 2


async def test_observed_events_older_than_the_cut_off_go_and_are_not_applied_again(
    db: str, tmp_path: Path
) -> None:
    settings = {"lifecycle_source": "observed", "spool_dir": str(tmp_path / "spool")}
    old = [
        Event("a" * 32, GONE, Action.CREATE, True, LONG_AGO.timestamp(), "r1"),
        Event("b" * 32, GONE, Action.PURGE, True, LONG_AGO.timestamp() + 60, "r2"),
    ]
    recent = Event.new(KEPT, Action.CREATE, "r3")
    recorder = Recorder(config(db, **settings), Metrics(CollectorRegistry(), ()), db)
    await recorder.start()
    for event in [*old, recent]:
        recorder.record(event)
    await asyncio.wait_for(recorder.drained(), 10)
    await recorder.stop()

    conn = await asyncpg.connect(db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM session_lens_events") == 3
        out, err = io.StringIO(), io.StringIO()
        code = await run_prune(
            config(db, **settings), Period.parse("30d"), batch_size=1, out=out, err=err
        )
        assert code == 0
        assert "removed   2 audit entries and 2 observed events" in out.getvalue()
        events = await conn.fetch("SELECT session_id FROM session_lens_events")
        assert [row["session_id"] for row in events] == [KEPT]

        # The creation replayed from a spool long after: its record of having been
        # applied is gone, and applying it again would bring the purged session back.
        spool = tmp_path / "replay"
        spool.mkdir()
        (spool / "events.jsonl").write_bytes(old[0].line())
        registry = CollectorRegistry()
        replay = config(db, lifecycle_source="observed", spool_dir=str(spool))
        recorder = Recorder(replay, Metrics(registry, ()), db)
        await recorder.start()
        await asyncio.wait_for(recorder.drained(), 10)
        await recorder.stop()
        labels = {"action": "create", "result": "before_horizon"}
        assert registry.get_sample_value("session_lens_lifecycle_events_total", labels) == 1
        assert await conn.fetchval("SELECT count(*) FROM sessions WHERE id = $1", GONE) == 0
        assert (
            await conn.fetchval("SELECT count(*) FROM session_audit WHERE session_id = $1", GONE)
            == 0
        )
    finally:
        await conn.close()


# --- the command line, as an operator runs it -------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_LENS_")}
    return subprocess.run(
        [*CLI, "prune", *args], capture_output=True, text=True, timeout=60, env=environ
    )


def test_bad_periods_and_a_database_down_are_one_line_each() -> None:
    for period, complaint in [
        ("90 fortnights", "is not a retention period"),
        ("99999y", "reaches back before the year 1"),
    ]:
        result = cli("--older-than", period, "--database-url", "postgresql://x@127.0.0.1:1/x")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and complaint in result.stderr
        assert result.stderr.startswith("session-lens: --older-than: ")
    result = cli("--older-than", "90d", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot connect" in result.stderr


async def many_old_entries(db: str, count: int) -> None:
    conn = await asyncpg.connect(db)
    try:
        await written_at(
            conn,
            LONG_AGO,
            "INSERT INTO sessions (id) SELECT 'exec_20251230_020944_' || lpad(to_hex(g), 8, '0')"
            f" FROM generate_series(1, {count}) AS g",
        )
    finally:
        await conn.close()


async def count_audit(db: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM session_audit"))
    finally:
        await conn.close()


async def test_interrupted_it_says_how_far_it_got_and_a_rerun_finishes(db: str) -> None:
    entries = 20_000
    await many_old_entries(db, entries)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_LENS_")}
    args = ["prune", "--older-than", "30d", "--batch-size", "10", "--database-url", db]
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ
    )
    deadline = time.monotonic() + 30
    while await count_audit(db) > entries - 500:  # well into the batches
        assert process.returncode is None, "it finished before it could be interrupted"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, err
    said = err.decode().replace("\r", "\n").strip().splitlines()[-1]
    assert said.startswith("session-lens: interrupted while removing audit entries: the horizon")
    assert "run it again to continue" in said
    assert b"Traceback" not in err
    left = await count_audit(db)
    assert 0 < left < entries - 500

    result = await asyncio.to_thread(cli, *args[1:])
    assert result.returncode == 0, result.stderr
    assert f"removed   {left:,} audit entries" in result.stdout
    assert await count_audit(db) == 0


async def test_older_than_takes_durations_as_every_setting_does(db: str) -> None:
    conn = await asyncpg.connect(db)
    try:
        for minutes, session_id in ((60, "exec_20251230_020944_000000a1"),
                                    (10, "exec_20251230_020944_000000a2")):  # fmt: skip
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('session_lens.occurred_at',"
                    " (now() - make_interval(mins => $1))::text, true)",
                    minutes,
                )
                await conn.execute(
                    "INSERT INTO sessions (id, state) VALUES ($1, 'ACTIVE')", session_id
                )
        result = await asyncio.to_thread(cli, "--older-than", "30m", "--database-url", db)
        assert result.returncode == 0, result.stderr
        assert "(older than 1800 s)" in result.stdout
        left = await conn.fetch("SELECT session_id FROM session_audit ORDER BY session_id")
        assert [row["session_id"] for row in left] == ["exec_20251230_020944_000000a2"]
    finally:
        await conn.close()
