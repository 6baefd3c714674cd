"""`session-lens import`: seed the observed lifecycle store with the sessions a service has.

Rows come from a source (a PostgreSQL-wire store read through a server-side cursor,
or a CSV / JSON-lines file read line by line) one page at a time, never whole. Each
page is checked here (session IDs) and then in session-lens' own PostgreSQL: staged
in a temporary table typed like the source, mapped to a state by the configured SQL
expression, and written with its audit entries in one transaction of its own, so an
interrupted run leaves whole pages and running it again completes it.

    options.py   the subcommand's flags and the Options they give
    sources.py   rows from a database cursor or a file, a page at a time
    writer.py    a page staged and written in the lifecycle store (its SQL: *.sql)
    run.py       the pages in order, each in its own transaction; the Summary they fill
    report.py    what a person sees: progress, the summary, the exit code
    errors.py    ImportUsage (exit 2) and ImportFailed (exit 1)
"""

from .errors import ImportFailed, ImportUsage
from .options import Options, add_arguments, options_from
from .report import format_summary, run_import
from .run import Summary, run

__all__ = [
    "ImportFailed",
    "ImportUsage",
    "Options",
    "Summary",
    "add_arguments",
    "format_summary",
    "options_from",
    "run",
    "run_import",
]
