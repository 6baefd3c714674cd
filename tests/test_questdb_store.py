"""The service's QuestDB as evidence, against a real QuestDB: metadata, the row, failures."""

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from session_lens.evidence.questdb import (
    QuestDBSettings,
    QuestDBStore,
    StoreFailure,
    StoreUnavailable,
    TableMeta,
    WalState,
)
from session_lens.evidence.retention import Period, Unit
from session_lens.explain import Breaker

from .conftest import Forwarder
from .questdb import QuestDB

DAY = timedelta(days=1)


@pytest.fixture
async def table(questdb: QuestDB) -> AsyncIterator[str]:
    """A service's sessions: WAL, by day, TTL 30 days; rows three and two days ago."""
    name = "sessions_" + uuid.uuid4().hex[:12]
    await execute(
        questdb.url,
        f"CREATE TABLE {name} (session_id SYMBOL, state SYMBOL, note VARCHAR, created TIMESTAMP)"
        " TIMESTAMP(created) PARTITION BY DAY TTL 30 DAYS WAL",
    )
    try:
        yield name
    finally:
        await execute(questdb.url, f"DROP TABLE IF EXISTS {name}")


async def execute(url: str, sql: str) -> None:
    """One statement on a connection of its own (QuestDB drops connections idle for 5 min)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def day(ago: int) -> datetime:
    return (datetime.now(UTC) - ago * DAY).replace(hour=12, minute=0, second=0, microsecond=0)


def id_at(moment: datetime, suffix: str = "0000000a") -> str:
    return moment.strftime("exec_%Y%m%d_%H%M%S_") + suffix


async def write(url: str, table: str, *rows: tuple[str, str, datetime]) -> None:
    conn = await asyncpg.connect(url)
    try:
        before = await conn.fetchval(f"SELECT count() FROM {table}")
        await conn.executemany(
            f"INSERT INTO {table} (session_id, state, note, created) VALUES ($1, $2, 'x', $3)",
            [(sid, state, at.replace(tzinfo=None)) for sid, state, at in rows],
        )
        deadline = time.monotonic() + 15
        while await conn.fetchval(f"SELECT count() FROM {table}") < before + len(rows):
            assert time.monotonic() < deadline, "the rows never became visible"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop is told of errors nobody handled: among them, a future whose
    exception was never retrieved (asyncio says so when the future is collected)."""
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(before)


def unhandled(seen: list[dict[str, Any]]) -> list[str]:
    """The loop's error messages so far, every dropped future collected first."""
    gc.collect()
    return [f"{c['message']}: {c.get('exception')!r}" for c in seen]


def settings(url: str, table: str, **more: object) -> QuestDBSettings:
    return QuestDBSettings(url, table, "session_id", "created", **more)  # type: ignore[arg-type]


@pytest.fixture
async def store(questdb: QuestDB, table: str) -> AsyncIterator[QuestDBStore]:
    await write(questdb.url, table, (id_at(day(3)), "ACTIVE", day(3)))
    await write(questdb.url, table, (id_at(day(2)), "DELETED", day(2)))
    found = QuestDBStore(settings(questdb.url, table, refresh=0.2, budget=2.0))
    await found.open()
    try:
        yield found
    finally:
        await found.close()


async def test_metadata_says_ttl_partitions_and_wal(store: QuestDBStore) -> None:
    meta = store.meta
    assert meta is not None
    assert meta.partition_by is Unit.DAY and meta.ttl == Period(30, Unit.DAY)
    assert meta.partitions == {f"{day(3):%Y-%m-%d}", f"{day(2):%Y-%m-%d}"}
    assert meta.oldest == f"{day(3):%Y-%m-%d}"
    assert meta.wal is not None and not meta.wal.suspended and meta.wal.pending == 0


async def test_the_row_in_its_partition(store: QuestDBStore) -> None:
    found = await store.look_up(id_at(day(2)), day(2))
    assert found.partitions == (f"{day(2):%Y-%m-%d}",) and found.present == (True,)
    assert found.row is not None
    assert found.row["state"] == "DELETED" and found.row["created"] == day(2).replace(tzinfo=None)
    assert not found.before_oldest


async def test_absent_from_a_partition_that_is_there(store: QuestDBStore) -> None:
    found = await store.look_up(id_at(day(2), "000000ff"), day(2))
    assert found.present == (True,) and found.row is None  # never written


