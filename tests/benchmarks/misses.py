"""Misses: classification p50/p99 at 1 000 misses/s, 10 million sessions, 50 million audit rows.

    python -m tests.benchmarks.misses [--sessions 10000000] [--audit-rows 50000000]
                                      [--rate 1000] [--seconds 30]

The data lives in an embedded PostgreSQL in `.benchmarks/misses-db` (`--data-dir`),
kept between runs. The first run, or one asking for other row counts, creates
the database `session_lens_misses`, migrates it with session-lens' own runner,
and loads `sessions` and `session_audit` with COPY (triggers off, indexes dropped
for the load and built after it, then VACUUM and ANALYZE); later runs reuse it,
migrated to the current version first.
What is loaded: session IDs created over two years; 1 ID in 11 has no row in
`sessions` any more (purged after a delete, or a creation that failed), the rest
are in every state of the model (CREATING, ACTIVE, PAUSED, STOPPED, DELETED,
ARCHIVED), with about five audit entries per session.

Then, open loop at `--rate` lookups per second for `--seconds` each, in
`--rounds` rounds taking turns (after a warm-up, with the tables' files read into
the page cache unless `--no-prewarm`), on IDs of which half were created once
(any state, or gone) and half never were, one in ten asking `include_deleted`:

- `Explainer.explain_miss`, as session-lens calls it on a miss: a pool of its
  size, the 50 ms budget, the breaker, the classification;
- the reference: the same evidence query sent bare through an asyncpg pool of
  the same size (one plain connection cannot take overlapping queries, and an
  open loop overlaps them);
- the floor: a primary-key probe of `sessions` through that pool, one round trip
  that reads one row.

Latency runs from the call to its answer, on uvloop like `session-lens serve`
(`--loop asyncio` for asyncio's own loop). Prints markdown tables: the data, the
latencies with ratios to the bare query, and the reasons given.
"""

import argparse
import asyncio
import importlib.util
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from session_lens.config import load_config
from session_lens.embedded import start_embedded
from session_lens.evidence.tables import Queries
from session_lens.explain import POOL_SIZE, Explainer
from session_lens.metrics import Metrics
from session_lens.operate import run_migrations
from session_lens.schema import Tables
from tests.benchmarks.tools import mib, micros, percentile
from tests.conftest import with_database

