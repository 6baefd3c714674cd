"""`session-lens import`: seed the observed lifecycle store with the sessions a service has.

Rows come from a source (a PostgreSQL-wire store read through a server-side cursor,
or a CSV / JSON-lines file read line by line) one page at a time, never whole. Each
page is checked here (session IDs) and then in session-lens' own PostgreSQL: staged
in a temporary table typed like the source, mapped to a state by the configured SQL
expression, and written with its audit entries in one transaction of its own, so an
interrupted run leaves whole pages and running it again completes it.

Errors: `ImportUsage` (bad options, exit 2) and `ImportFailed` (a source or the
store failed, exit 1); bad rows are never errors, they are refused and reported.
"""

import argparse
import asyncio
import contextlib
import csv
import getpass
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from tqdm import tqdm

from .config import Config, mask_url, parse_database_url
from .ids import IdValidator
from .migrations import Progress, plan, qualified
from .schema import SessionState, Tables, quote_ident

PAGE_SIZE = 5_000
SHOWN_REFUSALS = 100
CONNECT_TIMEOUT = 10.0
PAGE_TIMEOUT = 300.0
ID_COLUMNS = ("id", "session_id")
TIMESTAMP_COLUMNS = ("created_at", "updated_at", "deleted_at")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STAGE = "session_lens_import_stage"
ROW = "session_lens_row"


class ImportUsage(Exception):
    """The import cannot start as asked: a bad option, source shape or state expression."""


class ImportFailed(Exception):
    """A source or the lifecycle store failed during the import; committed pages stay."""


def id_validator(config: Config) -> IdValidator:
    """The session-ID validator the import checks every row with."""
    return IdValidator(config.max_future_skew, config.id_timezone)


# --- options -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `import` subcommand's own flags."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-database", metavar="URL", help="a store speaking the PostgreSQL wire protocol"
    )
    source.add_argument("--from-file", metavar="PATH", type=Path, help="a CSV or JSON-lines file")
    parser.add_argument("--query", metavar="SQL", help="with --from-database: the rows to import")
    parser.add_argument(
        "--format", choices=("csv", "jsonl"), help="of --from-file (default: by its extension)"
    )
    parser.add_argument(
        "--state-expression",
        metavar="SQL",
        help="SQL over a row's columns giving its state (default: the state column, else 'ACTIVE')",
    )
    parser.add_argument(
        "--page-size", type=int, default=PAGE_SIZE, metavar="N",
        help=f"rows per transaction (default {PAGE_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would be imported, change nothing"
    )


@dataclass(frozen=True, slots=True)
class Options:
    """What to import, from where, and how."""

    database_url: str | None = None
    query: str | None = None
    path: Path | None = None
    format: str = "csv"
    state_expression: str | None = None
    page_size: int = PAGE_SIZE
    dry_run: bool = False

    @property
    def label(self) -> str:
        """The source as messages name it, any password masked."""
        if self.database_url is not None:
            return mask_url(self.database_url)
        return f"file {self.path}"


def options_from(args: argparse.Namespace, config: Config) -> Options:
    """Check the flags against each other and the configuration; raises ImportUsage."""
    if config.lifecycle_source != "observed":
        raise ImportUsage(
            "import is for observed mode (lifecycle_source = observed, from"
            f" {config.sources.get('lifecycle_source', 'default')}): in database mode the"
            " lifecycle store is the service's own table, which `migrate` has backfilled"
        )
    if not 1 <= args.page_size <= 1_000_000:
        raise ImportUsage(f"--page-size {args.page_size} is not from 1 to 1000000")
    expression = args.state_expression
    if expression is not None and (not expression.strip() or ";" in expression):
        raise ImportUsage(f"--state-expression {expression!r} must be one SQL expression")
    common = {
        "state_expression": expression,
        "page_size": args.page_size,
        "dry_run": args.dry_run,
    }
    if args.from_database is not None:
        if not args.query:
            raise ImportUsage("--from-database needs --query (SELECT ... AS id, ... FROM ...)")
        if args.format:
            raise ImportUsage("--format is for --from-file")
        try:
            url = parse_database_url(args.from_database)
        except ValueError as exc:
            raise ImportUsage(f"--from-database: {exc}") from None
        return Options(database_url=url, query=args.query, **common)
    if args.query:
        raise ImportUsage("--query is for --from-database")
    path: Path = args.from_file
    kind = args.format or FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ImportUsage(
            f"cannot tell the format of {path} from its extension: name it .csv, .jsonl or"
            " .ndjson, or pass --format csv|jsonl"
        )
    if not path.is_file():
        raise ImportUsage(f"--from-file {path}: no such file")
    return Options(path=path, format=kind, **common)


