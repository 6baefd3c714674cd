"""What every PostgreSQL client here shares: which failures mean the database cannot be
reached, which refusals are about the values written, what to do about known refusals,
how to let go of a connection whose query did not end."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

CLOSE_TIMEOUT = 2.0
"""Seconds a pool's polite close may take before its connections are cut."""


async def as_it_is(conn: asyncpg.Connection) -> None:
    """A pool's `reset`: nothing. Its connections run single statements that leave no
    session state (settings and locks are the transaction's), so the default reset's
    round trip (`RESET ALL`, `UNLISTEN *`, ...) on every release buys nothing."""


@asynccontextmanager
async def held(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the pool, terminated rather than released as it is when its query
    did not end (the deadline passed, or the caller gave up): asyncpg would send a cancel
    and wait, shielded from the caller, for the server to confirm it — a minute, on a
    link gone silent."""
    conn = await pool.acquire()
    ended = False
    try:
        yield conn
        ended = True
    except asyncpg.PostgresError:  # the server answered: the connection is fine
        ended = True
        raise
    finally:
        if not ended:
            conn.terminate()
        await pool.release(conn)


async def closed(pool: asyncpg.Pool, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close a pool, cutting its connections if a polite goodbye takes longer than
    `timeout`: on a link gone silent it would take a minute, or as long as TCP waits."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        pool.terminate()


async def executed(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    """Run one statement on a connection of the pool (`held`)."""
    async with held(pool) as conn:
        await conn.execute(sql, *args)


def refused_for_itself(exc: asyncpg.PostgresError) -> bool:
    """Whether the database refused a write because of the values in it (SQLSTATE 22, 23).

    Such a write will never go in and may be skipped; any other refusal is about
    the database (not migrated, a privilege, read-only, disk full, a conflict):
    every write would meet it, so none may be skipped until it is fixed.
    """
    return (exc.sqlstate or "")[:2] in ("22", "23")


_REMEDIES = {
    "42P01": "the lifecycle tables are not migrated: run `session-lens migrate`",
    "42883": "the lifecycle tables are not migrated to this version: run `session-lens migrate`",
    "42703": "the lifecycle tables are not migrated to this version: run `session-lens migrate`",
    "42501": "the database role lacks a privilege on the lifecycle tables: grant it",
    "25006": "the database is read-only (a standby?): point database_url at the primary",
    "53100": "the database's disk is full",
    "53200": "the database is out of memory",
    "53300": "the database has no connection slots left",
    "57P01": "the database is shutting down",
    "57P03": "the database is starting up",
    "40001": "a conflict with another writer: retried",
    "40P01": "a conflict with another writer: retried",
}


def remedy(exc: BaseException) -> str | None:
    """What to do about a refusal from the database, when it is a known one."""
    sqlstate = getattr(exc, "sqlstate", None)
    return _REMEDIES.get(sqlstate) if isinstance(sqlstate, str) else None


UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # admin shutdown, crash recovery
)