ROOT = Path(__file__).resolve().parents[2]
DATABASE = "session_lens_misses"
GENERATOR = 1  # bump when the generated data changes: the next run loads it again
DAY = 86_400
START = int(datetime(2024, 7, 1, tzinfo=UTC).timestamp())
MIN_SPAN = 730 * DAY  # IDs are created over two years (longer past one per second)
LIFE = 90 * DAY  # a session's last transition comes within this of its creation
LINES_PER_MESSAGE = 20_000
M64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind of session history: its state in `sessions` (None: no row) and audit entries."""

    name: str
    state: str | None
    base: int  # audit entries without padding
    pad_step: int  # 0: never padded; 2: only by pairs (pause, resume); 1: by any number


KINDS = {
    kind.name: kind
    for kind in (
        Kind("creating", "CREATING", 1, 0),  # stuck half-way: creation_failed by now
        Kind("active", "ACTIVE", 2, 2),
        Kind("paused", "PAUSED", 3, 2),
        Kind("stopped", "STOPPED", 3, 1),
        Kind("deleted", "DELETED", 4, 1),
        Kind("archived", "ARCHIVED", 4, 1),
        Kind("purged", None, 5, 1),  # deleted, then the row removed: the audit trail remains
        Kind("failed", None, 1, 0),  # an atomic creation refused: one CREATING -> (none) entry
    )
}
# Per block of 1 100 IDs: 1 000 with a row in `sessions`, 100 only in the audit trail.
BLOCK_WEIGHTS = {
    "creating": 30,
    "active": 300,
    "paused": 80,
    "stopped": 170,
    "deleted": 200,
    "archived": 220,
    "purged": 80,
    "failed": 20,
}
ROWS_PER_BLOCK = 1000


def _block() -> tuple[Kind, ...]:
    slots = [KINDS[name] for name, weight in BLOCK_WEIGHTS.items() for _ in range(weight)]
    random.Random(GENERATOR).shuffle(slots)
    return tuple(slots)


BLOCK = _block()
TOD = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}+00" for s in range(DAY)]
TOD_ID = [f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}" for s in range(DAY)]


@cache
def _day(day: int) -> tuple[str, str]:
    date = datetime.fromtimestamp(day * DAY, UTC).date()
    return f"{date.isoformat()} ", date.strftime("%Y%m%d")


def stamp(moment: int) -> str:
    """A COPY text timestamp for Unix time `moment`."""
    day, second = divmod(moment, DAY)
    return _day(day)[0] + TOD[second]


def _mix(n: int) -> int:
    """splitmix64: 64 well-mixed bits from `n`, so every ID's history is a function of it."""
    z = (n * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _suffix(n: int) -> int:
    return (n * 2654435761) & 0xFFFFFFFF  # a bijection of 32-bit numbers: IDs never collide


@cache
def _steps(kind: Kind, pad: int) -> tuple[str, ...]:
    """The audit entries of a history, as COPY text after the ID and time."""
    c, a, p, s, d, none = "CREATING", "ACTIVE", "PAUSED", "STOPPED", "DELETED", "\\N"
    moves: list[tuple[str | None, str | None]]
    if kind.name == "creating":
        moves = [(None, c)]
    elif kind.name == "failed":
        moves = [(c, None)]
    else:
        moves = [(None, c), (c, a)]
        pairs, odd = divmod(pad, 2)
        live = pairs if kind.name in ("active", "paused", "stopped") else (pairs + 1) // 2
        moves += [(a, p), (p, a)] * live
        if kind.name == "paused":
            moves.append((a, p))
        elif kind.name != "active":
            moves += [(a, p), (p, s)] if odd else [(a, s)]
            moves += [(s, d), (d, s)] * (pairs - live)  # deleted and restored
            tails: dict[str, list[tuple[str | None, str | None]]] = {
                "stopped": [],
                "deleted": [(s, d)],
                "archived": [(s, "ARCHIVED")],
                "purged": [(s, d), (d, None)],
            }
            moves += tails[kind.name]
    assert len(moves) == kind.base + pad, (kind, pad)
    lines = []
    for old, new in moves:
        if kind.name == "failed":
            who = "api\tsession-service\tcreation failed: quota exceeded"
        elif new is None:
            who = "sql\tops\tretention: purged after 30 days"
        elif new == "ARCHIVED":
            who = "job\tarchiver\t\\N"
        else:
            who = "api\tsession-service\t\\N"
        lines.append(f"{old or none}\t{new or none}\t{who}\n")
    return tuple(lines)


@dataclass(frozen=True, slots=True)
class Layout:
    """Which ID is which, how old and how long its history: all a function of its number."""

    sessions: int
    audit_rows: int
    ids: int = field(init=False)  # IDs ever created: rows in `sessions`, and the gone ones
    span: int = field(init=False)
    mean_pad: float = field(init=False)

    def __post_init__(self) -> None:
        blocks, rest = divmod(self.sessions, ROWS_PER_BLOCK)
        ids = blocks * len(BLOCK)
        rows = 0
        for slot, kind in enumerate(BLOCK):
            if rows == rest:
                break
            rows += kind.state is not None
            ids = blocks * len(BLOCK) + slot + 1
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "span", max(MIN_SPAN, ids))
        counts = self.counts()
        base = sum(KINDS[name].base * count for name, count in counts.items())
        paddable = sum(count for name, count in counts.items() if KINDS[name].pad_step)
        if counts["purged"] < 100 or self.audit_rows < base:
            raise SystemExit(
                f"at least 2 000 sessions, and for {self.sessions:,} sessions"
                f" at least {base:,} audit rows (the shortest history of each)"
            )
        object.__setattr__(self, "mean_pad", (self.audit_rows - base) / paddable)

    def counts(self) -> Counter[str]:
        """How many IDs of each kind."""
        blocks, _ = divmod(self.ids, len(BLOCK))
        counts = Counter({name: weight * blocks for name, weight in BLOCK_WEIGHTS.items()})
        counts.update(kind.name for kind in BLOCK[: self.ids - blocks * len(BLOCK)])
        return counts

    def kind(self, n: int) -> Kind:
        return BLOCK[n % len(BLOCK)]

    def created(self, n: int) -> int:
        return START + n * self.span // self.ids

    def session_id(self, n: int, suffix: int | None = None) -> str:
        """ID number `n`; with another `suffix`, an ID of the same second never created."""
        day, second = divmod(self.created(n), DAY)
        tail = _suffix(n) if suffix is None else suffix
        return f"exec_{_day(day)[1]}_{TOD_ID[second]}_{tail:08x}"

    def never_created(self, n: int, rng: random.Random) -> str:
        return self.session_id(n, (_suffix(n) + rng.randrange(1, 1 << 32)) & 0xFFFFFFFF)

    def history(self, n: int, pad: int | None = None) -> tuple[Kind, int, list[int]]:
        """Kind, padding and the time of each audit entry; `pad` given for the gone ones."""
        kind = self.kind(n)
        bits = _mix(n)
        if pad is None:
            u = (bits >> 32) / (1 << 32)
            if kind.pad_step == 1:
                pad = int(2 * self.mean_pad * u + 0.5)
            elif kind.pad_step == 2:
                pad = 2 * int(self.mean_pad * u + 0.5)
            else:
                pad = 0
        entries = kind.base + pad
        t0 = self.created(n)
        if entries == 1:
            return kind, pad, [t0]
        t1 = t0 + 1 + (bits >> 20) % 3  # created, then active a moment later
        end = t1 + 60 + bits % LIFE
        return (
            kind,
            pad,
            [t0, t1, *(t1 + (end - t1) * j // (entries - 2) for j in range(1, entries - 1))],
        )


@dataclass
class Loaded:
    """What the sessions pass leaves the audit pass: the padding the rows' histories took."""

    row_pads: int = 0


def session_lines(layout: Layout, loaded: Loaded, bar: tqdm) -> Iterator[bytes]:
    """`sessions` as COPY text: id, state, created_at, updated_at, deleted_at."""
    lines: list[str] = []
    for n in range(layout.ids):
        kind = layout.kind(n)
        if kind.state is None:
            continue
        kind, pad, times = layout.history(n)
        loaded.row_pads += pad
        last = stamp(times[-1])
        deleted = last if kind.state == "DELETED" else "\\N"
        lines.append(
            f"{layout.session_id(n)}\t{kind.state}\t{stamp(times[0])}\t{last}\t{deleted}\n"
        )
        if len(lines) == LINES_PER_MESSAGE:
            yield "".join(lines).encode()
            bar.update(len(lines))
            lines.clear()
    yield "".join(lines).encode()
    bar.update(len(lines))


def audit_lines(layout: Layout, loaded: Loaded, bar: tqdm) -> Iterator[bytes]:
    """`session_audit` as COPY text, each ID's history in order; purged IDs take the slack."""
    counts = layout.counts()
    base = sum(KINDS[name].base * count for name, count in counts.items())
    slack = layout.audit_rows - base - loaded.row_pads  # padding left for the purged IDs
    purged = counts["purged"]
    if slack < 0:
        raise SystemExit("too few --audit-rows for this many sessions")
    lines: list[str] = []
    for n in range(layout.ids):
        pad = None
        if layout.kind(n).name == "purged":
            u = (_mix(n) >> 32) / (1 << 32)
            pad = slack if purged == 1 else min(slack, int(2 * slack / purged * u + 0.5))
            slack -= pad
            purged -= 1
        kind, pad, times = layout.history(n, pad)
        session_id = layout.session_id(n)
        for at, rest in zip(times, _steps(kind, pad), strict=True):
            lines.append(f"{session_id}\t{stamp(at)}\t{rest}")
        if len(lines) >= LINES_PER_MESSAGE:
            yield "".join(lines).encode()
            bar.update(len(lines))
            lines.clear()
    yield "".join(lines).encode()
    bar.update(len(lines))


async def _source(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


MARKER = "session_lens_misses_marker"


async def marker(url: str) -> asyncpg.Record | None:
    """The load's marker, when the database holds a complete one."""
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", MARKER) is None:
            return None
        return await conn.fetchrow(f"SELECT * FROM {MARKER}")
    finally:
        await conn.close()


def step(label: str, started: float) -> float:
    now = time.perf_counter()
    print(f"  {label}: {now - started:.1f} s", flush=True)
    return now


async def load(admin_url: str, url: str, layout: Layout) -> None:
    """A fresh database, migrated by session-lens, filled with COPY; the marker last."""
    began = time.perf_counter()
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
        # Fewer checkpoints during the load, and no WAL segments kept for later (a last
        # checkpoint removes them); the server goes back to its defaults after it.
        await admin.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
        await admin.execute("ALTER SYSTEM SET wal_recycle = off")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    try:
        await run_migrations(load_config(flags={"database_url": url}, need_upstream=False))
        await _fill(url, layout, began)
    finally:
        admin = await asyncpg.connect(admin_url)
        await admin.execute("ALTER SYSTEM RESET max_wal_size")
        await admin.execute("ALTER SYSTEM RESET wal_recycle")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute("CHECKPOINT")
        await admin.close()


async def _fill(url: str, layout: Layout, began: float) -> None:
    conn = await asyncpg.connect(url)
    tables = ["sessions", "session_audit"]
    try:
        # Triggers off (the audit trigger would add a row per session), one backend,
        # room to sort for the index builds.
        await conn.execute(
            "SET session_replication_role = replica; SET synchronous_commit = off;"
            " SET maintenance_work_mem = '1GB'; SET max_parallel_maintenance_workers = 0;"
            " ALTER TABLE sessions SET (autovacuum_enabled = false);"
            " ALTER TABLE session_audit SET (autovacuum_enabled = false)"
        )
        constraints = await conn.fetch(
            "SELECT conrelid::regclass::text AS tab, conname, pg_get_constraintdef(oid) AS def"
            " FROM pg_constraint WHERE conrelid = ANY($1::regclass[]) AND contype IN ('p', 'u')",
            tables,
        )
        indexes = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def"
            " FROM pg_index i WHERE indrelid = ANY($1::regclass[]) AND NOT EXISTS"
            " (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
            tables,
        )
        for index in indexes:
            await conn.execute(f"DROP INDEX {index['name']}")
        for constraint in constraints:
            await conn.execute(
                f"ALTER TABLE {constraint['tab']} DROP CONSTRAINT {constraint['conname']}"
            )
        loaded = Loaded()
        started = time.perf_counter()
        async with conn.transaction():
            # Truncated in the load's own transaction, so COPY may write the rows frozen.
            await conn.execute("TRUNCATE sessions, session_audit")
            with tqdm(total=layout.sessions, unit="rows", desc="sessions", unit_scale=True) as bar:
                await conn.copy_to_table(
                    "sessions",
                    source=_source(session_lines(layout, loaded, bar)),
                    columns=["id", "state", "created_at", "updated_at", "deleted_at"],
                    freeze=True,
                )
            started = step("COPY sessions", started)
            with tqdm(total=layout.audit_rows, unit="rows", desc="audit", unit_scale=True) as bar:
                await conn.copy_to_table(
                    "session_audit",
                    source=_source(audit_lines(layout, loaded, bar)),
                    columns=[
                        "session_id",
                        "occurred_at",
                        "old_state",
                        "new_state",
                        "trigger",
                        "actor",
                        "reason",
                    ],
                    freeze=True,
                )
            started = step("COPY session_audit", started)
        for constraint in constraints:
            table, name, definition = constraint["tab"], constraint["conname"], constraint["def"]
            await conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
            started = step(name, started)
        for index in indexes:
            await conn.execute(index["def"])
            started = step(f"{index['name']}", started)
        await conn.execute(
            "RESET session_replication_role;"
            " ALTER TABLE sessions RESET (autovacuum_enabled);"
            " ALTER TABLE session_audit RESET (autovacuum_enabled)"
        )
        for table in tables:
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        started = step("VACUUM (ANALYZE)", started)
        await conn.execute("CHECKPOINT")
        started = step("CHECKPOINT", started)
        sessions = await conn.fetchval("SELECT count(*) FROM sessions")
        audit_rows = await conn.fetchval("SELECT count(*) FROM session_audit")
        assert (sessions, audit_rows) == (layout.sessions, layout.audit_rows), (
            sessions,
            audit_rows,
        )
        seconds = time.perf_counter() - began
        await conn.execute(
            f"CREATE TABLE {MARKER} (sessions bigint, audit_rows bigint, generator int,"
            " load_seconds float8, loaded_at timestamptz DEFAULT now())"
        )
        await conn.execute(
            f"INSERT INTO {MARKER} VALUES ($1, $2, $3, $4)",
            layout.sessions, layout.audit_rows, GENERATOR, seconds,
        )  # fmt: skip
        print(f"loaded in {seconds:.0f} s", flush=True)
    finally:
        await conn.close()


async def sizes(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT pg_database_size(current_database()) AS database,"
            " pg_table_size('sessions') AS sessions, pg_indexes_size('sessions') AS sessions_idx,"
            " pg_table_size('session_audit') AS audit,"
            " pg_indexes_size('session_audit') AS audit_idx"
        )
        return dict(row)
    finally:
        await conn.close()


async def prewarm(url: str) -> int:
    """Read the tables' and indexes' files once, so the page cache holds them; bytes read."""
    conn = await asyncpg.connect(url)
    try:
        data = Path(await conn.fetchval("SHOW data_directory"))
        paths = await conn.fetch(
            "SELECT pg_relation_filepath(oid) AS path FROM pg_class WHERE oid = ANY($1::regclass[])"
            " OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = ANY($1::regclass[]))",
            ["sessions", "session_audit"],
        )
    finally:
        await conn.close()
    total = 0
    for row in paths:
        relation = data / row["path"]
        for file in relation.parent.iterdir():
            if file.name == relation.name or file.name.startswith(
                (relation.name + ".", relation.name + "_")
            ):
                with file.open("rb", buffering=0) as f:
                    while chunk := f.read(1 << 20):
                        total += len(chunk)
    return total


@dataclass
class Run:
    """One paced run: latencies (seconds, sorted) and what the lookups answered."""

    label: str
    latencies: list[float]
    seconds: float
    reasons: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    classifier_errors: dict[str, int] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)


Lookup = tuple[str, bool]


async def paced(
    call: Callable[[Lookup], Awaitable[None]], lookups: list[Lookup], rate: float
) -> tuple[list[float], float]:
    """Open loop: lookup i starts at i / rate whether or not the earlier ones have answered.

    Returns each lookup's latency, from the call to its answer, and the seconds it all took.
    """
    latencies: list[float] = []
    running: set[asyncio.Task[None]] = set()

    async def one(lookup: Lookup) -> None:
        started = time.perf_counter()
        await call(lookup)
        latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    for i, lookup in enumerate(lookups):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(lookup))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    return latencies, time.perf_counter() - began


