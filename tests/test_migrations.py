"""The migration on empty and legacy tables, and what the database enforces afterwards."""

import asyncio
import dataclasses
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from session_lens.migrations import (
    EARLIER,
    MIGRATIONS,
    RELEASED,
    Migration,
    MigrationChanged,
    MigrationError,
    checksum,
    migrate,
    plan,
)
from session_lens.schema import TRANSITIONS, SessionState, Tables

from .conftest import with_database

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


async def test_an_expression_the_table_cannot_take_changes_nothing(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("CREATE TABLE sessions (id text PRIMARY KEY, kind text)")
        await conn.execute(f"INSERT INTO sessions VALUES ('{SID}', 'odd')")
        with pytest.raises(MigrationError, match="migration 001 failed: backfill_state"):
            await migrate(conn, Tables(), "CASE WHEN sort = 'odd' THEN 'ACTIVE' END")
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'sessions'"
        )
        assert sorted(c["column_name"] for c in columns) == ["id", "kind"]
        assert await conn.fetchval("SELECT to_regclass('session_audit')") is None
    finally:
        await conn.close()


async def test_a_state_outside_the_model_stops_the_backfill_at_its_batch(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("CREATE TABLE sessions (id text PRIMARY KEY, kind text)")
        await conn.execute(
            "INSERT INTO sessions SELECT 'exec_20251230_020944_' || lpad(to_hex(g), 8, '0'),"
            " CASE WHEN g = 250 THEN 'odd' END FROM generate_series(1, 300) AS g"
        )
        weird = "CASE WHEN kind = 'odd' THEN 'WEIRD' ELSE 'ACTIVE' END"
        with pytest.raises(
            MigrationError, match="gave 'WEIRD' for row 'exec_20251230_020944_000000fa'"
        ):
            await migrate(conn, Tables(), weird, batch_size=100)
        # The batches before it are kept; the one holding the row rolled back.
        assert await conn.fetchval("SELECT count(state) FROM sessions") == 200
        assert await conn.fetchval("SELECT count(*) FROM session_audit") == 200
        fixed = "CASE WHEN kind = 'odd' THEN 'STOPPED' ELSE 'ACTIVE' END"
        assert await migrate(conn, Tables(), fixed, batch_size=100) == []
        assert await conn.fetchval("SELECT count(state) FROM sessions") == 300
        audit = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT session_id) AS ids FROM session_audit"
        )
        assert (audit["n"], audit["ids"]) == (300, 300)
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


# Checksums: a released text never changes; databases migrated from earlier texts
# are brought forward by a new version.

EARLIER_TEXTS = Path(__file__).parent / "migrations_earlier"
"""Texts 001-005 had before their released ones, as the history holds them."""


def _earlier(name: str) -> Migration:
    """An earlier text, by file name without `.sql`: `004_event_time.6b96a35`."""
    match = re.fullmatch(r"(\d{3})_(\w+)\.[0-9a-f]+", name)
    assert match, name
    text = (EARLIER_TEXTS / f"{name}.sql").read_text(encoding="utf-8")
    return Migration(int(match[1]), match[2], text)


CURRENT = {migration.version: migration for migration in MIGRATIONS}
HISTORIES = {
    "first texts": [
        "001_lifecycle.9efebd1",
        "002_observed.86ed12f",
        "003_horizon.2685a80",
        "004_event_time.6b96a35",
    ],
    "004 of 661999d": [1, 2, "003_horizon.2685a80", "004_event_time.661999d"],
    "004 of 136ec9b": [1, 2, "003_horizon.2685a80", "004_event_time.136ec9b"],
    "005 since folded into 004": [
        1,
        2,
        "003_horizon.2685a80",
        "004_event_time.6b96a35",
        "005_recording.65acfde",
    ],
}


async def _migrate_before_checksums(conn: asyncpg.Connection, history: list[Any]) -> None:
    """What the runner did before checksums: each version in one transaction, numbered, named."""
    tables = Tables("public.sessions")
    for step in history:
        migration = CURRENT[step] if isinstance(step, int) else _earlier(step)
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS public.session_lens_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            before, after = migration.render(tables)
            await conn.execute(before)
            if after:  # no rows yet: nothing to backfill between
                await conn.execute(after)
            await conn.execute(
                "INSERT INTO public.session_lens_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )


async def _schema(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """What the migrations define: functions, columns, indexes, triggers, constraints."""
    queries = {
        "functions": "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc AS p"
        " WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1, 2",
        "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, ordinal_position",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " ORDER BY 1",
        "triggers": "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE NOT tgisinternal ORDER BY 1",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
        " FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
    }
    return {what: [tuple(row) for row in await conn.fetch(sql)] for what, sql in queries.items()}


async def _checksums(conn: asyncpg.Connection) -> dict[int, str | None]:
    rows = await conn.fetch("SELECT version, checksum FROM session_lens_migrations")
    return {row["version"]: row["checksum"] for row in rows}


@pytest.fixture
async def fresh_db(postgres_url: str) -> AsyncIterator[str]:
    """A second database, migrated from scratch by this release, to compare with."""
    name = "sl_test_" + uuid.uuid4().hex[:16]
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = with_database(postgres_url, name)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn, Tables())
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def test_released_migrations_keep_their_text() -> None:
    for migration in MIGRATIONS:
        assert migration.version in RELEASED, (
            f"{migration.file} is not in RELEASED: add its checksum {migration.checksum}"
        )
        assert migration.checksum == RELEASED[migration.version], (
            f"{migration.file} changed after its release: restore its text and put the change"
            " in a new version"
        )
    assert set(RELEASED) == set(CURRENT)


def test_earlier_texts_are_the_ones_known() -> None:
    found: dict[int, set[str]] = {}
    for path in EARLIER_TEXTS.glob("*.sql"):
        migration = _earlier(path.stem)
        found.setdefault(migration.version, set()).add(migration.checksum)
    found.pop(5)  # a version no longer used: nothing of 005 is checked
    assert found == EARLIER
    assert not set().union(*EARLIER.values()) & set(RELEASED.values())


async def test_a_fresh_database_records_checksums(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        assert await migrate(conn, Tables()) == ALL
        assert await _checksums(conn) == RELEASED
        before = await conn.fetch("SELECT * FROM session_lens_migrations ORDER BY version")
        assert await migrate(conn, Tables()) == []
        assert await conn.fetch("SELECT * FROM session_lens_migrations ORDER BY version") == before
    finally:
        await conn.close()


REDEFINED_LATER = {"session_lens_guard", "session_lens_audit", "session_lens_record_events"}
"""What 008 (the audit trigger, a function of its own) and 009 (the guard) define again."""


@pytest.mark.parametrize("history", HISTORIES)
async def test_earlier_texts_are_brought_forward(
    empty_db: str, fresh_db: str, history: str
) -> None:
    conn, fresh = await asyncpg.connect(empty_db), await asyncpg.connect(fresh_db)
    try:
        await _migrate_before_checksums(conn, HISTORIES[history])
        # The first event of a session is its deletion: some earlier texts left no deleted_at.
        await conn.execute(
            "SELECT session_lens_record($1, $2, 'delete', 'DELETED', true, now(), NULL)",
            uuid.uuid4(),
            SID,
        )
        # The merge's 004 differs from the released one in a comment only (008 and
        # 009 define some of the functions again, and 008 one of its own).
        functions, released = [
            [f for f in (await _schema(db))["functions"] if f[0] not in REDEFINED_LATER]
            for db in (conn, fresh)
        ]
        assert (functions != released) == (history != "004 of 136ec9b")
        assert await migrate(conn, Tables()) == [6, 7, 8, 9]
        assert await _schema(conn) == await _schema(fresh)
        recorded = await _checksums(conn)
        assert {v: c for v, c in recorded.items() if v != 5} == RELEASED
        assert recorded.get(5, "absent") in (None, "absent")  # kept, never checked
        row = await conn.fetchrow("SELECT state, deleted_at, updated_at FROM sessions")
        assert row["state"] == "DELETED" and row["deleted_at"] == row["updated_at"]
        assert await migrate(conn, Tables()) == []
        assert await _checksums(conn) == recorded
    finally:
        await conn.close()
        await fresh.close()


def _session_lens(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "session_lens", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dry_run_on_a_new_store_prints_no_backfill(empty_db: str) -> None:
    """Observed mode on a database of its own: the sessions table is created empty."""
    result = _session_lens("migrate", "--dry-run", "--database-url", empty_db)
    assert result.returncode == 0, result.stderr
    assert "does not exist: it will be created" in result.stdout
    assert "is created empty: no backfill" in result.stdout
    assert "-- backfill, batch after batch" not in result.stdout


def test_dry_run_before_checksums_says_what_it_records(empty_db: str) -> None:
    async def before_checksums() -> None:
        conn = await asyncpg.connect(empty_db)
        await _migrate_before_checksums(conn, HISTORIES["first texts"])
        await conn.close()

    asyncio.run(before_checksums())
    result = _session_lens("migrate", "--dry-run", "--database-url", empty_db)
    assert result.returncode == 0, result.stderr
    assert (
        "-- 001, 002, 003, 004 applied before checksums were kept:"
        " their released checksums will be recorded"
    ) in result.stdout
    assert "-- migration 006 recording" in result.stdout
    assert "-- backfill" not in result.stdout  # 006 has none

    result = _session_lens("migrate", "--database-url", empty_db)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "checksums recorded for 001, 002, 003, 004\napplied 006, 007, 008, 009; 0 rows backfilled\n"
    )


async def test_a_changed_released_migration_is_refused(empty_db: str) -> None:
    changed = [
        dataclasses.replace(m, template=m.template + "\n-- and one more thing\n")
        if m.version == 3
        else m
        for m in MIGRATIONS
    ]
    conn = await asyncpg.connect(empty_db)
    try:
        assert await migrate(conn, Tables(), migrations=MIGRATIONS[:2]) == [1, 2]
        message = (
            r"^migration 003 \(003_horizon\.sql\) is not the released text \(sha256 \w{12},"
            r" released \w{12}\): restore the released text and put the change in a new"
            r" version; nothing was applied$"
        )
        with pytest.raises(MigrationChanged, match=message):
            await migrate(conn, Tables(), migrations=changed)
        assert (await plan(conn, Tables(), migrations=changed)).refused is not None
        assert list(await _checksums(conn)) == [1, 2]
        assert await conn.fetchval("SELECT to_regclass('session_lens_tracking')") is None
    finally:
        await conn.close()


def test_a_database_that_applied_another_text_is_refused(db: str) -> None:
    async def tamper() -> None:
        conn = await asyncpg.connect(db)
        await conn.execute(
            "UPDATE session_lens_migrations SET checksum = $1 WHERE version = 4",
            checksum("-- not 004\n"),
        )
        await conn.execute("DELETE FROM session_lens_migrations WHERE version = 6")
        await conn.close()

    asyncio.run(tamper())
    for dry in ([], ["--dry-run"]):
        result = _session_lens("migrate", "--database-url", db, *dry)
        assert result.returncode == 1
        assert re.fullmatch(
            r"session-lens: migration 004 \(004_event_time\.sql\) was applied to this database"
            r" from another text \(sha256 \w{12}\) than the released one \(\w{12}\): a version"
            r" never runs again; bring its objects to the released text by hand and record its"
            r" checksum, or migrate a new database; nothing was applied\n",
            result.stderr,
        ), result.stderr

    async def untouched() -> list[int]:
        conn = await asyncpg.connect(db)
        versions = list(await _checksums(conn))
        await conn.close()
        return sorted(versions)

    assert asyncio.run(untouched()) == sorted(set(RELEASED) - {6})  # 006 not applied again