async def test_a_partition_dropped_or_never_there(questdb: QuestDB, store: QuestDBStore) -> None:
    older = await store.look_up(id_at(day(5)), day(5))
    assert older.present == (False,) and older.before_oldest and older.row is None
    between = await store.look_up(id_at(day(1)), day(1))  # after the oldest, no partition
    assert between.present == (False,) and not between.before_oldest
    await execute(
        questdb.url, f"ALTER TABLE {store.settings.table} DROP PARTITION LIST '{day(3):%Y-%m-%d}'"
    )
    meta = await until(store, lambda m: f"{day(3):%Y-%m-%d}" not in m.partitions)
    assert meta.oldest == f"{day(2):%Y-%m-%d}"
    gone = await store.look_up(id_at(day(3)), day(3))
    assert gone.present == (False,) and gone.before_oldest and gone.row is None


async def test_near_a_partition_end_the_next_one_is_read_too(
    questdb: QuestDB, store: QuestDBStore
) -> None:
    minted = day(2).replace(hour=23, minute=59, second=30)
    session_id = id_at(minted, "000000bb")
    written = minted + timedelta(minutes=2)  # past midnight: in the next day's partition
    await write(questdb.url, store.settings.table, (session_id, "ACTIVE", written))
    await until(store, lambda m: f"{day(1):%Y-%m-%d}" in m.partitions)
    found = await store.look_up(session_id, minted)
    assert found.partitions == (f"{day(2):%Y-%m-%d}", f"{day(1):%Y-%m-%d}")
    assert found.present == (True, True) and found.row is not None


async def test_the_row_is_looked_for_within_the_slack_of_its_minted_second(
    questdb: QuestDB, table: str
) -> None:
    """Stamped a little before the second its ID names (another clock) or up to the slack
    after it: found; stamped later than the slack: outside what is looked at."""
    minted = day(2).replace(hour=12, minute=0, second=0)
    early, late, later = (id_at(minted, f"000000c{n}") for n in range(3))
    await write(
        questdb.url, table,
        (early, "ACTIVE", minted - timedelta(seconds=30)),
        (late, "ACTIVE", minted + timedelta(minutes=4, seconds=59)),
        (later, "ACTIVE", minted + timedelta(minutes=6)),
    )  # fmt: skip
    store = QuestDBStore(settings(questdb.url, table, slack=timedelta(minutes=5)))
    await store.open()
    try:
        await until(store, lambda m: f"{day(2):%Y-%m-%d}" in m.partitions)
        assert (await store.look_up(early, minted)).row is not None
        assert (await store.look_up(late, minted)).row is not None
        assert (await store.look_up(later, minted)).row is None
    finally:
        await store.close()


async def until(store: QuestDBStore, holds: Callable[[TableMeta], bool]) -> TableMeta:
    """Wait until the refreshed metadata shows what `holds` looks for."""
    deadline = time.monotonic() + 15
    while store.meta is None or not holds(store.meta):
        assert time.monotonic() < deadline, f"the metadata never showed it: {store.meta}"
        await asyncio.sleep(0.05)
    return store.meta


async def test_a_suspended_wal_and_its_pending_transactions(
    questdb: QuestDB, store: QuestDBStore
) -> None:
    conn = await asyncpg.connect(questdb.url)
    table = store.settings.table
    try:
        await conn.execute(f"ALTER TABLE {table} SUSPEND WAL")
        try:
            fresh = datetime.now(UTC).replace(microsecond=0)
            for n in range(3):
                await conn.execute(
                    f"INSERT INTO {table} VALUES ($1, 'ACTIVE', 'x', $2)",
                    id_at(fresh, f"0000000{n}"), fresh.replace(tzinfo=None),
                )  # fmt: skip
            meta = await until(
                store, lambda m: bool(m.wal and m.wal.suspended and m.wal.pending >= 3)
            )
            assert meta.wal == WalState(True, meta.wal.writer_txn, meta.wal.writer_txn + 3)
            found = await store.look_up(id_at(fresh, "00000000"), fresh)
            assert found.row is None and found.meta.wal is not None and found.meta.wal.suspended
        finally:
            await conn.execute(f"ALTER TABLE {table} RESUME WAL")
    finally:
        await conn.close()
    await until(store, lambda m: bool(m.wal and not m.wal.suspended and m.wal.pending == 0))
    found = await store.look_up(id_at(fresh, "00000000"), fresh)
    assert found.row is not None  # resumed: the row the service wrote is there


async def test_the_metadata_is_read_while_misses_have_the_breaker_open(
    questdb: QuestDB, store: QuestDBStore
) -> None:
    """Row queries timing out open the breaker; the WAL state (its gauges, its alert) is
    still read every few seconds, and a read of it does not close the breaker."""
    while not store.breaker.is_open:
        store.breaker.failed()
    with pytest.raises(StoreUnavailable) as raised:
        await store.look_up(id_at(day(2)), day(2))
    assert raised.value.kind is StoreFailure.BREAKER_OPEN
    table = store.settings.table
    await execute(questdb.url, f"ALTER TABLE {table} SUSPEND WAL")
    try:
        meta = await store.refresh()
        assert meta.wal is not None and meta.wal.suspended
        assert store.breaker.is_open
    finally:
        await execute(questdb.url, f"ALTER TABLE {table} RESUME WAL")