# --- sources: pages of (row label, values) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """A source column and the type it is staged as."""

    name: str
    type: str = "text"
    as_text: bool = False
    """Values are turned into text (a type the lifecycle store may not have)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One source row: where it was (`line 12`, `row 12`) and its values, by column."""

    where: str
    values: tuple[Any, ...]


class Source:
    """Rows in pages, with the columns they have and a measure of progress."""

    columns: tuple[Column, ...] = ()
    total: int | None = None
    """Progress units (bytes of a file) in all, when known."""
    unit: str = "rows"

    def pages(self, size: int) -> AsyncIterator[tuple[list[Row], int]]:
        """Pages of rows, each with the progress units it took."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the source holds."""


class DatabaseSource(Source):
    """A query's result through a server-side cursor, inside a read transaction."""

    def __init__(self, url: str, query: str) -> None:
        self._url = url
        self._query = query
        self._conn: asyncpg.Connection | None = None
        self._statement: Any = None

    async def open(self, store: asyncpg.Connection) -> None:
        """Connect, begin, prepare; the column types are named by the lifecycle store."""
        try:
            self._conn = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ImportFailed(f"cannot connect to {mask_url(self._url)}: {exc}") from exc
        try:
            self._transaction = self._conn.transaction()
            await self._transaction.start()
            self._statement = await self._conn.prepare(self._query)
        except asyncpg.PostgresError as exc:
            raise ImportUsage(f"--query fails on {mask_url(self._url)}: {exc}") from exc
        except (OSError, asyncpg.InterfaceError) as exc:
            raise ImportFailed(f"lost {mask_url(self._url)}: {exc}") from exc
        attributes = self._statement.get_attributes()
        oids = [attribute.type.oid for attribute in attributes]
        names = await store.fetch(
            "SELECT o, format_type(o, NULL) AS name FROM unnest($1::oid[]) AS o",
            [oid for oid in oids if oid < FIRST_USER_OID],
            timeout=PAGE_TIMEOUT,
        )
        builtin = {row["o"]: row["name"] for row in names}
        self.columns = tuple(
            Column(a.name, builtin[a.type.oid])
            if a.type.oid in builtin
            else Column(a.name, "text", as_text=True)
            for a in attributes
        )

    async def pages(self, size: int) -> AsyncIterator[tuple[list[Row], int]]:
        assert self._statement is not None
        text = [n for n, column in enumerate(self.columns) if column.as_text]
        number = 0
        page: list[Row] = []
        try:
            async for record in self._statement.cursor(prefetch=size, timeout=PAGE_TIMEOUT):
                number += 1
                values = tuple(record.values())
                if text:
                    values = tuple(_text(v) if n in text else v for n, v in enumerate(values))
                page.append(Row(f"row {number}", values))
                if len(page) == size:
                    yield page, len(page)
                    page = []
        except LOST as exc:
            raise ImportFailed(f"lost {mask_url(self._url)}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise ImportFailed(f"reading {mask_url(self._url)} failed: {exc}") from exc
        if page:
            yield page, len(page)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()  # its read transaction goes with it; nothing was written


LOST = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    # A connection cut in the middle of an operation (a COPY) is left in a state
    # where the next call says "another operation is in progress".
    asyncpg.exceptions.InternalClientError,
)
"""What a database that went away (or was shut down) raises."""

FIRST_USER_OID = 16384
"""Types below this OID are built into PostgreSQL and mean the same in every database."""


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