def plan(layout: Layout, count: int, seed: int) -> list[Lookup]:
    """Half IDs created once (any state, or gone), half never; one in ten `include_deleted`."""
    rng = random.Random(seed)
    lookups = []
    for _ in range(count):
        n = rng.randrange(layout.ids)
        known = rng.random() < 0.5
        session_id = layout.session_id(n) if known else layout.never_created(n, rng)
        lookups.append((session_id, rng.random() < 0.1))
    return lookups


async def measure(url: str, layout: Layout, rate: float, seconds: float, rounds: int) -> list[Run]:
    """The three paths in `rounds` rounds, in turn, so that drift hits them alike."""
    config = load_config(flags={"database_url": url}, need_upstream=False)
    registry = CollectorRegistry()
    explainer = Explainer(config, Metrics(registry, config.session_routes), url)
    await explainer.open()
    pool = await asyncpg.create_pool(
        url, min_size=0, max_size=POOL_SIZE, max_inactive_connection_lifetime=60
    )
    evidence = Queries(Tables(config.sessions_table, config.sessions_id_column)).evidence
    probe = "SELECT state FROM sessions WHERE id = $1"
    reasons: Counter[str] = Counter()
    errors: Counter[str] = Counter()

    async def explain(lookup: Lookup) -> None:
        explanation = await explainer.explain_miss(*lookup)
        reasons[explanation.reason.value] += 1
        if explanation.error:
            errors[explanation.error] += 1

    async def bare(lookup: Lookup) -> None:
        async with pool.acquire() as conn:
            await conn.fetchrow(evidence, lookup[0])

    async def pk(lookup: Lookup) -> None:
        async with pool.acquire() as conn:
            await conn.fetchrow(probe, lookup[0])

    paths = {
        "evidence query, bare (asyncpg pool)": bare,
        "`Explainer.explain_miss`": explain,
        "primary-key probe of `sessions`": pk,
    }
    runs = [Run(label, [], 0.0) for label in paths]
    try:
        warm = max(1, int(rate * 3))  # connections, statement caches, the first pages
        for seed, call in enumerate(paths.values()):
            await paced(call, plan(layout, warm, seed), rate)
        reasons.clear()
        errors.clear()
        before = {kind: _errors(registry, kind) for kind in ERROR_KINDS}
        per_round = max(1, round(rate * seconds / rounds))
        for round_ in range(rounds):
            for i in range(len(runs)):
                which = (round_ + i) % len(runs)
                seed = 100 * (round_ + 1) + which
                latencies, took = await paced(
                    list(paths.values())[which], plan(layout, per_round, seed), rate
                )
                runs[which].latencies += latencies
                runs[which].seconds += took
        for run in runs:
            run.latencies.sort()
        runs[1].reasons, runs[1].errors = reasons, errors
        runs[1].classifier_errors = {
            kind: int(_errors(registry, kind) - value) for kind, value in before.items()
        }
        return runs
    finally:
        await pool.close()
        await explainer.close()


