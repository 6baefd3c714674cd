"""`session-lens migrate` on a live table: the service reads and writes all along.

Each test runs the real command in a process of its own against a table of the
service's own shape (tests/live_service.py), while the service's calls are timed.
"""

import asyncio
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from session_lens.migrations import migrate, plan
from session_lens.schema import Tables

from .live_service import FIRST_MINTED, SPACING, Service, create_legacy, legacy_id

MARGIN = 1.0
"""What a call may take beyond the lock timeout on a busy shared machine."""


class Migrate:
    """`session-lens migrate` in a process of its own, its output read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.err: list[str] = []
        self.out = ""
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None and self.process.stdout is not None
        async for line in self.process.stderr:
            self.err.append(line.decode())
        self.out = (await self.process.stdout.read()).decode()

    @property
    def said(self) -> str:
        return "".join(self.err)

    async def exited(self, timeout: float = 120) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await self._reading
        return code


async def start_migrate(url: str, *args: str) -> Migrate:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_lens", "migrate", "--database-url", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    return Migrate(process)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    """Poll `check` until it holds; the state polled is another process's."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def check_complete(conn: asyncpg.Connection) -> None:
    """The model is whole: constraints valid, the index valid, one first entry per session."""
    valid = await conn.fetchrow(
        "SELECT (SELECT convalidated FROM pg_constraint WHERE conname = 'session_lens_state_check')"
        "  AS checked,"
        " (SELECT bool_and(attnotnull) FROM pg_attribute WHERE attrelid = 'sessions'::regclass"
        "  AND attname IN ('state', 'created_at', 'updated_at')) AS not_null,"
        " (SELECT indisvalid FROM pg_index"
        "  WHERE indexrelid = 'session_lens_state_idx'::regclass) AS indexed,"
        " (SELECT count(*) FROM pg_constraint WHERE conrelid = 'sessions'::regclass"
        "  AND conname LIKE 'session_lens_%_not_null') AS helpers"
    )
    assert tuple(valid) == (True, True, True, 0)
    # Every row: exactly one entry that brought it into the model.
    wrong = await conn.fetchval(
        "SELECT count(*) FROM sessions AS s WHERE (SELECT count(*) FROM session_audit AS a"
        " WHERE a.session_id = s.id AND a.old_state IS NULL AND a.new_state IS NOT NULL) <> 1"
    )
    assert wrong == 0
    twice = await conn.fetchval(
        "SELECT count(*) FROM (SELECT session_id FROM session_audit"
        " WHERE old_state IS NULL AND new_state IS NOT NULL GROUP BY 1 HAVING count(*) > 1) AS d"
    )
    assert twice == 0


async def test_a_live_service_keeps_working_while_its_table_is_migrated(empty_db: str) -> None:
    rows = 300_000
    conn = await asyncpg.connect(empty_db)
    try:
        await create_legacy(conn, rows)
        service = Service(empty_db, rows, reads_per_second=100, writes_per_second=50)
        await service.start()
        await asyncio.sleep(1)
        service.phase = "during"
        started = datetime.now(UTC)
        run = await start_migrate(
            empty_db, "--lock-timeout", "500ms", "--batch-size", "5000", "--batch-pause", "10ms"
        )
        code = await run.exited(timeout=300)
        service.phase = "after"
        await asyncio.sleep(1)
        await service.stop()
        assert code == 0, run.said
        # The service's rows, and those it inserted before the triggers were in place.
        backfilled = re.search(r"; (\d+) rows backfilled in", run.out)
        assert backfilled and int(backfilled[1]) >= rows - len(service.written.deleted), run.out

        assert service.reads.errors == [] and service.writes.errors == []
        assert service.reads.latencies["during"] and service.writes.latencies["during"]
        assert service.reads.worst() < 0.5 + MARGIN, service.reads.worst()
        assert service.writes.worst() < 0.5 + MARGIN, service.writes.worst()

        await check_complete(conn)
        written = service.written
        deleted = set(written.deleted)
        # The service's rows: dated by their IDs, their one entry the migration's.
        legacy = await conn.fetch(
            "SELECT s.id, s.state, s.created_at, s.updated_at, a.trigger, a.occurred_at"
            " FROM sessions AS s JOIN session_audit AS a ON a.session_id = s.id"
            " WHERE s.owner <> 'writer'"
        )
        assert len(legacy) == rows - len(deleted)
        for row in legacy:
            n = int(row["id"][-8:], 16)
            minted = FIRST_MINTED + n * SPACING
            assert (row["state"], row["trigger"]) == ("ACTIVE", "migration"), row
            assert row["created_at"] == row["updated_at"] == row["occurred_at"] == minted, row
        # Rows written during the run: each in the model, with one first entry.
        inserted = await conn.fetch(
            "SELECT s.id, s.state, (SELECT count(*) FROM session_audit AS a"
            " WHERE a.session_id = s.id) AS entries FROM sessions AS s WHERE s.owner = 'writer'"
        )
        assert len(inserted) == len(written.inserted)
        assert all(r["state"] == "ACTIVE" and r["entries"] == 1 for r in inserted)
        # Tracking began when the triggers were in place: every entry they wrote is after it.
        horizon = await conn.fetchval("SELECT horizon FROM session_lens_tracking")
        first_by_trigger = await conn.fetchval(
            "SELECT min(occurred_at) FROM session_audit WHERE trigger = 'sql'"
        )
        assert started < horizon <= first_by_trigger
        # A deleted legacy row: never two entries of its end; none when it went before tracking.
        ends = dict(
            await conn.fetch(
                "SELECT session_id, count(*) FROM session_audit"
                " WHERE new_state IS NULL AND session_id = ANY($1::text[]) GROUP BY 1",
                list(deleted),
            )
        )
        assert all(count == 1 for count in ends.values())
    finally:
        await conn.close()


