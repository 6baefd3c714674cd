"""`explain` says, for every reason, what the evidence gathered for the ID shows: through
the admin endpoint and the command, over a real PostgreSQL."""

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from session_lens.app import create_admin_app
from session_lens.config import load_config
from session_lens.explain import Explainer
from session_lens.metrics import Metrics

from .conftest import VALID_ID
from .test_cli import run

MINTED = "minted 2025-12-30 02:09:44 UTC"
HORIZON = "2025-01-01 00:00:00 UTC"
AGO = "(some time) ago"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def says(expected: str, why: str) -> bool:
    """Whether `why` is `expected`, with any length of time where it says AGO."""
    pattern = re.escape(expected).replace(re.escape(AGO), r"[\d.]+ (?:s|min|h|days?) ago")
    return re.fullmatch(pattern, why) is not None


async def explained(
    aiohttp_client: Any, db: str, session_id: str = VALID_ID, status: int = 200, **settings: str
) -> dict[str, Any]:
    """The admin endpoint's JSON for one ID, from a listener reading `db`."""
    config = load_config(flags={"upstream": "http://127.0.0.1:1", "database_url": db, **settings})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), db)
    await explainer.open()
    try:
        client = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
        response = await client.get(f"/sessions/{session_id}/explain")
        assert response.status == status
        report: dict[str, Any] = await response.json()
        return report
    finally:
        await explainer.close()


async def write(
    conn: asyncpg.Connection, sql: str, *args: object, actor: str = "", reason: str = "",
    trigger: str = "",
) -> None:  # fmt: skip
    """A write to the sessions table by a writer who names itself, as the README says."""
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('session_lens.actor', $1, true),"
            " set_config('session_lens.reason', $2, true),"
            " set_config('session_lens.trigger', $3, true)",
            actor, reason, trigger,
        )  # fmt: skip
        await conn.execute(sql, *args)