class FileSource(Source):
    """A CSV file with a header row, or JSON lines; every value staged as text."""

    unit = "B"

    def __init__(self, path: Path, kind: str) -> None:
        self._path = path
        self._kind = kind
        self._handle: io.BufferedReader | None = None
        self._read = 0
        self._line = 0

    def open(self) -> None:
        """Open the file and learn its columns (the CSV header, the first page's JSON keys)."""
        try:
            self._handle = self._path.open("rb")
            self.total = os.fstat(self._handle.fileno()).st_size or None
        except OSError as exc:
            raise ImportUsage(f"cannot read {self._path}: {exc.strerror or exc}") from exc
        self._lines = self._text_lines()
        if self._kind == "csv":
            self._reader = csv.reader(self._lines)
            try:
                header = next(self._reader)
            except StopIteration:
                raise ImportUsage(f"{self._path} is empty: it needs a header row") from None
            except csv.Error as exc:
                raise ImportUsage(f"{self._path} line 1: not a CSV header: {exc}") from None
            self.columns = tuple(Column(name.strip()) for name in header)
        else:
            self._ahead = self._json_rows()
            self._first: list[tuple[str, dict[str, Any] | str]] = []
            keys: dict[str, None] = {}
            for item in self._ahead:
                self._first.append(item)
                if isinstance(item[1], dict):
                    keys.update(dict.fromkeys(item[1]))
                if len(self._first) >= PAGE_SIZE:
                    break
            self.columns = tuple(Column(name) for name in keys)

    def _text_lines(self) -> Iterator[str]:
        assert self._handle is not None
        for raw in self._handle:
            self._read += len(raw)
            self._line += 1
            yield raw.decode("utf-8", errors="replace")

    def _json_rows(self) -> Iterator[tuple[str, dict[str, Any] | str]]:
        for text in self._lines:
            if not text.strip():
                continue
            where = f"line {self._line}"
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield where, f"not JSON: {exc}"
                continue
            yield where, value if isinstance(value, dict) else "not a JSON object"

    def _csv_rows(self) -> Iterator[tuple[str, Sequence[str] | str]]:
        width = len(self.columns)
        while True:
            start = self._line + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield f"line {start}", f"not CSV: {exc}"
                continue
            if not fields:
                continue
            if len(fields) != width:
                yield f"line {start}", f"has {len(fields)} fields, the header {width}"
                continue
            yield f"line {start}", fields

    async def pages(self, size: int) -> AsyncIterator[tuple[list[Row], int]]:
        names = [column.name for column in self.columns]
        rows: Iterator[tuple[str, Any]]
        rows = self._csv_rows() if self._kind == "csv" else _chain(self._first, self._ahead)
        page: list[Row] = []
        done = 0
        try:
            for where, item in rows:
                if isinstance(item, str):
                    page.append(Row(where, (Refused(item),)))
                elif isinstance(item, dict):
                    page.append(Row(where, tuple(_text(item.get(name)) for name in names)))
                else:  # CSV: an empty field is NULL, as PostgreSQL's COPY reads it
                    page.append(Row(where, tuple(value or None for value in item)))
                if len(page) == size:
                    yield page, self._read - done
                    done, page = self._read, []
        except OSError as exc:
            raise ImportFailed(f"reading {self._path} failed: {exc.strerror or exc}") from exc
        if page or self._read > done:
            yield page, self._read - done

    async def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


@dataclass(frozen=True, slots=True)
class Refused:
    """A row the source itself could not give (bad CSV, not JSON): why."""

    why: str


# --- the lifecycle store side ---------------------------------------------------------


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


