"""Where the rows come from, a page at a time: a database cursor, or a CSV / JSON-lines file.

Each row is `(where, values)`, `where` naming it as messages do (`row 12`, `line 12`).
"""

import csv
import io
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ..config import mask_url
from ..pg import UNREACHABLE
from .errors import ImportFailed, ImportUsage
from .options import PAGE_SIZE

CONNECT_TIMEOUT = 10.0
PAGE_TIMEOUT = 300.0
ID_COLUMNS = ("id", "session_id")
FIRST_USER_OID = 16384
"""Types below this OID are built into PostgreSQL and mean the same in every database."""

LOST = (
    *UNREACHABLE,
    # A connection cut in the middle of an operation (a COPY) is left in a state
    # where the next call says "another operation is in progress".
    asyncpg.exceptions.InternalClientError,
)
"""What a database that went away (or was shut down) raises."""


async def connect(url: str) -> asyncpg.Connection:
    """A connection to a database; raises ImportFailed when there is none to be had."""
    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ImportFailed(f"cannot connect to {mask_url(url)}: {exc}") from exc


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


@dataclass(frozen=True, slots=True)
class Refused:
    """A row the source itself could not give (bad CSV, not JSON): why."""

    why: str


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


def to_text(value: object) -> str | None:
    """A value as the text a file would have held it as (JSON for objects and arrays)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


class DatabaseSource(Source):
    """A query's result through a server-side cursor, inside a read transaction."""

    def __init__(self, url: str, query: str) -> None:
        self._url = url
        self._query = query
        self._conn: asyncpg.Connection | None = None
        self._statement: Any = None

    async def open(self, store: asyncpg.Connection) -> None:
        """Connect, begin, prepare; the column types are named by the lifecycle store."""
        self._conn = await connect(self._url)
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
        """Pages of the query's rows, `size` fetched at a time."""
        assert self._statement is not None
        as_text = [n for n, column in enumerate(self.columns) if column.as_text]
        number = 0
        page: list[Row] = []
        try:
            async for record in self._statement.cursor(prefetch=size, timeout=PAGE_TIMEOUT):
                number += 1
                values = tuple(record.values())
                if as_text:
                    values = tuple(to_text(v) if n in as_text else v for n, v in enumerate(values))
                page.append(Row(f"row {number}", values))
                if len(page) == size:
                    yield page, len(page)
                    page = []
        except LOST as exc:
            raise ImportFailed(f"lost {mask_url(self._url)}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise ImportFailed(f"reading {mask_url(self._url)} failed: {exc}") from exc
        except AssertionError as exc:  # asyncpg's decoder, on a type sent in another shape
            raise ImportFailed(
                f"reading {mask_url(self._url)} failed: a value that cannot be decoded ({exc});"
                " cast such columns to text in --query (QuestDB: IPV4, GEOHASH)"
            ) from exc
        if page:
            yield page, len(page)

    async def close(self) -> None:
        """Drop the connection, its read transaction with it; nothing was written."""
        if self._conn is not None:
            self._conn.terminate()


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
            self.columns = self._csv_header()
        else:
            self.columns = self._json_keys()

    def _csv_header(self) -> tuple[Column, ...]:
        self._reader = csv.reader(self._lines)
        try:
            header = next(self._reader)
        except StopIteration:
            raise ImportUsage(f"{self._path} is empty: it needs a header row") from None
        except csv.Error as exc:
            raise ImportUsage(f"{self._path} line 1: not a CSV header: {exc}") from None
        return tuple(Column(name.strip()) for name in header)

    def _json_keys(self) -> tuple[Column, ...]:
        self._ahead = self._json_rows()
        self._first: list[tuple[str, dict[str, Any] | str]] = []
        keys: dict[str, None] = {}
        for item in self._ahead:
            self._first.append(item)
            if isinstance(item[1], dict):
                keys.update(dict.fromkeys(item[1]))
            if len(self._first) >= PAGE_SIZE:
                break
        return tuple(Column(name) for name in keys)

    def _text_lines(self) -> Iterator[str]:
        assert self._handle is not None
        for raw in self._handle:
            self._read += len(raw)
            self._line += 1
            yield raw.decode("utf-8", errors="replace")

    def _json_rows(self) -> Iterator[tuple[str, dict[str, Any] | str]]:
        for line in self._lines:
            if not line.strip():
                continue
            where = f"line {self._line}"
            try:
                value = json.loads(line)
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

    def _rows(self) -> Iterator[Row]:
        names = [column.name for column in self.columns]
        items: Iterator[tuple[str, Any]]
        items = self._csv_rows() if self._kind == "csv" else _chain(self._first, self._ahead)
        for where, item in items:
            if isinstance(item, str):
                yield Row(where, (Refused(item),))
            elif isinstance(item, dict):
                yield Row(where, _json_values(item, names))
            else:  # CSV: an empty field is NULL, as PostgreSQL's COPY reads it
                yield Row(where, tuple(value or None for value in item))

    async def pages(self, size: int) -> AsyncIterator[tuple[list[Row], int]]:
        """Pages of the file's rows, each with the bytes it took."""
        page: list[Row] = []
        done = 0
        try:
            for row in self._rows():
                page.append(row)
                if len(page) == size:
                    yield page, self._read - done
                    done, page = self._read, []
        except OSError as exc:
            raise ImportFailed(f"reading {self._path} failed: {exc.strerror or exc}") from exc
        if page or self._read > done:
            yield page, self._read - done

    async def close(self) -> None:
        """Close the file."""
        if self._handle is not None:
            self._handle.close()


def _json_values(item: dict[str, Any], names: Sequence[str]) -> tuple[str | None, ...]:
    """A JSON line's values by column, its ID under both `id` and `session_id`.

    Lines of one file may name the ID either way, and the import reads one column:
    the line's ID (`id`, else `session_id`) fills whichever of the two it left out.
    """
    line_id = next((item[key] for key in ID_COLUMNS if item.get(key) is not None), None)
    values = {**item, **{key: line_id for key in ID_COLUMNS if item.get(key) is None}}
    return tuple(to_text(values.get(name)) for name in names)


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest
