"""Only what the evidence can vouch for: the tracking horizon, id_timezone, the store's TTL."""

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from session_lens.evidence.retention import Fate, Period, StoreRetention, Unit
from session_lens.migrations import migrate
from session_lens.schema import Tables

from .conftest import MakeProxy, ProxyUnderTest, Upstream, free_port

OLD = "exec_20251230_020944_4ad060d9"  # the incident's ID, minted long before any tracking
ROUTE = "/api/sessions/{session_id}"


def minted(moment: datetime, suffix: str = "0000000f") -> str:
    """A session ID minted at `moment`, written in UTC."""
    return f"exec_{moment.astimezone(UTC):%Y%m%d_%H%M%S}_{suffix}"


def fresh() -> str:
    """An ID minted after a horizon set just now (IDs name whole seconds: a little ahead)."""
    return minted(datetime.now(UTC) + timedelta(seconds=2))


@pytest.fixture
async def migrated_now(empty_db: str) -> str:
    """A store migrated just now: its records begin now, as on a first deployment."""
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, Tables())
    finally:
        await conn.close()
    return empty_db


async def reason(proxy: ProxyUnderTest, session_id: str, query: str = "") -> tuple[str, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/api/sessions/{session_id}{query}") as response,
    ):
        assert response.status == 404
        return response.headers["X-Session-Not-Found-Reason"], await response.json()