async def test_a_store_that_is_not_there(table: str, loop_errors: list[dict[str, Any]]) -> None:
    store = QuestDBStore(settings("postgresql://admin:quest@127.0.0.1:1/qdb", table, budget=1.0))
    await store.open()
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await store.look_up(id_at(day(2)), day(2))
        assert raised.value.kind is StoreFailure.UNAVAILABLE
        with pytest.raises(StoreUnavailable):
            await store.refresh()
        assert store.failures[StoreFailure.UNAVAILABLE] >= 2 and store.problem
    finally:
        await store.close()
    assert unhandled(loop_errors) == []


async def test_a_stalled_store_times_out_and_opens_the_breaker(
    questdb: QuestDB, table: str, loop_errors: list[dict[str, Any]]
) -> None:
    await write(questdb.url, table, (id_at(day(2)), "ACTIVE", day(2)))
    link = Forwarder(questdb.url)
    url = await link.start()
    store = QuestDBStore(settings(url, table, budget=0.2, refresh=60), Breaker(failures=2))
    await store.open()
    try:
        assert store.meta is not None
        assert (await store.look_up(id_at(day(2)), day(2))).row is not None
        link.stall()
        kinds = []
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await store.look_up(id_at(day(2)), day(2))
            assert time.monotonic() - started < 1.0  # within its budget, whatever the store does
            kinds.append(raised.value.kind)
        assert kinds == [StoreFailure.TIMEOUT, StoreFailure.TIMEOUT, StoreFailure.BREAKER_OPEN]
        assert store.problem is not None and store.problem.startswith("timeout")
    finally:
        link.restore()
        await store.close()
        await link.close()
    assert unhandled(loop_errors) == []


async def test_a_caller_giving_up_waits_on_nothing_and_leaves_nothing_behind(
    questdb: QuestDB, table: str, loop_errors: list[dict[str, Any]]
) -> None:
    """The miss's own budget strikes before the store's: the query is dropped at once,
    not left to wait for the server to confirm a cancel over a stalled link."""
    await write(questdb.url, table, (id_at(day(2)), "ACTIVE", day(2)))
    link = Forwarder(questdb.url)
    url = await link.start()
    store = QuestDBStore(settings(url, table, budget=5.0, refresh=60))
    await store.open()

    async def given_up() -> None:
        async with asyncio.timeout(0.2):
            await store.look_up(id_at(day(2)), day(2))

    asked = None
    try:
        assert (await store.look_up(id_at(day(2)), day(2))).row is not None
        for _ in range(2):  # the connection the pool had, then a new one
            link.stall()
            started = time.monotonic()
            asked = asyncio.create_task(given_up())
            finished, _ = await asyncio.wait({asked}, timeout=3.0)
            assert asked in finished, "the look-up is still waiting on the stalled link"
            assert isinstance(asked.exception(), TimeoutError)
            assert time.monotonic() - started < 1.0
            link.restore()
            found = await store.look_up(id_at(day(2)), day(2))  # the store is whole again
            assert found.row is not None and store.problem is None
    finally:
        if asked is not None and not asked.done():
            asked.cancel()
            await asyncio.wait({asked})
        link.restore()
        await store.close()
        await link.close()
    assert unhandled(loop_errors) == []


async def test_the_pool_holds_as_many_connections_as_it_is_given(
    questdb: QuestDB, table: str, loop_errors: list[dict[str, Any]]
) -> None:
    await write(questdb.url, table, (id_at(day(2)), "ACTIVE", day(2)))
    opened = {}
    for size in (2, 5):
        link = Forwarder(questdb.url)
        url = await link.start()
        store = QuestDBStore(settings(url, table, budget=1.0, refresh=60, pool_size=size))
        await store.open()  # one connection, to read the metadata
        try:
            link.stall()  # each miss holds its connection for the whole budget
            asked = [store.look_up(id_at(day(2)), day(2)) for _ in range(8)]
            misses = asyncio.gather(*asked, return_exceptions=True)
            # Halfway through the budget every miss has a connection or waits for one:
            # a connection to the link is made as soon as the pool asks for it.
            await asyncio.sleep(0.5)
            opened[size] = link.connections
            said = await misses
            assert {type(s) for s in said} == {StoreUnavailable}
        finally:
            link.restore()
            await store.close()
            await link.close()
    assert opened == {2: 2, 5: 5}
    assert unhandled(loop_errors) == []


