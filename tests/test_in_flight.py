"""Evidence in flight: what a sidecar has seen and not stored yet is evidence, and no
sidecar says never_existed of an ID whose evidence may be on its way."""

import asyncio
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from session_lens import recorder as recorder_module
from session_lens.app import EXPLAINER, create_admin_app
from session_lens.config import load_config
from session_lens.events import Event
from session_lens.explain import Explainer, report_json
from session_lens.metrics import Metrics
from session_lens.operate import run_explain
from session_lens.recorder import STALLED, Recorder
from session_lens.routes import Action

from .conftest import Forwarder, MakeProxy, ProxyUnderTest, Upstream, link
from .test_observed import SessionService, call, minted, settled
from .test_ordering import Recorders


async def why(proxy: ProxyUnderTest, session_id: str) -> str:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/api/sessions/{session_id}") as response,
    ):
        assert response.status == 404
        return response.headers["X-Session-Not-Found-Reason"]


async def tracked_ids(count: int) -> list[str]:
    """IDs minted after a recorder that started just now began (IDs name whole seconds),
    and older than a 100 ms visibility window by the time they are used."""
    await asyncio.sleep(1.1)
    now = datetime.now(UTC)
    ids = [minted(now, f"{n:08x}") for n in range(count)]
    await asyncio.sleep(0.2)
    return ids


async def test_a_lookup_straight_after_its_create_is_never_never_existed(
    upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    upstream.respond = SessionService().handle  # its lookups all miss: a lagging replica
    proxy = await make_proxy(upstream.url, database_url=db, lifecycle_source="observed")
    await asyncio.sleep(1.1)  # IDs name whole seconds: theirs come after recording began
    reasons = []
    for n in range(20):
        session_id = minted(datetime.now(UTC), f"{n:08x}")
        assert await call(proxy, "POST", "/api/sessions", json={"id": session_id}) == 201
        reasons.append(await why(proxy, session_id))
    assert set(reasons) <= {"not_yet_visible", "creating"}, reasons


async def test_what_a_cut_link_spooled_is_evidence_the_moment_it_returns(
    upstream: Upstream, make_proxy: MakeProxy, db: str, forwarders: list[Forwarder]
) -> None:
    upstream.respond = SessionService().handle
    forwarder, through = await link(forwarders, db)
    proxy = await make_proxy(
        upstream.url, database_url=through, lifecycle_source="observed", visibility_window="100ms"
    )
    ids = await tracked_ids(30)
    forwarder.cut()
    for session_id in ids:
        assert await call(proxy, "POST", "/api/sessions", json={"id": session_id}) == 201
        assert await call(proxy, "DELETE", f"/api/sessions/{session_id}") == 200
    assert proxy.recorder is not None and proxy.recorder.pending == 60
    forwarder.restore()
    reasons = [await why(proxy, session_id) for session_id in ids]
    assert set(reasons) == {"deleted"}, reasons
    await settled(proxy)
    conn = await asyncpg.connect(db)
    try:
        counted = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT event_id) FROM session_lens_events"
            " WHERE session_id = ANY($1::text[])",
            ids,
        )
        assert tuple(counted) == (60, 60)  # every event, exactly once
    finally:
        await conn.close()
    assert len(proxy.recorder.in_flight) == 0


async def test_another_sidecars_create_is_never_never_existed_here(
    upstream: Upstream, make_proxy: MakeProxy, db: str, tmp_path: Path
) -> None:
    upstream.respond = SessionService().handle
    one, other = [
        await make_proxy(
            upstream.url, database_url=db, lifecycle_source="observed", spool_dir=str(spool)
        )
        for spool in (tmp_path / "one", tmp_path / "other")
    ]
    await asyncio.sleep(1.1)  # IDs name whole seconds: theirs come after recording began
    reasons = []
    for n in range(20):
        session_id = minted(datetime.now(UTC), f"{n:08x}")
        assert await call(one, "POST", "/api/sessions", json={"id": session_id}) == 201
        reasons.append(await why(other, session_id))
    assert "never_existed" not in reasons, reasons