async def sql(url: str, *statements: tuple[Any, ...], at: str = "2025-06-01Z") -> None:
    """Run statements as a writer would have at `at`: audit entries carry that moment."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT set_config('session_lens.occurred_at', $1, false)", at)
        for statement, *args in statements:
            await conn.execute(statement, *args)
    finally:
        await conn.close()


async def horizon(url: str) -> datetime:
    conn = await asyncpg.connect(url)
    try:
        value: datetime = await conn.fetchval("SELECT horizon FROM session_lens_tracking")
        return value
    finally:
        await conn.close()


# --- the horizon, per mode ------------------------------------------------------------


async def test_database_mode_no_evidence_before_the_migration_predates_tracking(
    missing: Upstream, make_proxy: MakeProxy, migrated_now: str
) -> None:
    began = await horizon(migrated_now)
    assert abs(datetime.now(UTC) - began) < timedelta(minutes=1)
    proxy = await make_proxy(missing.url, database_url=migrated_now, disclose="lifecycle")
    why, body = await reason(proxy, OLD, "?include_deleted=true")
    assert why == "predates_tracking"
    assert body["reason"] == "predates_tracking"
    assert body["lifecycle"] is None
    newer = fresh()
    assert (await reason(proxy, newer))[0] == "never_existed"
    assert (
        proxy.metric("session_lens_not_found_total", route=ROUTE, reason="predates_tracking") == 1
    )
    assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason="never_existed") == 1
    assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason="expired") == 0


@pytest.mark.parametrize(
    ("statements", "query", "expected"),
    [
        (["INSERT INTO sessions (id, state) VALUES ($1, 'ACTIVE')"], "", "upstream_inconsistent"),
        (
            [
                "INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')",
                "UPDATE sessions SET state = 'DELETED' WHERE id = $1",
            ],
            "?include_deleted=true",
            "deleted_not_served",
        ),
        (
            [
                "INSERT INTO sessions (id, state) VALUES ($1, 'ACTIVE')",
                "DELETE FROM sessions WHERE id = $1",
            ],
            "",
            "purged",
        ),
    ],
)
async def test_evidence_is_unaffected_by_the_horizon(
    missing: Upstream,
    make_proxy: MakeProxy,
    migrated_now: str,
    statements: list[str],
    query: str,
    expected: str,
) -> None:
    # Written an hour ago: well past the visibility window.
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    await sql(migrated_now, *[(statement, OLD) for statement in statements], at=an_hour_ago)
    await sql(migrated_now, ("UPDATE sessions SET updated_at = $1::text::timestamptz", an_hour_ago))
    proxy = await make_proxy(missing.url, database_url=migrated_now)
    assert (await reason(proxy, OLD, query))[0] == expected


async def test_observed_mode_tracks_from_the_first_recording(
    missing: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    # The store was migrated long ago (the fixture: 2025-01-01) but nobody recorded.
    assert await horizon(db) == datetime(2025, 1, 1, tzinfo=UTC)
    proxy = await make_proxy(
        missing.url, database_url=db, lifecycle_source="observed", visibility_window="500ms"
    )
    assert (await reason(proxy, OLD))[0] == "predates_tracking"
    began = await horizon(db)
    assert abs(datetime.now(UTC) - began) < timedelta(minutes=1)
    young = fresh()
    # Minted moments ago, its creation may be on its way from another sidecar: unknown.
    assert (await reason(proxy, young))[0] == "unknown"
    await asyncio.sleep(3.2)  # now older than the visibility window
    assert (await reason(proxy, young))[0] == "never_existed"
    # A second recorder starting later does not move the start of the records.
    later = await make_proxy(missing.url, database_url=db, lifecycle_source="observed")
    assert (await reason(later, OLD))[0] == "predates_tracking"
    assert await horizon(db) == began


async def test_an_existing_store_is_tracked_since_its_first_migration(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, Tables())
        # As a store migrated to 002 in January and recording since February would be.
        await conn.execute("DROP TABLE session_lens_tracking CASCADE")
        await conn.execute("DELETE FROM session_lens_migrations WHERE version = 3")
        await conn.execute(
            "UPDATE session_lens_migrations SET applied_at = '2026-01-10Z' WHERE version = 1"
        )
        await conn.execute(
            "INSERT INTO session_lens_events (event_id, session_id, action, occurred_at)"
            " VALUES (gen_random_uuid(), $1, 'create', '2026-02-01Z')",
            OLD,
        )
        assert await migrate(conn, Tables()) == [3]
        row = await conn.fetchrow("SELECT * FROM session_lens_tracking")
    finally:
        await conn.close()
    assert row["migrated_at"] == datetime(2026, 1, 10, tzinfo=UTC)
    assert row["observing_since"] == datetime(2026, 2, 1, tzinfo=UTC)
    assert row["horizon"] == datetime(2026, 2, 1, tzinfo=UTC)


# --- id_timezone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        ("UTC", "never_existed"),  # 03:00 UTC, after the horizon at 02:30 UTC
        ("Europe/Berlin", "predates_tracking"),  # 03:00 CET is 02:00 UTC
        ("America/New_York", "never_existed"),  # 03:00 EST is 08:00 UTC
    ],
)
async def test_the_ids_time_is_read_in_the_configured_zone(
    missing: Upstream, make_proxy: MakeProxy, db: str, zone: str, expected: str
) -> None:
    await sql(db, ("UPDATE session_lens_tracking SET migrated_at = '2025-12-30 02:30Z'",))
    proxy = await make_proxy(missing.url, database_url=db, id_timezone=zone)
    assert (await reason(proxy, "exec_20251230_030000_0000abcd"))[0] == expected


async def test_the_future_rule_reads_the_same_clock(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    # Written 20 h ahead of UTC: within the 24 h skew in UTC; 28 h ahead when it is
    # Los Angeles' local time (UTC-8 or -7).
    ahead = minted(datetime.now(UTC) + timedelta(hours=20))
    utc = await make_proxy(upstream.url)
    pacific = await make_proxy(upstream.url, id_timezone="America/Los_Angeles")
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{utc.url}/api/sessions/{ahead}") as response:
            assert response.status == 200
        async with client.get(f"{pacific.url}/api/sessions/{ahead}") as response:
            assert response.status == 404
            assert (await response.json())["rule"] == "future"


# --- the store's own retention ---------------------------------------------------------


def at_fate(fate: Fate, ttl: str = "30d") -> datetime:
    """A moment whose daily partition a TTL of `ttl` has left in `fate` by now."""
    retention = StoreRetention(Period.parse(ttl), Unit.DAY)
    now = datetime.now(UTC)
    for hours in range(0, 24 * 120, 6):
        moment = now - timedelta(hours=hours)
        if retention.fate(moment, now) is fate:
            return moment
    raise AssertionError(fate)


@pytest.mark.parametrize("mode", ["database", "observed"])
async def test_dropped_partitions_read_expired_evidence_or_not(
    missing: Upstream, make_proxy: MakeProxy, db: str, mode: str
) -> None:
    live = minted(at_fate(Fate.DROPPED), "000000a1")
    deleted = minted(at_fate(Fate.DROPPED), "000000a2")
    boundary = minted(at_fate(Fate.BOUNDARY), "000000a3")
    kept = minted(at_fate(Fate.KEPT), "000000a4")
    await sql(
        db,
        *[
            ("INSERT INTO sessions (id, state, updated_at) VALUES ($1, $2, '2025-06-01Z')", s, st)
            for s, st in ((live, "ACTIVE"), (deleted, "STOPPED"), (boundary, "ACTIVE"))
        ],
        ("UPDATE sessions SET state = 'DELETED' WHERE id = $1", deleted),
        ("UPDATE sessions SET updated_at = '2025-06-01Z'",),
    )
    proxy = await make_proxy(
        missing.url, database_url=db, lifecycle_source=mode, upstream_retention="30d"
    )
    if mode == "observed":  # recording began now: old IDs without evidence predate it
        assert (await reason(proxy, kept))[0] == "predates_tracking"
    else:
        assert (await reason(proxy, kept))[0] == "never_existed"
    assert (await reason(proxy, live))[0] == "expired"  # not upstream_inconsistent
    assert (await reason(proxy, deleted, "?include_deleted=true"))[0] == "expired"
    assert (await reason(proxy, OLD))[0] == "expired"  # no evidence at all
    # Its partition may or may not be gone: the evidence speaks, the log says why.
    assert (await reason(proxy, boundary))[0] == "upstream_inconsistent"
    assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason="expired") == 3

    unset = await make_proxy(missing.url, database_url=db, lifecycle_source=mode)
    assert (await reason(unset, live))[0] == "upstream_inconsistent"
    assert (await reason(unset, deleted, "?include_deleted=true"))[0] == "deleted_not_served"


async def test_expired_needs_no_database(missing: Upstream, make_proxy: MakeProxy) -> None:
    down = f"postgresql://lens@127.0.0.1:{free_port()}/nowhere"
    proxy = await make_proxy(missing.url, database_url=down, upstream_retention="30d")
    assert (await reason(proxy, OLD))[0] == "expired"
    assert (await reason(proxy, fresh()))[0] == "unknown"
    assert proxy.metric("session_lens_classification_queries_total") == 1


# --- explain ------------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "session_lens", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_explain_says_what_the_records_cannot_know(migrated_now: str) -> None:
    result = run("explain", OLD, "--database-url", migrated_now)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "a miss now would be: predates_tracking" in lines
    why = next(line for line in lines if "minted 2025-12-30 02:09:44 UTC" in line)
    assert "before tracking began on" in why
    assert why.endswith("no evidence either way (import the service's store to know more)")

    retained = run("explain", OLD, "--database-url", migrated_now, "--upstream-retention", "30d")
    assert "a miss now would be: expired" in retained.stdout
    assert "store     TTL 30d, partitioned by day: partition from 2025-12-30" in retained.stdout


async def test_explain_endpoint_shows_the_horizon_and_the_partition(
    aiohttp_client: Any, upstream: Upstream, migrated_now: str
) -> None:
    from prometheus_client import CollectorRegistry

    from session_lens.app import create_admin_app
    from session_lens.config import load_config
    from session_lens.explain import Explainer
    from session_lens.metrics import Metrics

    config = load_config(
        flags={
            "upstream": upstream.url,
            "database_url": migrated_now,
            "upstream_retention": "30d",
            "id_timezone": "Europe/Berlin",
        }
    )
    registry = CollectorRegistry()
    explainer = Explainer(config, Metrics(registry, config.session_routes), migrated_now)
    await explainer.open()
    try:
        client = await aiohttp_client(create_admin_app(config, registry, explainer))
        boundary = at_fate(Fate.BOUNDARY).astimezone(config.id_timezone)
        session_id = f"exec_{boundary:%Y%m%d_%H%M%S}_0000beef"
        report = await (await client.get(f"/sessions/{session_id}/explain")).json()
        assert report["minted_at"] == boundary.replace(microsecond=0).astimezone(UTC).isoformat()
        assert report["tracking_horizon"] == (await horizon(migrated_now)).isoformat()
        assert report["store_retention"]["fate"] == "boundary"
        assert report["store_retention"]["ttl"] == "30d"
        assert report["reason"] == "predates_tracking"
        assert "may or may not be dropped yet" in report["note"]
        old = await (await client.get(f"/sessions/{OLD}/explain")).json()
        assert old["minted_at"] == "2025-12-30T01:09:44+00:00"  # 02:09:44 in Berlin
        assert old["reason"] == "expired"
        assert old["store_retention"]["partition_start"] == "2025-12-30T00:00:00+00:00"
        assert json.dumps(old)  # plain JSON throughout
    finally:
        await explainer.close()