async def test_a_long_transaction_holding_the_table_is_waited_out(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    holder = await asyncpg.connect(empty_db)
    reader = await asyncpg.connect(empty_db)
    try:
        await create_legacy(conn, 1_000)
        holding = holder.transaction()
        await holding.start()
        await holder.fetchval("SELECT count(*) FROM sessions")  # ACCESS SHARE until it ends
        holder_pid = holder.get_server_pid()
        run = await start_migrate(empty_db, "--lock-timeout", "300ms")
        waits = []
        while run.said.count("not granted") < 3:
            assert run.process.returncode is None, run.said
            began = asyncio.get_running_loop().time()
            await reader.fetchrow("SELECT * FROM sessions WHERE id = $1", legacy_id(7))
            waits.append(asyncio.get_running_loop().time() - began)
            await asyncio.sleep(0.01)
        # The service's other queries were never queued behind the ALTER for long.
        assert max(waits) < 0.3 + MARGIN, max(waits)
        assert f"held by pid {holder_pid} (idle in transaction" in run.said
        assert "trying again in" in run.said
        await holding.commit()
        assert await run.exited() == 0, run.said
        assert "1000 rows backfilled" in run.out
        await check_complete(conn)
    finally:
        for c in (conn, holder, reader):
            await c.close()


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL, "twice"])
async def test_stopped_half_way_the_rerun_finishes(
    empty_db: str, how: signal.Signals | str
) -> None:
    # Twice: the batches long, so that the second signal comes while one runs.
    rows, batch = 200_000, 20_000 if how == "twice" else 2_000
    conn = await asyncpg.connect(empty_db)
    try:
        await create_legacy(conn, rows)
        run = await start_migrate(
            empty_db, "--batch-size", str(batch), "--batch-pause", "20ms", "--lock-timeout", "1s"
        )

        async def backfilling() -> bool:
            assert run.process.returncode is None, run.said
            if await conn.fetchval("SELECT to_regclass('session_audit')") is None:
                return False
            done = await conn.fetchval("SELECT count(*) FROM session_audit")
            return bool(done >= 40_000)

        await until(backfilling)
        if how == "twice":  # Ctrl-C, and again before the batch is done: at once
            run.process.send_signal(signal.SIGINT)
            await asyncio.sleep(0.02)  # a batch takes longer
            run.process.send_signal(signal.SIGINT)
        else:
            run.process.send_signal(how)
        code = await run.exited(timeout=60)
        done = await conn.fetchval("SELECT count(*) FROM session_audit")
        given = await conn.fetchval("SELECT count(state) FROM sessions")
        assert done == given and done % batch == 0 and done < rows  # whole batches, committed
        if how == signal.SIGKILL:
            assert code == -signal.SIGKILL
        elif how == "twice":
            assert code == 130, run.said
            # The first may come between batches, so the run stops before the second comes:
            # that one, with nothing left to stop, is ignored.
            at_once = (
                "stopped at once: the batch or step in flight was rolled back, everything before"
                " it is kept; run `session-lens migrate` again to continue"
            )
            assert at_once in run.said or f"stopped: {done:,} of {rows:,} rows" in run.said
            assert "again to stop at once" in run.said and "Traceback" not in run.said
        else:
            assert code == 130, run.said
            assert re.search(
                rf"stopped: {done:,} of {rows:,} rows backfilled, each batch committed;"
                r" run `session-lens migrate` again to continue where it stopped",
                run.said,
            ), run.said
        found = await plan(conn, Tables())
        assert not found.pending and [s.name for s in found.unfinished][:2] == [
            "backfill",
            "constraints added",
        ]
        again = await start_migrate(empty_db, "--batch-size", str(batch))
        assert await again.exited() == 0, again.said
        assert f"{rows - done} rows backfilled" in again.out
        await check_complete(conn)
        assert await conn.fetchval("SELECT count(*) FROM session_audit") == rows
    finally:
        await conn.close()