async def test_a_replay_in_progress_elsewhere_is_doubt_everywhere(
    upstream: Upstream,
    make_proxy: MakeProxy,
    db: str,
    forwarders: list[Forwarder],
    tmp_path: Path,
    aiohttp_client: Any,
) -> None:
    upstream.respond = SessionService().handle
    forwarder, through = await link(forwarders, db)
    settings = {"lifecycle_source": "observed", "visibility_window": "100ms"}
    replaying = await make_proxy(
        upstream.url, database_url=through, spool_dir=str(tmp_path / "one"), **settings
    )
    other = await make_proxy(
        upstream.url, database_url=db, spool_dir=str(tmp_path / "other"), **settings
    )
    ids = await tracked_ids(5)
    forwarder.cut()
    for session_id in ids:
        assert await call(replaying, "POST", "/api/sessions", json={"id": session_id}) == 201
        assert await call(replaying, "DELETE", f"/api/sessions/{session_id}") == 200
    assert replaying.recorder is not None
    for _ in range(200):  # until the recorder knows the database is out of reach
        if replaying.recorder.health() is not None:
            break
        await asyncio.sleep(0.05)
    holder = await asyncpg.connect(db)
    try:
        # The replay stalls on the events table once it has said it is replaying.
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE session_lens_events IN ACCESS EXCLUSIVE MODE")
        forwarder.restore()
        watcher = await asyncpg.connect(db)
        try:
            for _ in range(80):
                await replaying.recorder.check(within=0.1)  # no waiting out the back-off
                if await watcher.fetchval("SELECT count(*) FROM session_lens_replays"):
                    break
            assert await watcher.fetchval("SELECT events FROM session_lens_replays") == 10
            assert {await why(other, session_id) for session_id in ids} == {"unknown"}
            # explain on the replaying sidecar's admin listener shows what is in flight
            # (read here straight from the database: its own link is the slow one)
            config = load_config(flags={"upstream": upstream.url, "database_url": db})
            explainer = Explainer(config, Metrics(CollectorRegistry(), ()), db)
            explainer.in_flight = replaying.recorder.in_flight
            await explainer.open()
            admin = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
            try:
                answered = await admin.get(f"/sessions/{ids[0]}/explain")
                report = await answered.json()
                assert answered.status == 200, report
                assert report["reason"] == "deleted"
                assert [e["action"] for e in report["in_flight"]] == ["create", "delete"]
                page = await admin.get(
                    f"/sessions/{ids[0]}/explain", headers={"Accept": "text/html"}
                )
                assert "Seen, not stored yet" in await page.text()
            finally:
                await explainer.close()
        finally:
            await watcher.close()
        await transaction.commit()
    finally:
        await holder.close()
    await settled(replaying)
    assert {await why(other, session_id) for session_id in ids} == {"deleted"}
    check = await asyncpg.connect(db)
    try:
        assert await check.fetchval("SELECT count(*) FROM session_lens_replays") == 0
    finally:
        await check.close()


