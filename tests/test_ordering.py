"""Many recorders, one truth: event time decides, and refusals are judged by their kind."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from session_lens.config import load_config
from session_lens.metrics import Metrics
from session_lens.migrations import migrate
from session_lens.recorder import Event, Recorder
from session_lens.routes import Action
from session_lens.schema import Tables

SID = "exec_20251230_020944_4ad060d9"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()


def event(action: Action, second: float, session_id: str = SID, ok: bool = True) -> Event:
    """An event that happened `second` seconds after T0."""
    return Event(uuid.uuid4().hex, session_id, action, ok, T0 + second, "r")


class Recorders:
    """Recorders of one store, each with a spool of its own, as replicas have."""

    def __init__(self, db: str, tmp_path: Path) -> None:
        self.db = db
        self.tmp_path = tmp_path
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, ())
        self.started: list[Recorder] = []

    async def start(self, dsn: str | None = None) -> Recorder:
        config = load_config(
            flags={
                "database_url": dsn or self.db,
                "lifecycle_source": "observed",
                "spool_dir": str(self.tmp_path / f"spool-{len(self.started)}"),
            },
            need_upstream=False,
        )
        recorder = Recorder(config, self.metrics, dsn or self.db)
        await recorder.start()
        self.started.append(recorder)
        return recorder

    def count(self, result: str) -> float:
        return sum(
            self.registry.get_sample_value(
                "session_lens_lifecycle_events_total", {"action": a.value, "result": result}
            )
            or 0.0
            for a in Action
        )


@pytest.fixture
async def recorders(db: str, tmp_path: Path) -> AsyncIterator[Recorders]:
    made = Recorders(db, tmp_path)
    yield made
    for recorder in made.started:
        await recorder.stop()


async def send(recorder: Recorder, *events: Event) -> None:
    """Record events through one recorder, one after the other, each written before the next."""
    for item in events:
        recorder.record(item)
        await asyncio.wait_for(recorder.drained(), 10)


async def row(conn: asyncpg.Connection, session_id: str = SID) -> Any:
    return await conn.fetchrow(
        "SELECT state, created_at, updated_at, deleted_at FROM sessions WHERE id = $1", session_id
    )


async def trail(conn: asyncpg.Connection, session_id: str = SID) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT extract(epoch FROM occurred_at) - $2 AS second, old_state, new_state"
        " FROM session_audit WHERE session_id = $1 ORDER BY occurred_at, id",
        session_id,
        T0,
    )
    return [(float(r["second"]), r["old_state"], r["new_state"]) for r in rows]


async def test_a_creation_replayed_after_a_delete_does_not_bring_the_session_back(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    # The story: A spools the creation, B records stop and delete at once,
    # A's link returns and A replays the creation.
    a, b = await recorders.start(), await recorders.start()
    await send(b, event(Action.STOP, 2), event(Action.DELETE, 3))
    await send(a, event(Action.CREATE, 1))
    found = await row(conn)
    assert found["state"] == "DELETED"
    assert found["created_at"] == datetime.fromtimestamp(T0 + 1, UTC)  # the earliest creation
    assert found["deleted_at"] == datetime.fromtimestamp(T0 + 3, UTC)
    assert await trail(conn) == [
        (1.0, None, "ACTIVE"),
        (2.0, None, "STOPPED"),  # as it was known when it arrived, first
        (3.0, "STOPPED", "DELETED"),
    ]
    assert recorders.count("late") == 1


async def test_a_purge_overtaken_by_a_late_update_stays_purged(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    a, b = await recorders.start(), await recorders.start()
    await send(a, event(Action.CREATE, 1), event(Action.STOP, 2), event(Action.PURGE, 4))
    await send(b, event(Action.DELETE, 3))  # late: the purge came after it
    assert await row(conn) is None
    assert await trail(conn) == [
        (1.0, None, "ACTIVE"),
        (2.0, "ACTIVE", "STOPPED"),
        (3.0, "STOPPED", "DELETED"),
        (4.0, "STOPPED", None),
    ]
    assert recorders.count("late") == 1
    assert recorders.count("unexpected_transition") == 0


async def test_a_session_first_seen_deleted_is_deleted_since_that_event(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    a, b = await recorders.start(), await recorders.start()
    await send(b, event(Action.DELETE, 3))  # the creation and the stop still on their way
    await send(a, event(Action.CREATE, 1), event(Action.STOP, 2))
    found = await row(conn)
    assert found["state"] == "DELETED"
    assert found["deleted_at"] == datetime.fromtimestamp(T0 + 3, UTC)
    assert found["created_at"] == datetime.fromtimestamp(T0 + 1, UTC)


async def test_the_latest_event_decides_whatever_the_arrival_order(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    a = await recorders.start()
    history = [
        event(Action.CREATE, 1),
        event(Action.PAUSE, 2),
        event(Action.RESUME, 3),
        event(Action.STOP, 4),
        event(Action.DELETE, 5),
        event(Action.RESTORE, 6),
    ]
    await send(a, *reversed(history))
    found = await row(conn)
    assert found["state"] == "STOPPED"  # restore, the latest
    assert found["created_at"] == datetime.fromtimestamp(T0 + 1, UTC)
    assert [second for second, *_ in await trail(conn)] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert recorders.count("late") == 5


async def test_ties_are_broken_by_event_id_in_every_store(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    a = await recorders.start()
    low = Event("0" * 32, SID, Action.PAUSE, True, T0 + 5, "r")
    high = Event("f" * 32, SID, Action.STOP, True, T0 + 5, "r")
    other = "exec_20251230_020944_4ad060da"
    await send(a, event(Action.CREATE, 1), low, high)
    await send(
        a,
        event(Action.CREATE, 1, other),
        Event("f" * 31 + "e", other, Action.STOP, True, T0 + 5, "r"),
        Event("0" * 31 + "1", other, Action.PAUSE, True, T0 + 5, "r"),
    )
    assert (await row(conn))["state"] == "STOPPED"
    assert (await row(conn, other))["state"] == "STOPPED"


async def test_an_event_from_the_future_is_refused_and_counted(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    a = await recorders.start()
    ahead = Event(uuid.uuid4().hex, SID, Action.CREATE, True, datetime.now(UTC).timestamp(), "r")
    await send(a, ahead)
    pinned = Event(
        uuid.uuid4().hex,
        SID,
        Action.DELETE,
        True,
        (datetime.now(UTC) + timedelta(hours=1)).timestamp(),
        "r",
    )
    await send(a, pinned)
    assert recorders.count("future") == 1
    assert (await row(conn))["state"] == "ACTIVE"
    assert await conn.fetchval("SELECT count(*) FROM session_lens_events") == 1


# --- refusals about the database, not the event ------------------------------------------


async def test_an_unmigrated_store_keeps_every_event_until_it_is_migrated(
    empty_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = Recorders(empty_db, tmp_path)
    recorder = await made.start()
    try:
        for n in range(50):
            recorder.record(event(Action.CREATE, n, f"exec_20251230_020944_{n:08x}"))
        await asyncio.sleep(0.5)
        assert recorder.pending == 50
        assert made.count("rejected") == 0
        problem = recorder.health()
        assert problem is not None and "run `session-lens migrate`" in problem
        conn = await asyncpg.connect(empty_db)
        try:
            await migrate(conn, Tables())
            await asyncio.wait_for(recorder.drained(), 15)
            assert await conn.fetchval("SELECT count(*) FROM sessions") == 50
        finally:
            await conn.close()
    finally:
        await recorder.stop()
    assert made.count("recorded") == 50
    said = [r.getMessage() for r in caplog.records if "remedy" in r.__dict__]
    assert said, "no log line said what to do"


@pytest.mark.parametrize("fault", ["privilege", "read_only"])
async def test_a_store_refusing_for_its_own_reasons_loses_nothing(
    db: str, tmp_path: Path, conn: asyncpg.Connection, fault: str
) -> None:
    role = "lens_" + uuid.uuid4().hex[:8]
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    await conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    dsn = db.replace("postgres:@", f"{role}:@", 1)
    if dsn == db:
        pytest.skip("needs the embedded server, whose URL names the postgres role")
    if fault == "privilege":
        await conn.execute(f"REVOKE INSERT ON session_lens_events FROM {role}")
        expected = "grant it"
    else:
        await conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        expected = "read-only"
    made = Recorders(db, tmp_path)
    recorder = await made.start(dsn)
    try:
        for n in range(10):
            recorder.record(event(Action.CREATE, n, f"exec_20251230_020944_{n:08x}"))
        deadline = asyncio.get_running_loop().time() + 10
        while expected not in (recorder.health() or ""):
            assert asyncio.get_running_loop().time() < deadline, recorder.health()
            await asyncio.sleep(0.05)
        assert recorder.pending == 10
        assert made.count("rejected") == 0
        if fault == "privilege":
            await conn.execute(f"GRANT INSERT ON session_lens_events TO {role}")
        else:
            await conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = off")
            # Pooled connections keep the setting they were opened with.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
        await asyncio.wait_for(recorder.drained(), 20)
    finally:
        await recorder.stop()
    assert await conn.fetchval("SELECT count(*) FROM sessions") == 10
    assert made.count("recorded") == 10


async def test_an_event_refused_for_its_values_alone_is_skipped_and_counted(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    a = await recorders.start()
    a.record(event(Action.CREATE, 1, "exec_bad\x00id"))  # text cannot hold NUL: SQLSTATE 22
    a.record(event(Action.CREATE, 2))
    await asyncio.wait_for(a.drained(), 10)
    assert recorders.count("rejected") == 1
    assert (await row(conn))["state"] == "ACTIVE"


async def test_serving_an_unmigrated_store_says_so_at_once(
    empty_db: str, upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from session_lens.explain import Explainer

    config = load_config(flags={"upstream": upstream.url, "database_url": empty_db})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), empty_db)
    await explainer.open()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not any("cannot be read" in r.getMessage() for r in caplog.records):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        problem = await explainer.health()
    finally:
        await explainer.close()
    assert problem is not None and "run `session-lens migrate`" in problem


async def test_a_row_written_otherwise_counts_from_its_updated_at(
    recorders: Recorders, conn: asyncpg.Connection
) -> None:
    # Imported (or written with SQL) as ARCHIVED at T0+5; a stop seen at T0+3 is older.
    await conn.execute(
        "INSERT INTO sessions (id, state, created_at, updated_at) VALUES ($1, 'ARCHIVED', $2, $2)",
        SID,
        datetime.fromtimestamp(T0 + 5, UTC),
    )
    a = await recorders.start()
    await send(a, event(Action.STOP, 3))
    assert (await row(conn))["state"] == "ARCHIVED"
    assert recorders.count("late") == 1
    await send(a, event(Action.DELETE, 7))
    assert (await row(conn))["state"] == "DELETED"


async def test_a_fresh_stores_horizon_is_no_later_than_the_first_event_it_keeps(
    empty_db: str, tmp_path: Path
) -> None:
    """Events spooled before the store was migrated: once they are in, the horizon
    does not claim they came before tracking began."""
    config = load_config(
        flags={
            "database_url": empty_db,
            "lifecycle_source": "observed",
            "spool_dir": str(tmp_path / "spool"),
        },
        need_upstream=False,
    )
    first = time.time() - 30
    before = Recorder(config, Metrics(CollectorRegistry(), ()), empty_db)
    await before.start()
    try:
        for n in range(3):
            session_id = f"exec_20251230_020944_{n:08x}"
            before.record(Event.new(session_id, Action.CREATE, "r", at=first + n))
        await asyncio.sleep(0.3)
        assert before.pending == 3  # the store is not migrated: they wait in the spool
    finally:
        await before.stop(timeout=0.5)
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, Tables())  # later than the events
        after = Recorder(config, Metrics(CollectorRegistry(), ()), empty_db)
        await after.start()
        try:
            await asyncio.wait_for(after.drained(), 15)
        finally:
            await after.stop()
        horizon = await conn.fetchval("SELECT horizon FROM session_lens_tracking")
        kept = await conn.fetchval("SELECT min(occurred_at) FROM session_lens_events")
        assert kept.timestamp() == pytest.approx(first, abs=0.001)
        assert horizon <= kept, (horizon, kept)
    finally:
        await conn.close()
