"""An import run: the source's pages in order, IDs checked, each page in its own transaction.

The next page is read and checked while the current one is written. A page commits
whole or not at all, so an interrupted run keeps whole pages; running it again skips
the sessions the store already knows and completes it.
"""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from ..config import Config, mask_url
from ..ids import IdValidator
from ..migrations import Progress, plan, qualified
from .errors import ImportFailed
from .options import Options
from .sources import (
    ID_COLUMNS,
    LOST,
    DatabaseSource,
    FileSource,
    Refused,
    Row,
    Source,
    connect,
    to_text,
)
from .writer import Store

SHOWN_REFUSALS = 100


@dataclass
class Summary:
    """What an import did, kept up to date page by page."""

    read: int = 0
    imported: int = 0
    known: int = 0
    refused: int = 0
    refusals: list[tuple[str, str]] = field(default_factory=list)
    """The first refused rows (where, why), as many as are shown."""
    pages: int = 0

    def refuse(self, rows: Sequence[tuple[int, str, str]]) -> None:
        """Count refused rows (position, where, why), keeping the first ones to show."""
        self.refused += len(rows)
        room = SHOWN_REFUSALS - len(self.refusals)
        self.refusals.extend((where, why) for _, where, why in rows[:room])


async def run(
    config: Config,
    options: Options,
    summary: Summary,
    on_start: Callable[[int | None, str], Progress] | None = None,
) -> Summary:
    """Import every page of the source into the lifecycle store; fills `summary` as it goes."""
    assert config.database_url is not None
    validator = config.id_validator
    store_conn = await connect(config.database_url)
    try:
        store = await _store(store_conn, config, options)
        source = await _open(options, store_conn)
        try:
            await store.prepare(source.columns, options.state_expression)
            progress = on_start(source.total, source.unit) if on_start else None
            await _pages(source, store, validator, options, summary, progress)
        finally:
            await source.close()
    except LOST as exc:
        raise ImportFailed(
            f"lost the lifecycle store {mask_url(config.database_url)}: {exc}"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise ImportFailed(f"the lifecycle store refused a page: {exc}") from exc
    finally:
        store_conn.terminate()  # an unfinished page, if any, is rolled back with it
    return summary


async def _store(conn: asyncpg.Connection, config: Config, options: Options) -> Store:
    """The lifecycle store to write, once it is known to be migrated."""
    assert config.database_url is not None
    tables = await qualified(conn, config.tables)
    found = await plan(conn, tables)
    if found.pending:
        raise ImportFailed(
            f"the lifecycle tables in {mask_url(config.database_url)} are not migrated:"
            " run `session-lens migrate` first"
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    reason = f"imported {stamp} UTC from {options.label}"
    return Store(conn, tables, reason, str(config.id_timezone))


async def _open(options: Options, store_conn: asyncpg.Connection) -> Source:
    """The source the options name, open, its columns known."""
    if options.database_url is None:
        assert options.path is not None
        file = FileSource(options.path, options.format)
        file.open()
        return file
    assert options.query is not None
    database = DatabaseSource(options.database_url, options.query)
    try:
        await database.open(store_conn)
    except BaseException:
        await database.close()
        raise
    return database


@dataclass(slots=True)
class Page:
    """One page of the source, its IDs checked: the rows to write and those refused."""

    read: int
    units: int
    good: list[Row] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    """Where each good row was in the page, to report refusals in the source's order."""
    refused: list[tuple[int, str, str]] = field(default_factory=list)


async def _checked(
    source: Source, validator: IdValidator, id_index: int, size: int
) -> AsyncIterator[Page]:
    async for rows, units in source.pages(size):
        page = Page(len(rows), units)
        for position, row in enumerate(rows):
            first = row.values[0] if row.values else None
            if isinstance(first, Refused):
                page.refused.append((position, row.where, first.why))
                continue
            value = row.values[id_index]
            session_id = value if isinstance(value, str) else to_text(value) or ""
            rule = validator.check(session_id)
            if rule is not None:
                why = f"{session_id[:64]!r}: invalid ID ({rule})"
                page.refused.append((position, row.where, why))
                continue
            if session_id is not value:
                values = list(row.values)
                values[id_index] = session_id
                row = Row(row.where, tuple(values))
            page.good.append(row)
            page.positions.append(position)
        yield page


async def _read_ahead(pages: AsyncIterator[Page]) -> AsyncIterator[Page]:
    """The pages, the next one read and checked while the current one is written."""
    following: asyncio.Future[Page | None] = asyncio.ensure_future(anext(pages, None))
    try:
        while (page := await following) is not None:
            following = asyncio.ensure_future(anext(pages, None))
            yield page
    finally:
        following.cancel()
        if following.done() and not following.cancelled():
            following.exception()  # retrieved: the error that stopped us is the one to tell


async def _pages(
    source: Source,
    store: Store,
    validator: IdValidator,
    options: Options,
    summary: Summary,
    progress: Progress | None,
) -> None:
    names = [column.name for column in source.columns]
    id_index = next(names.index(name) for name in ID_COLUMNS if name in names)
    checked = _checked(source, validator, id_index, options.page_size)
    async for page in _read_ahead(checked):
        left_out = await store.write(page.good, options.dry_run) if page.good else []
        for index, outcome, why in left_out:
            if outcome == "known":
                summary.known += 1
            else:
                row = page.good[index]
                where = page.positions[index]
                page.refused.append((where, row.where, f"{row.values[id_index]}: {why}"))
        summary.read += page.read
        summary.imported += len(page.good) - len(left_out)
        summary.refuse(sorted(page.refused))
        summary.pages += 1
        if progress is not None:
            progress(page.units)
