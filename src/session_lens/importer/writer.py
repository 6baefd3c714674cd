"""The lifecycle store as the import writes it: one page staged, mapped and written at once.

A page is copied into a temporary table typed like the source, then a temporary
PL/pgSQL function (`import_page.sql`, with `timestamp_ok*.sql`) maps each row to a
state and writes the new sessions with their audit entries, all in one transaction.
The SQL files are templates: identifiers go in quoted, the state expression as the
operator gave it; every value is a $n parameter.
"""

import contextlib
import getpass
from collections.abc import Sequence
from importlib import resources

import asyncpg

from ..migrations.online import minted
from ..schema import SessionState, Tables, quote_ident
from .errors import ImportUsage
from .sources import ID_COLUMNS, LOST, PAGE_TIMEOUT, Column, Row

STAGE = "session_lens_import_stage"
ROW = "session_lens_row"
TIMESTAMP_COLUMNS = ("created_at", "updated_at", "deleted_at")
"""The source's columns read as timestamps; `import_page.sql` has a placeholder for each."""


def _sql(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


PAGE_FUNCTION = _sql("import_page.sql")
TIMESTAMP_OK = _sql("timestamp_ok.sql")
TIMESTAMP_OK_BEFORE_16 = _sql("timestamp_ok_before_16.sql")
SETTINGS = (
    "SELECT set_config('TimeZone', 'UTC', true),"
    " set_config('session_lens.trigger', 'import', true),"
    " set_config('session_lens.actor', $1, true),"
    " set_config('session_lens.reason', $2, true)"
)
IMPORT_PAGE = "SELECT o_row, o_outcome, o_detail FROM pg_temp.session_lens_import_page($1, $2)"


def page_functions(tables: Tables, columns: Sequence[Column], expression: str, v16: bool) -> str:
    """The temporary functions that import a staged page of these columns into `tables`."""
    present = {column.name for column in columns}
    source_id = next(name for name in ID_COLUMNS if name in present)

    def raw(name: str) -> str:
        return f"s.{quote_ident(name)}::text" if name in present else "NULL::text"

    page = PAGE_FUNCTION.format(
        **tables.names,
        stage=STAGE,
        row=ROW,
        source_id=quote_ident(source_id),
        expression=expression,
        state_names=" ".join(SessionState),
        minted=minted("q.sl_id", "zone"),
        **{name: raw(name) for name in TIMESTAMP_COLUMNS},
    )
    return (TIMESTAMP_OK if v16 else TIMESTAMP_OK_BEFORE_16) + page


class Store:
    """The lifecycle store as the import writes it: one page, one transaction."""

    def __init__(self, conn: asyncpg.Connection, tables: Tables, reason: str, zone: str) -> None:
        self._conn = conn
        self._tables = tables
        self._reason = reason
        self._zone = zone
        self._columns: tuple[Column, ...] = ()
        self._actor = _actor()

    async def prepare(self, columns: Sequence[Column], state_expression: str | None) -> None:
        """Create the staging table and the page function; check the state expression."""
        names = [column.name for column in columns]
        _check_columns(names)
        if state_expression is None:
            state_expression = "state" if "state" in names else "'ACTIVE'"
        self._columns = tuple(columns)
        definition = ", ".join(f"{quote_ident(c.name)} {c.type}" for c in columns)
        conn = self._conn
        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{STAGE}")
        await conn.execute(
            f"CREATE TEMPORARY TABLE {STAGE} ({ROW} bigint PRIMARY KEY, {definition})"
            " ON COMMIT DELETE ROWS"
        )
        try:
            await conn.prepare(f"SELECT ({state_expression})::text FROM pg_temp.{STAGE}")
        except asyncpg.PostgresError as exc:
            raise ImportUsage(f"--state-expression {state_expression!r}: {exc}") from exc
        v16 = conn.get_server_version() >= (16, 0)
        await conn.execute(page_functions(self._tables, columns, state_expression, v16))

    async def write(self, rows: Sequence[Row], dry_run: bool) -> list[tuple[int, str, str]]:
        """Stage and import one page; returns (index, outcome, why) of rows not imported."""
        try:
            return await self._write(rows, dry_run, careful=False)
        except asyncpg.DataError:
            # A row the state expression cannot take: the same page, one row at a time.
            return await self._write(rows, dry_run, careful=True)

    async def _write(
        self, rows: Sequence[Row], dry_run: bool, careful: bool
    ) -> list[tuple[int, str, str]]:
        conn = self._conn
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(SETTINGS, self._actor, self._reason, timeout=PAGE_TIMEOUT)
            await conn.copy_records_to_table(
                STAGE,
                records=[(n, *row.values) for n, row in enumerate(rows)],
                columns=[ROW, *(c.name for c in self._columns)],
                timeout=PAGE_TIMEOUT,
            )
            results = await conn.fetch(IMPORT_PAGE, careful, self._zone, timeout=PAGE_TIMEOUT)
        except BaseException:
            if not conn.is_closed():  # when it is, the server has rolled back already
                # A connection cut mid-COPY may refuse even the rollback ("another
                # operation is in progress"); the first error is the one to tell, and
                # the server rolls back a transaction whose connection is gone.
                with contextlib.suppress(*LOST, asyncpg.PostgresError):
                    await transaction.rollback()
            raise
        if dry_run:
            await transaction.rollback()
        else:
            await transaction.commit()
        return [(r["o_row"], r["o_outcome"], r["o_detail"] or "") for r in results]


def _check_columns(names: Sequence[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ImportUsage(f"the source has more than one column named {duplicates[0]!r}")
    if ROW in names:
        raise ImportUsage(f"the source may not have a column named {ROW!r}")
    if not any(name in names for name in ID_COLUMNS):
        shown = ", ".join(names) or "none"
        raise ImportUsage(f"the source has no id or session_id column (it has: {shown})")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container): the database user
        return ""