ERROR_KINDS = ("timeout", "breaker_open", "unavailable", "query")


def _errors(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("session_lens_classifier_errors_total", {"kind": kind}) or 0.0


T = TypeVar("T")


def run_on(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run `main` on uvloop (as `session-lens serve` does where it is installed) or asyncio's."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000_000)
    parser.add_argument("--audit-rows", type=int, default=50_000_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="lookups per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="per path measured")
    parser.add_argument("--rounds", type=int, default=3, help="the paths take turns this often")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".benchmarks" / "misses-db")
    parser.add_argument("--no-prewarm", action="store_true", help="leave the page cache as it is")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        help="event loop of the measurement (default: serve's, uvloop where installed)",
    )
    args = parser.parse_args()
    layout = Layout(args.sessions, args.audit_rows)
    server = start_embedded(args.data_dir)
    url = with_database(server.url, DATABASE)
    found, reused = prepared(server.url, url, layout, args.data_dir)
    size = asyncio.run(sizes(url))
    directory = _du(server.data_dir)
    if not args.no_prewarm:
        started = time.perf_counter()
        read = asyncio.run(prewarm(url))
        print(f"prewarm: read {mib(read)} in {time.perf_counter() - started:.1f} s", flush=True)
    runs = run_on(measure(url, layout, args.rate, args.seconds, args.rounds), args.loop)

    counts = layout.counts()
    print()
    print("| sessions | audit rows | IDs ever created | load | database | data directory |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {layout.sessions:,} | {layout.audit_rows:,} | {layout.ids:,} |"
        f" {found['load_seconds']:,.0f} s ({reused}) | {mib(size['database'])} | {mib(directory)} |"
    )
    print()
    print(
        f"`sessions` {mib(size['sessions'])} + indexes {mib(size['sessions_idx'])};"
        f" `session_audit` {mib(size['audit'])} + indexes {mib(size['audit_idx'])}."
        " IDs by history: "
        + ", ".join(f"{name} {counts[name] / layout.ids:.1%}" for name in BLOCK_WEIGHTS)
        + "."
    )
    print()
    reference = runs[0]
    print(
        f"| at {args.rate:,.0f}/s, {args.seconds:g} s each in {args.rounds} rounds,"
        f" {args.loop} | lookups"
        " | achieved | p50 | p99 | max | p50 of bare | p99 of bare |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        print(
            f"| {run.label} | {len(run.latencies):,} | {len(run.latencies) / run.seconds:,.0f}/s"
            f" | {micros(run.p50)} | {micros(run.p99)} | {micros(run.latencies[-1])}"
            f" | {run.p50 / reference.p50:.0%} | {run.p99 / reference.p99:.0%} |"
        )
    explained = runs[1]
    print()
    print("| reason (`explain_miss`) | lookups | share |")
    print("|---|---:|---:|")
    for reason, n in explained.reasons.most_common():
        print(f"| {reason} | {n:,} | {n / len(explained.latencies):.1%} |")
    print()
    print(
        "`classifier_errors_total` during the measured run: "
        + ", ".join(f"{kind} {n}" for kind, n in explained.classifier_errors.items())
        + (
            "; errors: " + ", ".join(f"{error} ({n})" for error, n in explained.errors.items())
            if explained.errors
            else ""
        )
        + "."
    )


def prepared(
    admin_url: str, url: str, layout: Layout, data_dir: Path
) -> tuple[asyncpg.Record, str]:
    """The set's marker, loading it first unless there; and whether it was loaded now."""
    found = asyncio.run(_marker_or_none(admin_url, url))
    wanted = (layout.sessions, layout.audit_rows, GENERATOR)
    if found is None or (found["sessions"], found["audit_rows"], found["generator"]) != wanted:
        print(
            f"loading {layout.sessions:,} sessions, {layout.audit_rows:,} audit rows"
            f" into {data_dir}"
        )
        asyncio.run(load(admin_url, url, layout))
        asyncio.run(tracked_from_start(url))
        found = asyncio.run(marker(url))
        assert found is not None
        return found, "loaded now"
    # A set loaded by an older version gets the later migrations, as a user's store would.
    config = load_config(flags={"database_url": url}, need_upstream=False)
    asyncio.run(run_migrations(config, quiet=True))
    asyncio.run(tracked_from_start(url))
    return found, f"loaded {found['loaded_at']:%Y-%m-%d %H:%M}, reused"


async def tracked_from_start(url: str) -> None:
    """The set's records begin with its first session: IDs never created read never_existed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE session_lens_tracking SET migrated_at = to_timestamp($1)", float(START)
        )
    finally:
        await conn.close()


async def _marker_or_none(admin_url: str, url: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
    finally:
        await conn.close()
    return await marker(url) if exists else None


if __name__ == "__main__":
    main()
