"""`explain` at the moment of a miss: the evidence replayed as it stood then, through the
admin endpoint (JSON and page) and the command, over a real PostgreSQL."""

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from session_lens.app import create_admin_app
from session_lens.config import load_config
from session_lens.evidence.replay import ReplayError, as_of, moment
from session_lens.evidence.tables import AuditEntry, Evidence
from session_lens.explain import Explainer
from session_lens.metrics import Metrics

from .conftest import VALID_ID, track_since
from .test_cli import run
from .test_explain import BROWSER, observed, write

CREATED = datetime(2025, 12, 30, 2, 9, 45, tzinfo=UTC)
PAUSED = datetime(2025, 12, 30, 2, 11, tzinfo=UTC)


async def asked(
    aiohttp_client: Any, db: str, query: str, status: int = 200, html: bool = False
) -> Any:
    """The admin endpoint's answer for VALID_ID with `query`: JSON, or the page's text."""
    config = load_config(flags={"upstream": "http://127.0.0.1:1", "database_url": db})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), db)
    await explainer.open()
    try:
        client = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
        headers = {"Accept": BROWSER} if html else {}
        response = await client.get(f"/sessions/{VALID_ID}/explain?{query}", headers=headers)
        assert response.status == status, await response.text()
        return await response.text() if html else await response.json()
    finally:
        await explainer.close()


def ms(at: datetime) -> str:
    """A moment as Grafana's `${__value.time}` gives it."""
    return str(round(at.timestamp() * 1000))


@pytest.fixture
async def paused(conn: asyncpg.Connection) -> None:
    """Created ACTIVE at CREATED, paused at PAUSED, both as observed mode records them."""
    await observed(conn, "create", "ACTIVE", True, CREATED, "request r-1")
    await observed(conn, "pause", "PAUSED", True, PAUSED, "request r-2")


@pytest.mark.usefixtures("paused")
async def test_each_moment_gets_the_reason_its_evidence_gave(aiohttp_client: Any, db: str) -> None:
    now = await asked(aiohttp_client, db, "")
    assert now["reason"] == "upstream_inconsistent" and now["at"] is None
    just_paused = await asked(aiohttp_client, db, f"at={ms(PAUSED + timedelta(seconds=2))}")
    assert just_paused["reason"] == "not_yet_visible"
    assert just_paused["state"] == "PAUSED"
    assert just_paused["why"] == (
        "minted 2025-12-30 02:09:44 UTC, PAUSED after a change at 2025-12-30 02:11:00 UTC by"
        " session-lens (observed: request r-2), 2 s before then, within the visibility window"
        " (5 s): the upstream's store may not show it yet"
    )
    between = await asked(aiohttp_client, db, "at=2025-12-30T02:10:30Z")
    assert (between["reason"], between["state"]) == ("upstream_inconsistent", "ACTIVE")
    assert between["at"] == "2025-12-30T02:10:30+00:00"
    before = await asked(aiohttp_client, db, "at=2025-12-30T02:09:44.500Z")
    assert (before["reason"], before["state"]) == ("never_existed", None)
    # The whole timeline is shown, the moment's notes said.
    assert len(before["timeline"]) == 2
    assert any(
        "cannot tell whether the evidence was had in time" in n for n in before["replay_notes"]
    )


