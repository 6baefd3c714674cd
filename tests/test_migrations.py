"""The migration on empty and legacy tables, and what the database enforces afterwards."""

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from session_lens.migrations import MIGRATIONS, MigrationError, migrate, plan
from session_lens.schema import TRANSITIONS, SessionState, Tables

SID = "exec_20251230_020944_4ad060d9"

ALL = [migration.version for migration in MIGRATIONS]


async def test_empty_database_gets_the_tables(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        assert await migrate(conn, Tables()) == ALL
        assert await migrate(conn, Tables()) == []  # twice in a row: nothing to do
        columns = await conn.fetch(
            "SELECT column_name, is_nullable FROM information_schema.columns"
            " WHERE table_name = 'sessions' ORDER BY ordinal_position"
        )
        assert [(c["column_name"], c["is_nullable"]) for c in columns] == [
            ("id", "NO"),
            ("state", "NO"),
            ("created_at", "NO"),
            ("updated_at", "NO"),
            ("deleted_at", "YES"),
        ]
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        assert {"session_lens_state_idx", "session_audit_session_time_idx"} <= indexes
        assert not {i for i in indexes if i.endswith("occurred_at_idx")}  # prune's own
        assert await conn.fetchval("SELECT count(*) FROM session_lens_migrations") == len(ALL)
    finally:
        await conn.close()


LEGACY_ROWS = 100_000


async def test_legacy_table_keeps_everything_of_its_own(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(
            "CREATE TABLE sessions (id varchar(64) PRIMARY KEY, owner text NOT NULL,"
            " payload jsonb, started timestamptz, retired boolean NOT NULL DEFAULT false)"
        )
        await conn.execute(
            "INSERT INTO sessions (id, owner, payload, started, retired)"
            " SELECT 'exec_20250101_000000_' || lpad(to_hex(g), 8, '0'), 'user' || (g % 97),"
            " jsonb_build_object('n', g), now() - g * interval '1 second', g % 10 = 0"
            " FROM generate_series(1, $1) AS g",
            LEGACY_ROWS,
        )
        theirs = (
            "SELECT md5(string_agg(id || owner || payload::text || started::text || retired::text,"
            " ',' ORDER BY id)) FROM sessions"
        )
        before = await conn.fetchval(theirs)
        found = await plan(conn, Tables())
        assert (found.rows, found.rows_to_backfill, found.table_exists) == (
            LEGACY_ROWS,
            LEGACY_ROWS,
            True,
        )
        seen: list[int] = []
        applied = await migrate(
            conn,
            Tables(),
            "CASE WHEN retired THEN 'STOPPED' ELSE 'ACTIVE' END",
            batch_size=7_000,
            on_backfill=lambda total: seen.append,
        )
        assert applied == ALL
        assert sum(seen) == LEGACY_ROWS and len(seen) == 15  # batches, shown as they go
        assert await conn.fetchval(theirs) == before
        states = dict(await conn.fetch("SELECT state, count(*) FROM sessions GROUP BY state"))
        assert states == {"ACTIVE": 90_000, "STOPPED": 10_000}
        audit = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT session_id) AS ids,"
            " bool_and(trigger = 'migration' AND old_state IS NULL) AS all_backfill"
            " FROM session_audit"
        )
        assert (audit["n"], audit["ids"], audit["all_backfill"]) == (
            LEGACY_ROWS,
            LEGACY_ROWS,
            True,
        )
        assert await migrate(conn, Tables()) == []
        assert await conn.fetchval("SELECT count(*) FROM session_audit") == LEGACY_ROWS
    finally:
        await conn.close()


async def test_configured_table_and_id_column(empty_db: str) -> None:
    tables = Tables("app.runs", "run_key")
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("CREATE SCHEMA app")
        await conn.execute("CREATE TABLE app.runs (run_key text PRIMARY KEY, gone boolean)")
        await conn.execute(f"INSERT INTO app.runs VALUES ('{SID}', true)")
        await migrate(conn, tables, "CASE WHEN gone THEN 'DELETED' ELSE 'ACTIVE' END")
        row = await conn.fetchrow("SELECT state, deleted_at FROM app.runs")
        assert row["state"] == "DELETED" and row["deleted_at"] is not None
        await conn.execute(f"UPDATE app.runs SET state = 'STOPPED' WHERE run_key = '{SID}'")
        moves = await conn.fetch("SELECT old_state, new_state FROM app.session_audit ORDER BY id")
        assert [tuple(m) for m in moves] == [(None, "DELETED"), ("DELETED", "STOPPED")]
    finally:
        await conn.close()


async def test_a_failed_migration_changes_nothing(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("CREATE TABLE sessions (id text PRIMARY KEY, kind text)")
        await conn.execute(f"INSERT INTO sessions VALUES ('{SID}', 'odd')")
        with pytest.raises(MigrationError, match="migration 001 failed"):
            await migrate(conn, Tables(), "CASE WHEN kind = 'odd' THEN 'WEIRD' END")
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'sessions'"
        )
        assert sorted(c["column_name"] for c in columns) == ["id", "kind"]
        assert await conn.fetchval("SELECT to_regclass('session_audit')") is None
    finally:
        await conn.close()


async def test_two_runners_at_once_apply_it_once(empty_db: str) -> None:
    first, second = await asyncpg.connect(empty_db), await asyncpg.connect(empty_db)
    try:
        results = await asyncio.gather(migrate(first, Tables()), migrate(second, Tables()))
        assert sorted(results) == [[], ALL]
    finally:
        await first.close()
        await second.close()