def _page_function(tables: Tables, columns: Sequence[Column], expression: str, v16: bool) -> str:
    """Temporary functions importing the staged page: one audit entry per new session.

    What can be done for the whole page is (the state, which timestamps parse, which
    sessions are known); then one INSERT per row, so that each session's audit entry is
    stamped with the time of its state in the source (the trigger reads
    `session_lens.occurred_at`), not with the import's.
    """
    names = tables.names
    present = {column.name for column in columns}
    id_column = next(name for name in ID_COLUMNS if name in present)

    def raw(name: str) -> str:
        return f"s.{quote_ident(name)}::text" if name in present else "NULL::text"

    if v16:
        timestamp_ok = (
            "CREATE OR REPLACE FUNCTION pg_temp.session_lens_timestamp_ok(value text)"
            " RETURNS boolean LANGUAGE sql STABLE"
            " AS $sl$ SELECT value IS NULL OR pg_input_is_valid(value, 'timestamptz') $sl$;"
        )
    else:
        timestamp_ok = (
            "CREATE OR REPLACE FUNCTION pg_temp.session_lens_timestamp_ok(value text)"
            " RETURNS boolean LANGUAGE plpgsql STABLE AS $sl$ BEGIN"
            " PERFORM value::timestamptz; RETURN true;"
            " EXCEPTION WHEN others THEN RETURN false; END $sl$;"
        )
    return f"""
{timestamp_ok}
CREATE OR REPLACE FUNCTION pg_temp.session_lens_import_page(careful boolean)
RETURNS TABLE (o_row bigint, o_outcome text, o_detail text)
LANGUAGE plpgsql AS $sl$
#variable_conflict use_column
DECLARE
    r record;
    v_state text;
BEGIN
    FOR r IN
        SELECT p.*,
               CASE WHEN p.sl_bad IS NULL
                    THEN coalesce(p.created_at::timestamptz, p.updated_at::timestamptz, now())
               END AS sl_created,
               CASE WHEN p.sl_bad IS NULL
                    THEN coalesce(p.updated_at::timestamptz, p.created_at::timestamptz, now())
               END AS sl_updated
        FROM (
            SELECT q.*,
                   CASE WHEN NOT pg_temp.session_lens_timestamp_ok(q.created_at) THEN 'created_at'
                        WHEN NOT pg_temp.session_lens_timestamp_ok(q.updated_at) THEN 'updated_at'
                        WHEN NOT pg_temp.session_lens_timestamp_ok(q.deleted_at) THEN 'deleted_at'
                   END AS sl_bad,
                   EXISTS (SELECT 1 FROM {names["audit"]} AS a WHERE a.session_id = q.sl_id)
                       AS sl_known
            FROM (
                SELECT s.{ROW} AS sl_n, s.{quote_ident(id_column)}::text AS sl_id,
                       CASE WHEN careful THEN NULL ELSE ({expression})::text END AS sl_state,
                       {raw("created_at")} AS created_at, {raw("updated_at")} AS updated_at,
                       {raw("deleted_at")} AS deleted_at
                FROM pg_temp.{STAGE} AS s
            ) AS q
        ) AS p
        ORDER BY p.sl_n
    LOOP
        v_state := r.sl_state;
        IF careful THEN
            BEGIN
                SELECT ({expression})::text INTO v_state
                FROM pg_temp.{STAGE} AS s WHERE s.{ROW} = r.sl_n;
            EXCEPTION WHEN others THEN
                o_row := r.sl_n; o_outcome := 'refused';
                o_detail := 'the state expression failed: ' || SQLERRM; RETURN NEXT; CONTINUE;
            END;
        END IF;
        IF v_state IS NULL OR v_state NOT IN ({names["states"]}) THEN
            o_row := r.sl_n; o_outcome := 'refused';
            o_detail := CASE WHEN v_state IS NULL THEN 'the state expression gave NULL'
                        ELSE format('state %L is not one of {" ".join(SessionState)}', v_state)
                        END;
            RETURN NEXT; CONTINUE;
        END IF;
        IF r.sl_bad IS NOT NULL THEN
            o_row := r.sl_n; o_outcome := 'refused';
            o_detail := format('%s %L is not a timestamp', r.sl_bad, CASE r.sl_bad
                WHEN 'created_at' THEN r.created_at WHEN 'updated_at' THEN r.updated_at
                ELSE r.deleted_at END);
            RETURN NEXT; CONTINUE;
        END IF;
        IF r.sl_known THEN
            o_row := r.sl_n; o_outcome := 'known'; o_detail := NULL; RETURN NEXT; CONTINUE;
        END IF;
        PERFORM set_config('session_lens.occurred_at', r.sl_updated::text, true);
        INSERT INTO {names["table"]} ({names["id"]}, state, created_at, updated_at, deleted_at)
        VALUES (r.sl_id, v_state, r.sl_created, r.sl_updated,
                CASE WHEN v_state = 'DELETED'
                     THEN coalesce(r.deleted_at::timestamptz, r.sl_updated)
                     WHEN v_state = 'ARCHIVED' THEN r.deleted_at::timestamptz END)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            o_row := r.sl_n; o_outcome := 'known'; o_detail := NULL; RETURN NEXT;
        END IF;
    END LOOP;
END
$sl$
"""