async def test_a_creation_in_progress_replays_as_creating(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    """A two-step creation: a miss while CREATING is `creating`, though explained later."""
    await write(conn, "INSERT INTO sessions (id, state) VALUES ($1, 'CREATING')", VALID_ID)
    during = await conn.fetchval("SELECT clock_timestamp()")
    await write(conn, "UPDATE sessions SET state = 'ACTIVE' WHERE id = $1", VALID_ID)
    assert (await asked(aiohttp_client, db, ""))["reason"] == "not_yet_visible"
    then = await asked(aiohttp_client, db, f"at={during.isoformat().replace('+00:00', 'Z')}")
    assert (then["reason"], then["state"]) == ("creating", "CREATING")
    page = await asked(aiohttp_client, db, f"at={ms(during)}", html=True)
    assert 'data-reason="creating"' in page
    assert "the evidence replayed as it stood then" in page
    assert "(after the moment replayed)" in page  # the entry into ACTIVE came later


async def test_a_miss_that_asked_for_deleted_sessions_leads_with_that_reason(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    await observed(conn, "create", "ACTIVE", True, CREATED, "r-1")
    await observed(conn, "delete", "DELETED", True, PAUSED, "r-2")
    await observed(conn, "restore", "STOPPED", True, PAUSED + timedelta(minutes=5), "r-3")
    at = ms(PAUSED + timedelta(minutes=1))
    report = await asked(aiohttp_client, db, f"at={at}&given=deleted_not_served")
    assert (report["reason"], report["reason_with_include_deleted"]) == (
        "deleted",
        "deleted_not_served",
    )
    assert report["deleted_at"] == PAUSED.isoformat()
    assert report["replay_notes"] == []  # the reason given is one the replay gives
    page = await asked(aiohttp_client, db, f"at={at}&given=deleted_not_served", html=True)
    assert 'data-reason="deleted_not_served"' in page
    assert "asked without it: <code>deleted</code>" in page


@pytest.mark.usefixtures("paused")
async def test_what_cannot_be_replayed_is_said(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    unknown = await asked(aiohttp_client, db, "at=2025-12-30T02:10:30Z&given=unknown")
    assert unknown["given"] == "unknown"
    assert unknown["replay_notes"] == [
        "the miss was given unknown: the evidence was not had in time (a timeout, the breaker"
        " open, the database down), which cannot be replayed; as the records stood then, it"
        " would have been upstream_inconsistent"
    ]
    other = await asked(aiohttp_client, db, "at=2025-12-30T02:10:30Z&given=creating")
    assert "the miss was given creating, the records as replayed give" in other["replay_notes"][0]
    # Pruned history: the records before the horizon are gone.
    await track_since(conn, datetime(2026, 1, 1, tzinfo=UTC))
    pruned = await asked(aiohttp_client, db, "at=2025-12-30T02:10:30Z&given=upstream_inconsistent")
    assert pruned["replay_notes"] == [
        "the records before 2026-01-01 00:00:00.000 UTC were pruned since: the evidence then may"
        " have held more than is left"
    ]


@pytest.mark.usefixtures("paused")
async def test_an_empty_given_is_none(aiohttp_client: Any, db: str) -> None:
    """A link whose exemplar's series has no reason label passes `given=`."""
    report = await asked(aiohttp_client, db, "at=2025-12-30T02:10:30Z&given=")
    assert report["given"] is None and report["reason"] == "upstream_inconsistent"


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("at=yesterday", "'yesterday' is not a moment"),
        ("at=1767060584", "is before the ID was minted"),  # seconds, not milliseconds
        ("at=2999-01-01T00:00:00Z", "is later than the database's clock"),
        ("at=2025-12-30T02:10:30Z&given=lost", "'lost' is not a reason"),
    ],
)
async def test_a_moment_that_cannot_be_replayed_is_a_clear_400(
    aiohttp_client: Any, db: str, query: str, detail: str
) -> None:
    report = await asked(aiohttp_client, db, query, status=400)
    assert detail in report["detail"]
    page = await asked(aiohttp_client, db, query, status=400, html=True)
    assert "Cannot replay that moment" in page


@pytest.mark.usefixtures("paused")
def test_the_command_replays_a_moment(db: str) -> None:
    result = run("explain", VALID_ID, "--database-url", db, "--at", "2025-12-30T02:11:02Z")
    assert result.returncode == 0, result.stderr
    assert "a miss at 2025-12-30 02:11:02+00:00 was: not_yet_visible" in result.stdout
    assert "replay: a replay cannot tell" in result.stdout
    result = run(
        "explain", VALID_ID, "--database-url", db, "--at", "2025-12-30T02:10:30Z",
        "--given", "unknown",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(it was given unknown)" in result.stdout
    for args, said in (
        (["--at", "noon"], "--at: 'noon' is not a moment"),
        (["--given", "unknown"], "--given: goes with --at"),
        (["--at", "1767060584"], "is before the ID was minted"),
    ):
        result = run("explain", VALID_ID, "--database-url", db, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_moments_read_as_grafana_and_people_write_them() -> None:
    expected = datetime(2025, 12, 30, 2, 10, 30, 250000, tzinfo=UTC)
    assert moment("1767060630250") == expected
    assert moment("2025-12-30T02:10:30.25Z") == expected
    assert moment("2025-12-30T03:10:30.25+01:00") == expected
    assert moment("2025-12-30 02:10:30.25") == expected  # no offset: UTC
    with pytest.raises(ReplayError):
        moment("2025-13-30T02:10:30Z")


def entry(number: int, at: datetime, old: str | None, new: str | None) -> AuditEntry:
    return AuditEntry(number, at, old, new, "observed", "session-lens", None)


def test_a_timeline_read_in_part_is_said_to_be() -> None:
    timeline = [entry(1, CREATED, None, "ACTIVE"), entry(2, PAUSED, "ACTIVE", "PAUSED")]
    now = Evidence("STOPPED", CREATED, PAUSED, None, "PAUSED", "STOPPED", PAUSED, "x", PAUSED, None)
    later = PAUSED + timedelta(minutes=1)
    replayed, limits = as_of(now, timeline, later, complete=False)
    assert replayed.state == "PAUSED" and replayed.now == later
    assert limits == [
        "only the first 2 audit entries were read: later ones may have changed the state by then"
    ]
    _, limits = as_of(now, timeline, CREATED + timedelta(seconds=30), complete=False)
    assert limits == []  # a moment inside what was read: nothing is missing
    _, limits = as_of(now, timeline, CREATED + timedelta(milliseconds=400))
    assert limits == [
        "the change at 2025-12-30 02:09:45.000 UTC came 400 ms before the moment: a miss"
        " explained before it was committed read the records without it"
    ]


def test_a_row_without_audit_entries_stands_for_itself_then() -> None:
    row = Evidence("ACTIVE", CREATED, CREATED, None, None, None, None, None, PAUSED, None)
    replayed, limits = as_of(row, [], PAUSED)
    assert replayed.state == "ACTIVE" and replayed.now == PAUSED
    assert limits == ["the row has no audit entry: its state now stands for its state then"]
    before, limits = as_of(row, [], CREATED - timedelta(seconds=1))
    assert before.state is None and limits == []