def test_dry_run_prints_sql_and_counts_and_changes_nothing(empty_db: str) -> None:
    async def legacy() -> None:
        conn = await asyncpg.connect(empty_db)
        await conn.execute("CREATE TABLE sessions (id text PRIMARY KEY)")
        await conn.execute(f"INSERT INTO sessions VALUES ('{SID}')")
        await conn.close()

    asyncio.run(legacy())
    result = subprocess.run(
        [sys.executable, "-m", "session_lens", "migrate", "--dry-run", "--database-url", empty_db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "-- public.sessions: 1 rows, 1 to backfill" in result.stdout
    assert 'CREATE TABLE IF NOT EXISTS "public"."session_audit"' in result.stdout
    assert "CREATE TRIGGER session_lens_audit" in result.stdout

    async def untouched() -> list[str]:
        conn = await asyncpg.connect(empty_db)
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'sessions'"
        )
        await conn.close()
        return [r["column_name"] for r in rows]

    assert asyncio.run(untouched()) == ["id"]


async def test_audit_is_append_only(conn: asyncpg.Connection) -> None:
    await conn.execute(f"INSERT INTO sessions (id) VALUES ('{SID}')")
    for statement in (
        "UPDATE session_audit SET reason = 'x'",
        "DELETE FROM session_audit",
        "TRUNCATE session_audit",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM session_audit") == 1


async def test_every_write_is_audited_whoever_makes_it(conn: asyncpg.Connection) -> None:
    await conn.execute(f"INSERT INTO sessions (id, state) VALUES ('{SID}', 'CREATING')")
    await conn.execute(f"UPDATE sessions SET state = 'ACTIVE' WHERE id = '{SID}'")
    await conn.execute(f"UPDATE sessions SET created_at = created_at WHERE id = '{SID}'")  # no move
    async with conn.transaction():
        await conn.execute("SELECT set_config('session_lens.actor', 'ops-alice', true)")
        await conn.execute(f"DELETE FROM sessions WHERE id = '{SID}'")
    rows = await conn.fetch(
        "SELECT old_state, new_state, trigger, actor FROM session_audit ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (None, "CREATING", "sql", "postgres"),
        ("CREATING", "ACTIVE", "sql", "postgres"),
        ("ACTIVE", None, "sql", "ops-alice"),
    ]


@pytest.mark.parametrize("old", list(SessionState))
async def test_the_database_refuses_every_illegal_move(
    conn: asyncpg.Connection, old: SessionState
) -> None:
    for new in SessionState:
        if new == old:
            continue
        await conn.execute("DELETE FROM sessions")
        await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, $2)", SID, old.value)
        statement = conn.execute("UPDATE sessions SET state = $2 WHERE id = $1", SID, new.value)
        if new in TRANSITIONS[old]:
            await statement
        else:
            with pytest.raises(asyncpg.CheckViolationError, match=f"{old} -> {new}"):
                await statement
            assert await conn.fetchval("SELECT state FROM sessions") == old.value


async def test_soft_delete_and_restore_keep_deleted_at(conn: asyncpg.Connection) -> None:
    await conn.execute(f"INSERT INTO sessions (id, state) VALUES ('{SID}', 'STOPPED')")
    await conn.execute(f"UPDATE sessions SET state = 'DELETED' WHERE id = '{SID}'")
    assert await conn.fetchval("SELECT deleted_at FROM sessions") is not None
    await conn.execute(f"UPDATE sessions SET state = 'STOPPED' WHERE id = '{SID}'")
    assert await conn.fetchval("SELECT deleted_at FROM sessions") is None
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(f"UPDATE sessions SET state = 'BOGUS' WHERE id = '{SID}'")


async def test_realistic_legacy_shapes(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(
            "CREATE TABLE sessions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
            " state text, created_at timestamp, updated_at timestamp)"
        )
        await conn.execute(
            "INSERT INTO sessions (state, created_at) SELECT"
            " (ARRAY['running', 'ACTIVE', NULL, 'gone'])[1 + g % 4], CASE WHEN g % 2 = 0"
            " THEN now()::timestamp END FROM generate_series(1, 1000) AS g"
        )
        expression = (
            "CASE state WHEN 'running' THEN 'ACTIVE' WHEN 'gone' THEN 'DELETED' ELSE 'ACTIVE' END"
        )
        assert await migrate(conn, Tables(), expression, batch_size=100) == ALL
        states = dict(await conn.fetch("SELECT state, count(*) FROM sessions GROUP BY state"))
        assert states == {"ACTIVE": 750, "DELETED": 250}
        assert await conn.fetchval("SELECT count(*) FROM sessions WHERE created_at IS NULL") == 0
    finally:
        await conn.close()


async def test_runs_again_after_a_partial_manual_change(db: str) -> None:
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("DROP TABLE session_lens_migrations")
        assert await migrate(conn, Tables()) == ALL
    finally:
        await conn.close()


async def test_triggers_do_not_depend_on_the_search_path(empty_db: str) -> None:
    setup = await asyncpg.connect(empty_db, server_settings={"search_path": "app"})
    other = await asyncpg.connect(empty_db)
    try:
        await setup.execute("CREATE SCHEMA app")
        await migrate(setup, Tables())
        await other.execute(f"INSERT INTO app.sessions (id) VALUES ('{SID}')")
        await other.execute(f"DELETE FROM app.sessions WHERE id = '{SID}'")
        assert await other.fetchval("SELECT count(*) FROM app.session_audit") == 2
        assert await other.fetchval("SELECT to_regclass('public.session_audit')") is None
    finally:
        await setup.close()
        await other.close()


def test_database_errors_are_clear_lines(empty_db: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "session_lens", "migrate", "--database-url", empty_db,
         "--sessions-table", "nosuch.sessions"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("session-lens: cannot migrate nosuch.sessions: ")
    assert "Traceback" not in result.stderr