async def test_not_null_is_set_without_a_scan(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await create_legacy(conn, 1_000)
        said: list[str] = []
        await conn.execute("SET client_min_messages = debug1")
        conn.add_log_listener(lambda _, message: said.append(message.message))
        await migrate(conn, Tables())
        proved = [m for m in said if "are sufficient to prove that it does not contain nulls" in m]
        assert sorted(re.findall(r'"sessions\.(\w+)"', " ".join(proved))) == [
            "created_at",
            "state",
            "updated_at",
        ]
    finally:
        await conn.close()


async def test_an_index_left_invalid_is_rebuilt(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await create_legacy(conn, 100)
        await migrate(conn, Tables())
        # A build that failed half-way leaves its index behind, invalid.
        await conn.execute("DROP INDEX session_lens_state_idx")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY session_lens_state_idx ON sessions (state)"
            )
        assert not await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'session_lens_state_idx'::regclass"
        )
        found = await plan(conn, Tables())
        assert [s.name for s in found.unfinished] == [
            "index rebuilt (an interrupted build left it invalid)"
        ]
        run = await start_migrate(empty_db)
        assert await run.exited() == 0, run.said
        assert run.out == "finished; 0 rows backfilled\n"
        index = await conn.fetchrow(
            "SELECT indisvalid, indisunique FROM pg_index"
            " WHERE indexrelid = 'session_lens_state_idx'::regclass"
        )
        assert tuple(index) == (True, False)
        await check_complete(conn)
    finally:
        await conn.close()


async def _explain(url: str, session_id: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_lens", "explain", session_id, "--database-url", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_existing_rows_keep_their_age(empty_db: str) -> None:
    year_ago = (datetime.now(UTC) - timedelta(days=365)).replace(microsecond=0)
    old = f"exec_{year_ago:%Y%m%d_%H%M%S}_0000a0a0"
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(
            "CREATE TABLE sessions (id text PRIMARY KEY, started timestamptz, kind text)"
        )
        await conn.execute("INSERT INTO sessions VALUES ($1, $2, 'x')", old, year_ago)
        run = await start_migrate(empty_db)
        assert await run.exited() == 0, run.said
        row = await conn.fetchrow("SELECT created_at, updated_at FROM sessions")
        assert tuple(row) == (year_ago, year_ago)
        # Right after the migration, a miss on it is the service's, not a change too recent.
        said = await _explain(empty_db, old)
        assert "a miss now would be: upstream_inconsistent" in said, said
        assert f"created   {year_ago:%Y-%m-%d %H:%M:%S}" in said, said
    finally:
        await conn.close()


async def test_the_configured_creation_column_is_taken_and_checked(empty_db: str) -> None:
    minted = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    ids = [f"exec_{minted:%Y%m%d_%H%M%S}_0000000{n}" for n in range(4)]
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(
            "CREATE TABLE sessions (id text PRIMARY KEY, started text, touched timestamptz)"
        )
        await conn.executemany(
            "INSERT INTO sessions VALUES ($1, $2, $3)",
            [
                (ids[0], "2025-06-01T12:00:05Z", datetime(2025, 6, 3, tzinfo=UTC)),
                (ids[1], "yesterday", None),  # PostgreSQL would read it as a time: refused
                (ids[2], "2024-06-01T12:00:00Z", None),  # a year off its ID: refused
                (ids[3], None, None),
            ],
        )
        run = await start_migrate(
            empty_db, "--backfill-created-at", "started", "--backfill-updated-at", "touched"
        )
        assert await run.exited() == 0, run.said
        found = dict(
            (r["id"], (r["created_at"], r["updated_at"]))
            for r in await conn.fetch("SELECT id, created_at, updated_at FROM sessions")
        )
        assert found[ids[0]] == (minted + timedelta(seconds=5), datetime(2025, 6, 3, tzinfo=UTC))
        assert found[ids[1]] == (minted, minted)
        assert found[ids[2]] == (minted, minted)
        assert found[ids[3]] == (minted, minted)
        assert (
            "backfill: 2 rows' given timestamps refused (not a time, or more than a day off the"
            f" ID's minted time): dated by their IDs instead, e.g. {ids[1]}, {ids[2]}"
        ) in run.said
    finally:
        await conn.close()


async def test_dry_run_shows_each_step_its_lock_and_the_batches(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await create_legacy(conn, 25_000)
    finally:
        await conn.close()
    run = await start_migrate(empty_db, "--dry-run", "--batch-size", "10000")
    assert await run.exited() == 0, run.said
    out = run.out
    assert "-- migration 001 lifecycle: one transaction, lock_timeout 2s" in out
    for step, lock in [
        ("tracking", "ACCESS EXCLUSIVE, milliseconds: defaults and triggers, no rewrite"),
        ("constraints added", "ACCESS EXCLUSIVE, milliseconds: NOT VALID, no scan"),
        ("constraint validated", "SHARE UPDATE EXCLUSIVE while it scans"),
        ("NOT NULL", "ACCESS EXCLUSIVE, milliseconds: the validated CHECKs spare the scan"),
        ("index", "SHARE UPDATE EXCLUSIVE while it builds"),
    ]:
        assert f"-- step {step}: " in out and f"locks public.sessions: {lock}" in out, step
    assert "-- step backfill: 25000 rows in 3 batches of 10000, each its own transaction" in out
    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS session_lens_state_idx" in out
    assert (
        out.index("-- step tracking") < out.index("-- step backfill") < out.index("-- step index")
    )