async def observed(
    conn: asyncpg.Connection, action: str, state: str | None, ok: bool, at: datetime, reason: str
) -> None:
    """An event as observed mode's recorder writes it, stamped `at`."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('session_lens.actor', 'session-lens', true)")
        await conn.execute(
            "SELECT session_lens_record(gen_random_uuid(), $1, $2, $3, $4, $5, $6)",
            VALID_ID, action, state, ok, at, reason,
        )  # fmt: skip


async def trail(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT occurred_at FROM session_audit WHERE session_id = $1 ORDER BY occurred_at, id",
        VALID_ID,
    )


async def test_never_existed(aiohttp_client: Any, db: str) -> None:
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "never_existed"
    assert report["why"] == (
        f"{MINTED}, after tracking began on {HORIZON}, and never recorded:"
        " no row and no audit entry"
    )


async def test_predates_tracking(aiohttp_client: Any, db: str) -> None:
    report = await explained(aiohttp_client, db, "exec_20240601_120000_0000000a")
    assert report["reason"] == "predates_tracking"
    assert report["why"] == (
        f"minted 2024-06-01 12:00:00 UTC, before tracking began on {HORIZON}:"
        " no evidence either way (import the service's store to know more)"
    )


async def test_expired(aiohttp_client: Any, db: str) -> None:
    report = await explained(aiohttp_client, db, upstream_retention="30d")
    assert report["reason"] == "expired"
    assert report["why"] == (
        f"{MINTED}, in the partition from 2025-12-30 00:00:00 UTC, which the store's"
        " retention (TTL 30d, partitioned by day) has dropped by now"
    )


async def test_creating(aiohttp_client: Any, db: str, conn: asyncpg.Connection) -> None:
    await write(
        conn,
        "INSERT INTO sessions (id, state, created_at) VALUES ($1, 'CREATING',"
        " now() - interval '10 minutes')",
        VALID_ID,
    )
    created = await conn.fetchval("SELECT created_at FROM sessions")
    report = await explained(aiohttp_client, db, creation_timeout="1h")
    assert report["reason"] == "creating"
    assert report["why"] == (
        f"{MINTED}, CREATING since {when(created)}, 10 min ago, within the creation timeout"
        " (1 h): the lookup raced the creation"
    )


async def test_creation_stuck_is_failed(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    await write(
        conn,
        "INSERT INTO sessions (id, state, created_at) VALUES ($1, 'CREATING',"
        " now() - interval '2 hours')",
        VALID_ID,
    )
    created = await conn.fetchval("SELECT created_at FROM sessions")
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "creation_failed"
    assert report["why"] == (
        f"{MINTED}, CREATING since {when(created)}, 2 h ago, longer than the creation timeout"
        " (30 s): the creation never completed"
    )


async def test_creation_refused_is_failed(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    await observed(
        conn,
        "create",
        None,
        False,
        datetime(2025, 12, 30, 2, 9, 45, tzinfo=UTC),
        "the upstream answered 503",
    )
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "creation_failed"
    assert report["why"] == (
        f"{MINTED}, its creation failed at 2025-12-30 02:09:45 UTC by session-lens"
        " (observed: the upstream answered 503), no row left"
    )


async def test_deleted_and_deleted_not_served(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    await write(
        conn,
        "INSERT INTO sessions (id, state, created_at) VALUES ($1, 'STOPPED', $2)",
        VALID_ID, datetime(2025, 12, 30, 2, 9, 44, tzinfo=UTC),
    )  # fmt: skip
    await write(
        conn,
        "UPDATE sessions SET state = 'DELETED', deleted_at = $2 WHERE id = $1",
        VALID_ID, datetime(2025, 12, 30, 2, 10, 29, tzinfo=UTC),
        actor="ops", reason="the user asked\nby mail",
    )  # fmt: skip
    report = await explained(aiohttp_client, db)
    deletion = (
        f"{MINTED}, deleted at 2025-12-30 02:10:29 UTC by ops (sql: the user asked by mail),"
        " 45 s after its creation"
    )
    assert (report["reason"], report["reason_with_include_deleted"]) == (
        "deleted",
        "deleted_not_served",
    )
    assert report["why"] == (
        f"{deletion}: the upstream hides deleted sessions unless a lookup asks with"
        " include_deleted=true"
    )
    assert report["why_with_include_deleted"] == (
        f"{deletion}: a lookup with include_deleted=true should find it, so a 404 to one"
        " means the upstream ignores include_deleted"
    )


async def test_purged(aiohttp_client: Any, db: str, conn: asyncpg.Connection) -> None:
    await write(conn, "INSERT INTO sessions (id) VALUES ($1)", VALID_ID, actor="svc")
    await write(
        conn, "DELETE FROM sessions WHERE id = $1", VALID_ID, actor="janitor", reason="GDPR erasure"
    )
    created, removed = await trail(conn)
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "purged"
    assert report["why"] == (
        f"{MINTED}, first recorded {when(created['occurred_at'])}, its row removed at"
        f" {when(removed['occurred_at'])} by janitor (sql: GDPR erasure) while ACTIVE:"
        " hard-deleted, only the audit trail remembers it"
    )


async def test_archived(aiohttp_client: Any, db: str, conn: asyncpg.Connection) -> None:
    await write(conn, "INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')", VALID_ID)
    await write(
        conn,
        "UPDATE sessions SET state = 'ARCHIVED' WHERE id = $1",
        VALID_ID, actor="janitor", trigger="retention",
    )  # fmt: skip
    _, archived = await trail(conn)
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "archived"
    assert report["why"] == (
        f"{MINTED}, archived at {when(archived['occurred_at'])} by janitor (retention):"
        " moved to cold storage, where the upstream does not look"
    )


async def test_not_yet_visible(aiohttp_client: Any, db: str, conn: asyncpg.Connection) -> None:
    await write(conn, "INSERT INTO sessions (id) VALUES ($1)", VALID_ID, actor="svc")
    changed = max(await conn.fetchrow("SELECT updated_at, created_at FROM sessions"))
    [entry] = await trail(conn)
    changed = max(changed, entry["occurred_at"])
    report = await explained(aiohttp_client, db, visibility_window="1m")
    assert report["reason"] == "not_yet_visible"
    assert says(
        f"{MINTED}, ACTIVE after a change at {when(changed)} by svc (sql), {AGO}, within the"
        " visibility window (1 min): the upstream's store may not show it yet",
        report["why"],
    ), report["why"]


async def test_upstream_inconsistent(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    await observed(
        conn, "create", "ACTIVE", True, datetime(2025, 12, 30, 2, 9, 45, tzinfo=UTC), "request r-1"
    )
    await observed(
        conn, "pause", "PAUSED", True, datetime(2025, 12, 30, 2, 11, tzinfo=UTC), "request r-2"
    )
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "upstream_inconsistent"
    assert says(
        f"{MINTED}, PAUSED since 2025-12-30 02:11:00 UTC by session-lens (observed: request r-2),"
        f" {AGO}, past the visibility window (5 s): the records say it is live, so a 404 means"
        " the upstream lost it",
        report["why"],
    ), report["why"]


async def test_a_state_the_model_does_not_know_is_unknown(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    # A table whose check an operator dropped: whatever it holds, explain says what it is.
    await conn.execute("ALTER TABLE sessions DROP CONSTRAINT session_lens_state_check")
    await write(conn, "INSERT INTO sessions (id, state) VALUES ($1, 'LOST')", VALID_ID)
    report = await explained(aiohttp_client, db)
    assert report["reason"] == "unknown"
    assert report["why"] == (
        f"{MINTED}, its row's state 'LOST' is none the lifecycle model knows:"
        " no reason follows from it"
    )


async def test_invalid_format_says_what_the_id_shows(aiohttp_client: Any, db: str) -> None:
    cases = {
        "exec_20251330_020944_4ad060d9": "it names 2025-13-30 02:09:44, a date or time that"
        " does not exist",
        "exec_2025": "it does not have the form exec_YYYYMMDD_HHMMSS_xxxxxxxx (x: lowercase hex)",
        "exec_20991231_235959_4ad060d9": "it is dated 2099-12-31 23:59:59 UTC, more than 24 h"
        " ahead of now (the allowed clock skew)",
        "x" * 65: "it is 65 characters long, more than 64",
    }
    for session_id, shows in cases.items():
        report = await explained(aiohttp_client, db, session_id, status=400)
        assert report["reason"] == "invalid_format"
        assert report["why"] == f"{shows}: a malformed ID, which no session has", session_id


async def test_the_page_says_both_sentences(
    aiohttp_client: Any, db: str, conn: asyncpg.Connection
) -> None:
    await write(conn, "INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')", VALID_ID)
    await write(
        conn, "UPDATE sessions SET state = 'DELETED' WHERE id = $1", VALID_ID, actor="<b>ops</b>"
    )
    config = load_config(flags={"upstream": "http://127.0.0.1:1", "database_url": db})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), db)
    await explainer.open()
    try:
        client = await aiohttp_client(create_admin_app(config, CollectorRegistry(), explainer))
        report = await (await client.get(f"/sessions/{VALID_ID}/explain")).json()
        page = await client.get(f"/sessions/{VALID_ID}/explain", headers={"Accept": BROWSER})
        text = await page.text()
    finally:
        await explainer.close()
    for sentence in (report["why"], report["why_with_include_deleted"]):
        assert "by <b>ops</b> (sql)" in sentence
        assert sentence.replace("<", "&lt;").replace(">", "&gt;") in text


def test_the_command_says_why_for_a_deleted_session_and_a_malformed_id(db: str) -> None:
    async def setup() -> None:
        conn = await asyncpg.connect(db)
        await write(
            conn,
            "INSERT INTO sessions (id, state, created_at) VALUES ($1, 'STOPPED', $2)",
            VALID_ID, datetime(2025, 12, 30, 2, 9, 44, tzinfo=UTC),
        )  # fmt: skip
        await write(
            conn,
            "UPDATE sessions SET state = 'DELETED', deleted_at = $2 WHERE id = $1",
            VALID_ID, datetime(2025, 12, 31, 2, 9, 44, tzinfo=UTC), actor="ops",
        )  # fmt: skip
        await conn.close()

    asyncio.run(setup())
    result = run("explain", VALID_ID, "--database-url", db)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    deletion = (
        f"{MINTED}, deleted at 2025-12-31 02:09:44 UTC by ops (sql), 1 day after its creation"
    )
    at = lines.index("a miss now would be: deleted")
    assert lines[at + 1 : at + 4] == [
        f"  {deletion}: the upstream hides deleted sessions unless a lookup asks with"
        " include_deleted=true",
        "  with include_deleted=true: deleted_not_served",
        f"    {deletion}: a lookup with include_deleted=true should find it, so a 404 to one"
        " means the upstream ignores include_deleted",
    ]

    bad = run("explain", "exec_20251230_020944_4AD060D9", "--database-url", db)
    assert bad.returncode == 2
    assert bad.stdout.splitlines() == [
        "'exec_20251230_020944_4AD060D9' is not a valid session ID (pattern): invalid_format",
        "  it does not have the form exec_YYYYMMDD_HHMMSS_xxxxxxxx (x: lowercase hex):"
        " a malformed ID, which no session has",
    ]