class Store:
    """The lifecycle store as the import writes it: one page, one transaction."""

    def __init__(self, conn: asyncpg.Connection, tables: Tables, reason: str) -> None:
        self._conn = conn
        self._tables = tables
        self._reason = reason
        self._columns: tuple[Column, ...] = ()
        self._actor = _actor()

    async def prepare(self, columns: Sequence[Column], state_expression: str | None) -> None:
        """Create the staging table and the page function; check the state expression."""
        names = [column.name for column in columns]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ImportUsage(f"the source has more than one column named {duplicates[0]!r}")
        if ROW in names:
            raise ImportUsage(f"the source may not have a column named {ROW!r}")
        if not any(name in names for name in ID_COLUMNS):
            shown = ", ".join(names) or "none"
            raise ImportUsage(f"the source has no id or session_id column (it has: {shown})")
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
        await conn.execute(_page_function(self._tables, columns, state_expression, v16))

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
            await conn.execute(
                "SELECT set_config('TimeZone', 'UTC', true),"
                " set_config('session_lens.trigger', 'import', true),"
                " set_config('session_lens.actor', $1, true),"
                " set_config('session_lens.reason', $2, true)",
                self._actor,
                self._reason,
                timeout=PAGE_TIMEOUT,
            )
            await conn.copy_records_to_table(
                STAGE,
                records=[(n, *row.values) for n, row in enumerate(rows)],
                columns=[ROW, *(c.name for c in self._columns)],
                timeout=PAGE_TIMEOUT,
            )
            results = await conn.fetch(
                "SELECT o_row, o_outcome, o_detail FROM pg_temp.session_lens_import_page($1)",
                careful,
                timeout=PAGE_TIMEOUT,
            )
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


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container): the database user
        return ""


# --- the run ---------------------------------------------------------------------------


async def run(
    config: Config,
    options: Options,
    summary: Summary,
    on_start: Callable[[int | None, str], Progress] | None = None,
) -> Summary:
    """Import every page of the source into the lifecycle store; fills `summary` as it goes."""
    assert config.database_url is not None
    validator = id_validator(config)
    try:
        store_conn = await asyncpg.connect(config.database_url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ImportFailed(f"cannot connect to {mask_url(config.database_url)}: {exc}") from exc
    source: Source
    try:
        configured = Tables(config.sessions_table, config.sessions_id_column)
        tables = await qualified(store_conn, configured)
        found = await plan(store_conn, tables)
        if found.pending:
            raise ImportFailed(
                f"the lifecycle tables in {mask_url(config.database_url)} are not migrated:"
                " run `session-lens migrate` first"
            )
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        store = Store(store_conn, tables, f"imported {stamp} UTC from {options.label}")
        if options.database_url is not None:
            assert options.query is not None
            source = DatabaseSource(options.database_url, options.query)
            try:
                await source.open(store_conn)
            except BaseException:
                await source.close()
                raise
        else:
            assert options.path is not None
            source = FileSource(options.path, options.format)
            source.open()
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
            session_id = value if isinstance(value, str) else _text(value) or ""
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


# --- for a person ------------------------------------------------------------------------


def format_summary(summary: Summary, options: Options, interrupted: bool = False) -> str:
    """The summary as printed at the end: counts, then the refused rows."""
    verb = "would import" if options.dry_run else "imported"
    lines = [
        f"source         {options.label}",
        f"rows read      {summary.read:,}",
        f"{verb:<15}{summary.imported:,}",
        f"already known  {summary.known:,}",
        f"refused        {summary.refused:,}",
    ]
    if options.dry_run:
        lines.append("dry run: nothing was changed")
    if interrupted:
        lines.append(
            "interrupted: the pages counted above are committed; run the same command"
            " again to finish"
        )
    for where, why in summary.refusals:
        lines.append(f"  {where}: {why}".replace("\n", "\\n"))
    if summary.refused > SHOWN_REFUSALS:
        lines.append(f"  … and {summary.refused - SHOWN_REFUSALS:,} more")
    return "\n".join(lines)


def run_import(config: Config, options: Options, out: TextIO | None = None) -> int:
    """The `import` command: run, show progress on stderr and the summary; the exit code."""
    out = out or sys.stdout
    summary = Summary()
    bars: list[tqdm] = []

    def start(total: int | None, unit: str) -> Progress:
        bar = tqdm(
            total=total, unit=unit, unit_scale=unit == "B", desc="import", file=sys.stderr,
            mininterval=0.5,
        )  # fmt: skip
        bars.append(bar)
        return bar.update  # type: ignore[no-any-return]

    def done() -> None:
        for bar in bars:  # closed first, so that nothing printed shares a line with one
            bar.close()

    try:
        asyncio.run(run(config, options, summary, start))
    except ImportUsage as exc:
        done()
        print(f"session-lens: {exc}", file=sys.stderr)
        return 2
    except ImportFailed as exc:
        done()
        if summary.read:
            print(format_summary(summary, options), file=out)
        kept = f"; the {summary.pages:,} pages before it are committed" if summary.pages else ""
        print(f"session-lens: {exc}{kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done()
        print(format_summary(summary, options, interrupted=True), file=out)
        return 130
    done()
    print(format_summary(summary, options), file=out)
    return 0