def test_names_that_are_not_plain_are_refused() -> None:
    with pytest.raises(ValueError, match="table 'x; DROP TABLE y' is not a plain name"):
        QuestDBSettings("postgresql://q/qdb", "x; DROP TABLE y", "id", "ts")


async def test_columns_asyncpg_cannot_read_are_left_out(
    questdb: QuestDB, table: str, loop_errors: list[dict[str, Any]]
) -> None:
    for column in ("ip IPV4", "g GEOHASH(4c)", "a DOUBLE[]"):
        await execute(questdb.url, f"ALTER TABLE {table} ADD COLUMN {column}")
    sid = id_at(day(2))
    await execute(
        questdb.url,
        f"INSERT INTO {table} (session_id, state, note, created, ip, g, a)"
        f" VALUES ('{sid}', 'ACTIVE', 'x', '{day(2):%Y-%m-%dT%H:%M:%S}Z', '1.2.3.4', #u33d,"
        " ARRAY[1.0, 2.0])",
    )
    conn = await asyncpg.connect(questdb.url)
    try:
        deadline = time.monotonic() + 15
        while not await conn.fetchval(f"SELECT count() FROM {table}"):
            assert time.monotonic() < deadline, "the row never became visible"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    every = QuestDBStore(settings(questdb.url, table, budget=2.0))
    named = QuestDBStore(settings(questdb.url, table, budget=2.0, columns=("session_id", "state")))
    for store in (every, named):
        await store.open()
    try:
        found = await every.look_up(sid, day(2))
        assert found.row is not None and found.row["state"] == "ACTIVE"
        assert {"ip", "g", "a"}.isdisjoint(found.row)
        assert (await named.look_up(sid, day(2))).row == {"session_id": sid, "state": "ACTIVE"}
    finally:
        for store in (every, named):
            await store.close()
    assert unhandled(loop_errors) == []


async def test_a_wrong_id_or_timestamp_column_is_said_not_guessed(
    questdb: QuestDB, table: str
) -> None:
    for wrong, said in (
        ({"id_column": "nothere"}, f"{table} has no column nothere"),
        ({"timestamp_column": "note"}, f"note is not {table}'s designated timestamp (created)"),
    ):
        store = QuestDBStore(replace(settings(questdb.url, table), **wrong))  # type: ignore[arg-type]
        await store.open()
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await store.refresh()
            assert raised.value.kind is StoreFailure.QUERY and raised.value.detail == said
            with pytest.raises(StoreUnavailable):  # no metadata: no evidence, no guess
                await store.look_up(id_at(day(2)), day(2))
            assert store.problem == f"query: {said}"
        finally:
            await store.close()


async def test_ids_at_the_edges_of_time_and_of_partitions(questdb: QuestDB, table: str) -> None:
    midnight = day(1).replace(hour=0, minute=0, second=0)
    early = id_at(midnight, "000000d1")  # stamped just before its second, the day before
    await write(questdb.url, table, (early, "ACTIVE", midnight - timedelta(milliseconds=100)))
    store = QuestDBStore(settings(questdb.url, table))
    await store.open()
    try:
        found = await store.look_up(early, midnight)
        assert found.partitions == (f"{day(2):%Y-%m-%d}", f"{day(1):%Y-%m-%d}")
        assert found.row is not None
        ancient = datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC)  # a valid ID, before any timestamp
        assert (await store.look_up("exec_00010101_000001_abcdef01", ancient)).row is None
    finally:
        await store.close()


async def test_a_refused_query_keeps_its_connection(
    questdb: QuestDB, table: str, loop_errors: list[dict[str, Any]]
) -> None:
    """QuestDB says no and stays ready: the connection goes back to the pool as it is."""
    await write(questdb.url, table, (id_at(day(2)), "ACTIVE", day(2)))
    link = Forwarder(questdb.url)
    url = await link.start()
    store = QuestDBStore(settings(url, table, budget=2.0, refresh=60, pool_size=1))
    await store.open()
    try:
        for _ in range(3):  # a column the table lacks
            with pytest.raises(StoreUnavailable) as raised:
                await store._ask(
                    lambda conn: conn.fetchval(f"SELECT nothing FROM {table}", timeout=2.0), 2.0
                )
            assert raised.value.kind is StoreFailure.QUERY
        assert (await store.look_up(id_at(day(2)), day(2))).row is not None
        assert link.connections == 1
    finally:
        await store.close()
        await link.close()
    assert unhandled(loop_errors) == []
