"""Import rate and memory of `session-lens import`: 1 M sessions from a database and a file.

    python -m tests.benchmarks.imports [--rows 1000000]

Starts the embedded PostgreSQL in a temporary directory, builds a foreign store of its
own shape there (another database: custom column names, a status mapped by a CASE
expression) and the same rows as a CSV file, then runs `session-lens import` in a
subprocess from each into a fresh lifecycle store, and once more from the database
(every session already known). With the pinned QuestDB jar fetched (`.ci/questdb-jar`),
the same rows also come from a real QuestDB: a WAL table partitioned by day, the status
a SYMBOL, the key a VARCHAR, the times TIMESTAMPs. The memory figure is the import
process's peak RSS (ru_maxrss, from wait4).
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from session_lens.embedded import start_embedded
from tests.benchmarks.tools import mib
from tests.conftest import with_database
from tests.questdb import QuestDB
from tests.questdb import missing as questdb_missing

STATUS_TO_STATE = (
    "CASE status WHEN 'live' THEN 'ACTIVE' WHEN 'held' THEN 'PAUSED' WHEN 'gone' THEN 'DELETED'"
    " WHEN 'cold' THEN 'ARCHIVED' END"
)
QUERY = (
    "SELECT session_key AS id, status, born AS created_at, changed AS updated_at"
    " FROM service_sessions"
)
ROWS_SQL = (
    "SELECT 'exec_2025' || to_char(date '2025-01-01' + (g % 300), 'MMDD') || '_'"
    " || to_char(time '00:00' + (g % 86400) * interval '1 second', 'HH24MISS') || '_'"
    " || lpad(to_hex(g), 8, '0') AS session_key,"
    " (ARRAY['live', 'live', 'held', 'gone', 'cold'])[g % 5 + 1] AS status,"
    " timestamp '2025-01-01' + g * interval '1 second' AS born,"
    " timestamptz '2025-06-01 00:00+00' + g * interval '1 second' AS changed"
    " FROM generate_series(1, $1) AS g"
)


QUESTDB_ROWS_SQL = (
    "INSERT INTO service_sessions SELECT"
    " concat('exec_', to_str(ts, 'yyyyMMdd_HHmmss'), '_', lpad(cast(x AS string), 8, '0')),"
    " cast(CASE x % 5 WHEN 0 THEN 'live' WHEN 1 THEN 'live' WHEN 2 THEN 'held'"
    " WHEN 3 THEN 'gone' ELSE 'cold' END AS SYMBOL), ts, dateadd('s', cast(x AS int),"
    " '2025-06-01T00:00:00Z') FROM (SELECT x, dateadd('s', cast(x AS int),"
    " '2025-01-01T00:00:00Z') ts FROM long_sequence({rows}))"
)


async def prepare_questdb(url: str, rows: int) -> None:
    """The same rows in a QuestDB WAL table, applied and visible."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE service_sessions (session_key VARCHAR, status SYMBOL, born TIMESTAMP,"
            " changed TIMESTAMP) TIMESTAMP(born) PARTITION BY DAY WAL"
        )
        await conn.execute(QUESTDB_ROWS_SQL.format(rows=rows))
        # QuestDB tells no one when its write-ahead log is applied: ask until it is.
        while await conn.fetchval("SELECT count() FROM service_sessions") < rows:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def prepare(url: str, rows: int, csv_path: Path) -> tuple[str, list[str]]:
    """The foreign database filled, the CSV written; the foreign URL and the store URLs."""
    admin = await asyncpg.connect(url)
    for name in ("foreign_store", "lens_db", "lens_file", "lens_questdb"):
        await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    foreign = with_database(url, "foreign_store")
    conn = await asyncpg.connect(foreign)
    await conn.execute(
        "CREATE TABLE service_sessions (session_key text PRIMARY KEY, status text,"
        f" born timestamp, changed timestamptz); INSERT INTO service_sessions {ROWS_SQL}"
        .replace("$1", str(rows))
    )  # fmt: skip
    await conn.execute("SET TimeZone = 'UTC'")
    await conn.copy_from_query(
        "SELECT session_key AS id, status, born AS created_at, changed AS updated_at"
        " FROM service_sessions ORDER BY session_key",
        output=str(csv_path),
        format="csv",
        header=True,
    )
    await conn.close()
    return foreign, [with_database(url, name) for name in ("lens_db", "lens_file", "lens_questdb")]