async def test_lookups_straight_after_creates_from_several_clients_at_once(
    upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    """An event stored while a miss's query runs is in the query or in flight, never
    in neither (it was, for about 1 lookup in 100 at this concurrency)."""
    upstream.respond = SessionService().handle
    proxy = await make_proxy(
        upstream.url,
        database_url=db,
        lifecycle_source="observed",
        # A busy machine: an `unknown` here is the race (an event in neither, its ID within
        # the visibility window), never a miss that ran out of time.
        classification_budget="5s",
    )
    await asyncio.sleep(1.1)  # IDs name whole seconds: theirs come after recording began

    async def client(n: int) -> list[str]:
        reasons = []
        async with aiohttp.ClientSession() as session:
            for k in range(150):
                session_id = minted(datetime.now(UTC), f"{n:02x}{k:06x}")
                url = f"{proxy.url}/api/sessions"
                async with session.post(url, json={"id": session_id}) as response:
                    assert response.status == 201
                async with session.get(f"{url}/{session_id}") as response:
                    reasons.append(response.headers["X-Session-Not-Found-Reason"])
        return reasons

    found = [r for reasons in await asyncio.gather(*map(client, range(4))) for r in reasons]
    assert set(found) <= {"not_yet_visible", "creating"}, {r: found.count(r) for r in found}


async def test_a_database_that_stops_answering_is_an_outage_said_at_once(
    db: str, tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    forwarder, through = await link(forwarders, db)
    made = Recorders(through, tmp_path)
    recorder = await made.start()
    try:
        forwarder.stall()
        recorder.record(Event.new("exec_20251230_020944_00000001", Action.CREATE, "r"))
        await asyncio.sleep(STALLED + 1.5)
        said = recorder.health()
        assert said is not None and said.startswith("spooling 1 events"), said
        assert said.endswith(("no answer within 5 s", "has not answered for 6 s")), said
        forwarder.restore()
        await asyncio.wait_for(recorder.drained(), 20)
        for _ in range(100):  # the replay's end is said once its last write returns
            if recorder.health() is None:
                break
            await asyncio.sleep(0.05)
        assert recorder.health() is None
    finally:
        await recorder.stop()


async def test_a_steady_stream_of_events_is_not_an_outage(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Under a steady load the writer's drain never runs dry: every batch is answered,
    # but events keep coming, so one drain outlasts the stall limit.
    monkeypatch.setattr(recorder_module, "STALLED", 0.5)
    made = Recorders(db, tmp_path)
    recorder = await made.start()
    said: list[str | None] = []
    try:
        loop = asyncio.get_running_loop()
        ends, n = loop.time() + 2.0, 0
        while loop.time() < ends:
            for _ in range(20):
                n += 1
                recorder.record(Event.new(f"exec_20251230_020944_{n:08x}", Action.CREATE, "r"))
            said.append(recorder.health())
            await asyncio.sleep(0.001)
        await asyncio.wait_for(recorder.drained(), 60)
    finally:
        await recorder.stop()
    assert set(said) == {None}, {s for s in said if s}
    assert "spooling lifecycle events" not in caplog.text
    assert made.count("recorded") == n


async def test_explain_on_the_command_line_reads_the_events_in_flight_from_the_spools(
    upstream: Upstream, make_proxy: MakeProxy, db: str, forwarders: list[Forwarder], tmp_path: Path
) -> None:
    # A sidecar's spool, and a worker's beside it (as `--workers` lays them out), each
    # cut from the database: the command, run in a process of its own with the same
    # settings, finds what they saw in their spools.
    upstream.respond = SessionService().handle
    spools = tmp_path / "spool"
    sidecars = []
    for spool in (spools, spools / "worker-1"):
        forwarder, through = await link(forwarders, db)
        forwarder.cut()
        proxy = await make_proxy(
            upstream.url,
            database_url=through,
            lifecycle_source="observed",
            visibility_window="100ms",
            spool_dir=str(spool),
        )
        sidecars.append((forwarder, proxy))
    [session_id] = await tracked_ids(1)
    (_, creator), (_, deleter) = sidecars
    assert await call(creator, "POST", "/api/sessions", json={"id": session_id}) == 201
    assert await call(deleter, "DELETE", f"/api/sessions/{session_id}") == 200
    settings = {"database_url": db, "lifecycle_source": "observed", "spool_dir": str(spools)}
    config = load_config(flags=settings, need_upstream=False)

    async def explained() -> str:
        out = io.StringIO()
        assert await run_explain(config, session_id, out=out) == 0
        return out.getvalue()

    said = await explained()
    assert "a miss now would be: deleted\n" in said, said
    in_flight = [line for line in said.splitlines() if line.startswith("in flight")]
    assert [line.split()[2] for line in in_flight] == ["create", "delete"], said
    assert all(line.endswith("seen, not stored yet") for line in in_flight), said
    for forwarder, proxy in sidecars:
        forwarder.restore()
        await settled(proxy)
    said = await explained()
    assert "a miss now would be: deleted\n" in said and "in flight" not in said, said
    assert "ACTIVE -> DELETED" in said, said


async def test_with_the_tables_out_of_reach_a_sidecar_says_what_it_saw_itself(
    upstream: Upstream, make_proxy: MakeProxy, db: str, forwarders: list[Forwarder], tmp_path: Path
) -> None:
    upstream.respond = SessionService().handle
    forwarder, through = await link(forwarders, db)
    spool = tmp_path / "cut-spool"
    settings = {
        "database_url": through,
        "lifecycle_source": "observed",
        "visibility_window": "100ms",
        "spool_dir": str(spool),
    }
    proxy = await make_proxy(upstream.url, **settings)
    deleted, created, unseen = await tracked_ids(3)
    forwarder.cut()
    for session_id in (deleted, created):
        assert await call(proxy, "POST", "/api/sessions", json={"id": session_id}) == 201
    assert await call(proxy, "DELETE", f"/api/sessions/{deleted}") == 200
    # Each lookup twice: once the tables' failures have opened the breaker too.
    for _ in range(2):
        said = {sid: await why(proxy, sid) for sid in (deleted, created, unseen)}
        assert said == {deleted: "deleted", created: "not_yet_visible", unseen: "unknown"}, said
    assert proxy.runner is not None
    report = report_json(await proxy.runner.app[EXPLAINER].report(deleted))
    assert report["reason"] == "deleted" and report["lifecycle_tables_problem"], report
    assert [e["action"] for e in report["in_flight"]] == ["create", "delete"]
    out = io.StringIO()
    config = load_config(flags=settings, need_upstream=False)
    assert await run_explain(config, deleted, out=out) == 1
    printed = out.getvalue()
    assert "a miss now would be: deleted\n" in printed, printed
    assert "tables    cannot be read: " in printed and "timeline  (not read)" in printed, printed
    assert printed.count("seen, not stored yet") == 2, printed
    forwarder.restore()
    await settled(proxy)
    out = io.StringIO()
    assert await run_explain(config, deleted, out=out) == 0
    assert "ACTIVE -> DELETED" in out.getvalue() and "in flight" not in out.getvalue()


async def test_a_writer_behind_by_more_than_the_visibility_window_is_said(
    db: str, tmp_path: Path
) -> None:
    config = load_config(
        flags={
            "database_url": db,
            "lifecycle_source": "observed",
            "spool_dir": str(tmp_path / "spool"),
            "visibility_window": "100ms",
        },
        need_upstream=False,
    )
    recorder = Recorder(config, Metrics(CollectorRegistry(), ()), db)
    await recorder.start()
    try:
        assert recorder.health() is None
        for n in range(30_000):  # more at once than the writer stores in 100 ms
            recorder.record(Event.new(f"exec_20251230_020944_{n:08x}", Action.CREATE, "r"))
        await asyncio.sleep(0.3)
        said = recorder.health()
        assert said is not None and said.startswith("behind: "), said
        assert "visibility_window is 0.1 s" in said, said
        await asyncio.wait_for(recorder.drained(), 60)
        assert recorder.health() is None
    finally:
        await recorder.stop()


async def test_a_connection_gone_dead_under_the_writer_is_replaced(
    db: str, tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    # The link to the database still takes new connections; the one the writer holds
    # answers no more (a NAT that forgot it, a peer that vanished). The write times out,
    # the connection is cut, and the next attempt goes through on a new one.
    forwarder, through = await link(forwarders, db)
    made = Recorders(through, tmp_path)
    recorder = await made.start()
    try:
        recorder.record(Event.new("exec_20251230_020944_00000001", Action.CREATE, "r"))
        await asyncio.wait_for(recorder.drained(), 10)
        forwarder.stall_open_ones()
        for n in range(2, 12):
            recorder.record(Event.new(f"exec_20251230_020944_{n:08x}", Action.CREATE, "r"))
        await asyncio.wait_for(recorder.drained(), STALLED + 10)
        assert made.count("recorded") == 11
        started = asyncio.get_running_loop().time()
        forwarder.stall()  # now every connection: stopping must not wait on them
        recorder.record(Event.new("exec_20251230_020944_00000100", Action.CREATE, "r"))
        await asyncio.sleep(0.1)
    finally:
        await recorder.stop(timeout=1.0)
    assert asyncio.get_running_loop().time() - started < 6


async def test_explain_does_not_call_an_event_the_tables_have_in_flight(
    db: str, tmp_path: Path
) -> None:
    # The spool as `explain` may read it while the sidecar empties it: the checkpoint
    # put back to 0 first, the lines (stored already) still there.
    [session_id] = await tracked_ids(1)
    made = Recorders(db, tmp_path)
    recorder = await made.start()
    stored = Event.new(session_id, Action.CREATE, "r1")
    try:
        recorder.record(stored)
        await asyncio.wait_for(recorder.drained(), 10)
    finally:
        await recorder.stop()
    spool = tmp_path / "emptying"
    spool.mkdir()
    pending = Event.new(session_id, Action.DELETE, "r2")
    (spool / "events.jsonl").write_bytes(stored.line() + pending.line())
    (spool / "events.checkpoint").write_bytes(b"0\n")
    settings = {"database_url": db, "lifecycle_source": "observed", "spool_dir": str(spool)}
    out = io.StringIO()
    config = load_config(flags=settings, need_upstream=False)
    assert await run_explain(config, session_id, out=out) == 0
    in_flight = [line for line in out.getvalue().splitlines() if line.startswith("in flight")]
    assert len(in_flight) == 1 and "request r2" in in_flight[0], out.getvalue()
