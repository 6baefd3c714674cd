"""The `import` subcommand's flags, checked once into the Options a run takes."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, mask_url, parse_database_url, sql_expression
from .errors import ImportUsage

PAGE_SIZE = 5_000
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


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
    if not config.observes:
        raise ImportUsage(
            "import is for observed mode (lifecycle_source = observed, from"
            f" {config.sources.get('lifecycle_source', 'default')}): in database mode the"
            " lifecycle store is the service's own table, which `migrate` has backfilled"
        )
    if not 1 <= args.page_size <= 1_000_000:
        raise ImportUsage(f"--page-size {args.page_size} is not from 1 to 1000000")
    expression = args.state_expression
    if expression is not None:
        try:
            sql_expression(expression)  # checked only: as given, a trailing `--` keeps its line
        except ValueError:
            raise ImportUsage(
                f"--state-expression {expression!r} must be one SQL expression"
            ) from None
    common = {
        "state_expression": expression,
        "page_size": args.page_size,
        "dry_run": args.dry_run,
    }
    if args.from_database is not None:
        return _from_database(args, common)
    return _from_file(args, common)


def _from_database(args: argparse.Namespace, common: dict[str, Any]) -> Options:
    if not args.query:
        raise ImportUsage("--from-database needs --query (SELECT ... AS id, ... FROM ...)")
    if args.format:
        raise ImportUsage("--format is for --from-file")
    try:
        url = parse_database_url(args.from_database)
    except ValueError as exc:
        raise ImportUsage(f"--from-database: {exc}") from None
    return Options(database_url=url, query=args.query, **common)


def _from_file(args: argparse.Namespace, common: dict[str, Any]) -> Options:
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
