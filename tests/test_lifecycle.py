"""The lifecycle library, as a session service would use it, against a real PostgreSQL."""

import asyncpg
import pytest

from session_lens.lifecycle import (
    CreationFailed,
    IllegalTransition,
    Lifecycle,
    LifecycleError,
    LookupReason,
    SessionNotFound,
)
from session_lens.schema import SessionState

SID = "exec_20251230_020944_4ad060d9"
OTHER = "exec_20251230_020944_0000beef"


async def audit(conn: asyncpg.Connection, session_id: str = SID) -> list[tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT old_state, new_state, trigger, actor, reason FROM session_audit"
        " WHERE session_id = $1 ORDER BY id",
        session_id,
    )
    return [tuple(row) for row in rows]


async def test_create_is_atomic_and_audited(conn: asyncpg.Connection) -> None:
    lifecycle = Lifecycle(conn, actor="svc")
    session = await lifecycle.create_session(SID)
    assert session.state is SessionState.ACTIVE
    assert session.deleted_at is None
    assert await audit(conn) == [
        (None, "CREATING", "create", "svc", None),
        ("CREATING", "ACTIVE", "create", "svc", None),
    ]


async def test_failure_between_row_and_commit_leaves_only_the_failure(
    conn: asyncpg.Connection,
) -> None:
    async def refuse(connection: asyncpg.Connection, session_id: str) -> None:
        # The row and its first audit entry exist at this point, inside the transaction.
        assert await connection.fetchval("SELECT count(*) FROM sessions") == 1
        raise RuntimeError("quota exceeded")

    lifecycle = Lifecycle(conn, actor="svc")
    with pytest.raises(CreationFailed, match="quota exceeded"):
        await lifecycle.create_session(SID, verify=refuse)
    assert await conn.fetchval("SELECT count(*) FROM sessions") == 0
    assert await audit(conn) == [
        ("CREATING", None, "create", "svc", "RuntimeError: quota exceeded")
    ]


async def test_required_fields_are_checked_before_commit(conn: asyncpg.Connection) -> None:
    await conn.execute("ALTER TABLE sessions ADD COLUMN owner text")
    lifecycle = Lifecycle(conn)
    with pytest.raises(CreationFailed, match="missing required fields: owner"):
        await lifecycle.create_session(SID, {"owner": None}, required=["owner"])
    assert await conn.fetchval("SELECT count(*) FROM sessions") == 0
    created = await lifecycle.create_session(OTHER, {"owner": "alice"}, required=["owner"])
    assert created.state is SessionState.ACTIVE
    assert await conn.fetchval("SELECT owner FROM sessions") == "alice"


async def test_duplicate_creation_is_refused_without_a_failure_entry(
    conn: asyncpg.Connection,
) -> None:
    lifecycle = Lifecycle(conn)
    await lifecycle.create_session(SID)
    with pytest.raises(CreationFailed, match="UniqueViolationError"):
        await lifecycle.create_session(SID)
    assert len(await audit(conn)) == 2


async def test_malformed_ids_are_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(LifecycleError, match="invalid session id"):
        await Lifecycle(conn).create_session("exec_nope")


async def test_the_whole_life(conn: asyncpg.Connection) -> None:
    lifecycle = Lifecycle(conn, actor="svc")
    await lifecycle.create_session(SID)
    await lifecycle.pause(SID)
    await lifecycle.resume(SID)
    await lifecycle.stop(SID, reason="user asked")
    deleted = await lifecycle.soft_delete(SID)
    assert deleted.state is SessionState.DELETED and deleted.deleted_at is not None
    restored = await lifecycle.restore(SID)
    assert restored.state is SessionState.STOPPED and restored.deleted_at is None
    archived = await lifecycle.archive(SID, actor="janitor", trigger="retention")
    assert archived.state is SessionState.ARCHIVED
    moves = [(old, new) for old, new, *_ in await audit(conn)]
    assert moves == [
        (None, "CREATING"),
        ("CREATING", "ACTIVE"),
        ("ACTIVE", "PAUSED"),
        ("PAUSED", "ACTIVE"),
        ("ACTIVE", "STOPPED"),
        ("STOPPED", "DELETED"),
        ("DELETED", "STOPPED"),
        ("STOPPED", "ARCHIVED"),
    ]
    last = (await audit(conn))[-1]
    assert last == ("STOPPED", "ARCHIVED", "retention", "janitor", None)
    assert (await audit(conn))[4][4] == "user asked"


async def test_illegal_moves_raise_naming_both_states_and_change_nothing(
    conn: asyncpg.Connection,
) -> None:
    lifecycle = Lifecycle(conn)
    await lifecycle.create_session(SID)
    before = await audit(conn)
    with pytest.raises(IllegalTransition, match="ACTIVE -> ARCHIVED") as caught:
        await lifecycle.archive(SID)
    assert (caught.value.old, caught.value.new) == (SessionState.ACTIVE, SessionState.ARCHIVED)
    with pytest.raises(IllegalTransition, match="ACTIVE -> DELETED"):
        await lifecycle.soft_delete(SID)
    assert await audit(conn) == before
    assert (await lifecycle.get_session(SID)).session.state is SessionState.ACTIVE  # type: ignore[union-attr]
    with pytest.raises(SessionNotFound):
        await lifecycle.pause(OTHER)


async def test_lookups_say_why(conn: asyncpg.Connection) -> None:
    lifecycle = Lifecycle(conn)
    await lifecycle.create_session(SID)
    found = await lifecycle.get_session(SID)
    assert (found.found, found.reason) == (True, LookupReason.OK)
    assert (await lifecycle.get_session("bad")).reason is LookupReason.INVALID_FORMAT
    assert (await lifecycle.get_session(OTHER)).reason is LookupReason.NEVER_EXISTED
    await lifecycle.stop(SID)
    await lifecycle.soft_delete(SID)
    hidden = await lifecycle.get_session(SID)
    assert (hidden.found, hidden.reason) == (False, LookupReason.DELETED)
    shown = await lifecycle.get_session(SID, include_deleted=True)
    assert (shown.found, shown.reason) == (True, LookupReason.OK)
    await lifecycle.archive(SID)
    archived = await lifecycle.get_session(SID, include_deleted=True)
    assert (archived.found, archived.reason) == (False, LookupReason.ARCHIVED)


async def test_list_leaves_deleted_out_unless_asked(conn: asyncpg.Connection) -> None:
    lifecycle = Lifecycle(conn)
    await lifecycle.create_session(SID)
    await lifecycle.create_session(OTHER)
    await lifecycle.stop(OTHER)
    await lifecycle.soft_delete(OTHER)
    assert [s.id for s in await lifecycle.list_sessions()] == [SID]
    assert {s.id for s in await lifecycle.list_sessions(include_deleted=True)} == {SID, OTHER}


async def test_works_through_a_pool(db: str) -> None:
    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    try:
        lifecycle = Lifecycle(pool)
        await lifecycle.create_session(SID)
        assert (await lifecycle.get_session(SID)).found
    finally:
        await pool.close()


async def test_a_refusal_by_another_constraint_is_a_failed_creation(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("ALTER TABLE sessions ADD COLUMN name text UNIQUE")
    lifecycle = Lifecycle(conn)
    await lifecycle.create_session(SID, {"name": "taken"})
    with pytest.raises(CreationFailed, match="UniqueViolationError"):
        await lifecycle.create_session(OTHER, {"name": "taken"})
    [failure] = await audit(conn, OTHER)
    assert failure[:2] == ("CREATING", None)