def run_import(store: str, *source: str) -> tuple[float, int, str]:
    """Seconds, peak RSS in bytes and stdout of one `session-lens import` process."""
    command = [
        sys.executable, "-m", "session_lens", "import", "--database-url", store,
        "--lifecycle-source", "observed", "--state-expression", STATUS_TO_STATE, *source,
    ]  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        took = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        printed = out.read().decode()
        err.seek(0)
        said = err.read().decode()[-2000:]
    if process.returncode != 0:
        raise SystemExit(f"the import failed ({process.returncode}):\n{printed}{said}")
    return took, usage.ru_maxrss * 1024, printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="session-lens-import-"))
    embedded = start_embedded(work, delete_on_exit=True)
    csv_path = work / "sessions.csv"
    started = time.monotonic()
    foreign, stores = asyncio.run(prepare(embedded.url, args.rows, csv_path))
    built = time.monotonic() - started
    questdb = None if questdb_missing() else QuestDB(work / "questdb")
    try:
        if questdb is not None:
            questdb.start()
            asyncio.run(prepare_questdb(questdb.url, args.rows))
        header = (
            f"{args.rows:,} sessions (40% ACTIVE, 20% each PAUSED, DELETED, ARCHIVED), built in"
            f" {built:.0f} s; the embedded PostgreSQL {embedded_version(embedded.url)} holds the"
            " foreign store and the lifecycle stores; pages of 5,000 rows."
        )
        compare(args.rows, foreign, stores, csv_path, questdb, header)
    finally:
        if questdb is not None:
            questdb.stop()
    if questdb is None:
        print(f"\nNo QuestDB row: {questdb_missing()}.")


def compare(
    rows: int, foreign: str, stores: list[str], csv_path: Path, questdb: QuestDB | None,
    header: str,
) -> None:  # fmt: skip
    """Each source imported into a fresh lifecycle store, and the database once more."""
    store_db, store_file, store_questdb = stores
    for store in stores:
        subprocess.run(
            [sys.executable, "-m", "session_lens", "migrate", "--database-url", store],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    runs = [
        ("PostgreSQL database (server-side cursor)", store_db, ("--from-database", foreign,
         "--query", QUERY)),
        (f"CSV file ({mib(csv_path.stat().st_size)})", store_file, ("--from-file",
         str(csv_path))),
        ("the same database again (all already known)", store_db, ("--from-database", foreign,
         "--query", QUERY)),
    ]  # fmt: skip
    if questdb is not None:
        label = f"QuestDB {questdb_version(questdb.url)} (server-side cursor)"
        runs.insert(1, (label, store_questdb, ("--from-database", questdb.url, "--query", QUERY)))
    print(header + "\n")
    print("| source | rows | imported | already known | time | rows/s | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    measure(runs, rows)


def measure(runs: list[tuple[str, str, tuple[str, ...]]], rows: int) -> None:
    """One table row per import run."""
    for label, store, source in runs:
        took, peak, printed = run_import(store, *source)
        figures = dict(line.rsplit(None, 1) for line in printed.splitlines() if line[:1].isalpha())
        imported = figures.get("imported", "0")
        print(
            f"| {label} | {figures['rows read']} | {imported} | {figures['already known']}"
            f" | {took:.1f} s | {rows / took:,.0f} | {mib(peak)} |"
        )


def embedded_version(url: str) -> str:
    async def fetch() -> str:
        conn = await asyncpg.connect(url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def questdb_version(url: str) -> str:
    async def fetch() -> str:
        conn = await asyncpg.connect(url)
        try:
            return str(await conn.fetchval("SELECT build()")).split(",")[0].split()[-1]
        finally:
            await conn.close()

    return asyncio.run(fetch())


if __name__ == "__main__":
    main()
