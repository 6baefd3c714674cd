"""The operator's commands: `migrate`, `explain`, `prune` and `triage`, printing for a
person to read."""

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from .config import Config, mask_url
from .evidence.questdb import QuestDBStore, configured
from .evidence.replay import ReplayError
from .evidence.retention import Period
from .evidence.tables import StoreError
from .explain import Explainer, Report, store_json
from .metrics import Metrics
from .migrations import (
    BATCH_SIZE,
    MIGRATIONS,
    MigrationChanged,
    MigrationError,
    MigrationStopped,
    Online,
    Plan,
    Progress,
    migrate,
    plan,
    qualified,
)
from .migrations.online import backfill_sql, online_steps, split_first
from .page import store_summary, triage_page
from .prune import Horizon, Preview, PruneError, Pruning, Stage
from .reasons import Reason
from .recorder import spooled
from .schema import Tables
from .triage import Fields, Reader, Triage, opened, render_text, report

CONNECT_TIMEOUT = 10.0
STORE_PATIENCE = 5.0
"""Seconds `explain` and `triage` wait for the service's store per ID: no one's request
waits on them, as a miss's does."""


class DatabaseError(Exception):
    """The database could not be reached or refused what was asked; says which and why."""


@asynccontextmanager
async def _connect(config: Config) -> AsyncIterator[asyncpg.Connection]:
    assert config.database_url is not None
    try:
        conn = await asyncpg.connect(config.database_url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        where = mask_url(config.database_url)
        raise DatabaseError(f"cannot connect to {where}: {exc}") from exc
    try:
        yield conn
    finally:
        await conn.close()


EXIT_STOPPED = 130


@dataclass(frozen=True, slots=True)
class Batches:
    """The migrate command's own flags: how the backfill goes."""

    size: int = BATCH_SIZE
    pause: timedelta = timedelta(0)


async def run_migrations(
    config: Config,
    *,
    dry_run: bool = False,
    quiet: bool = False,
    out: TextIO = sys.stdout,
    batches: Batches = Batches(),
) -> int:
    """Apply pending migrations (or, dry, show them); returns the exit code."""
    try:
        return await _run_migrations(config, dry_run, quiet, out, batches)
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"cannot migrate {config.sessions_table}: {exc}") from exc


def _online(
    config: Config, batches: Batches, say: Callable[[str], None], stop: Callable[[], bool]
) -> Online:
    return Online(
        lock_timeout=config.lock_timeout,
        batch_pause=batches.pause,
        created_at=config.backfill_created_at,
        updated_at=config.backfill_updated_at,
        id_timezone=str(config.id_timezone),
        say=say,
        stopping=stop,
    )


async def _run_migrations(
    config: Config, dry_run: bool, quiet: bool, out: TextIO, batches: Batches
) -> int:
    tables = config.tables
    bars: list[tqdm] = []

    def say(line: str) -> None:
        if quiet:
            return
        if bars and not bars[-1].disable:
            bars[-1].write(f"session-lens: {line}", file=sys.stderr)
        else:
            print(f"session-lens: {line}", file=sys.stderr)

    stop = _Stop(say)
    online = _online(config, batches, say, stop.asked)
    async with _connect(config) as conn:
        tables = await qualified(conn, tables)
        found = await plan(conn, tables, online=online)
        if found.refused is not None:
            raise DatabaseError(str(found.refused)) from found.refused
        if dry_run:
            await _print_plan(conn, found, tables, config.backfill_state, online, batches, out)
            return 0
        if found.up_to_date:
            if not quiet:
                print(f"up to date: version {max(found.applied):03d}", file=out)
            return 0

        def progress(total: int) -> Progress:
            bar = tqdm(
                total=total, unit="rows", unit_scale=True, desc="backfill",
                disable=quiet, file=sys.stderr,
            )  # fmt: skip
            bars.append(bar)
            return bar.update  # type: ignore[no-any-return]

        started = time.perf_counter()
        if not quiet:  # quiet: before `serve`, which must not start on a run stopped short
            stop.install()
        try:
            applied = await migrate(
                conn, tables, config.backfill_state,
                batch_size=batches.size, on_backfill=progress, online=online,
            )  # fmt: skip
        except MigrationStopped as exc:
            for bar in bars:
                bar.close()
            print(f"session-lens: {_stopped(exc, bars)}", file=sys.stderr)
            return EXIT_STOPPED
        except asyncio.CancelledError:
            for bar in bars:
                bar.close()
            print(
                "session-lens: stopped at once: the batch or step in flight was rolled back,"
                " everything before it is kept; run `session-lens migrate` again to continue",
                file=sys.stderr,
            )
            return EXIT_STOPPED
        except MigrationError as exc:
            raise DatabaseError(f"{exc}; run it again once that is fixed") from exc
        except MigrationChanged as exc:
            raise DatabaseError(str(exc)) from exc
        finally:
            if not quiet:
                stop.remove()
            for bar in bars:
                bar.close()
        if not quiet and found.unrecorded:
            print(f"checksums recorded for {_versions(found.unrecorded)}", file=out)
        if not quiet:
            done = f"applied {_versions(applied)}; " if applied else "finished; "
            rows = sum(bar.n for bar in bars)
            took = f" in {time.perf_counter() - started:.1f} s" if rows else ""
            print(f"{done}{rows} rows backfilled{took}", file=out)
    return 0


class _Stop:
    """SIGINT or SIGTERM: stop after the current batch or step; a second: at once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._asked = False
        self._task: asyncio.Task[Any] | None = None

    def asked(self) -> bool:
        return self._asked

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._signalled)

    def remove(self) -> None:
        """Give the signals back; once a stop was asked, a second one coming as the command
        ends has nothing left to stop, and is ignored rather than killing it."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            if self._asked:
                signal.signal(signum, signal.SIG_IGN)

    def _signalled(self) -> None:
        if self._asked:
            if self._task is not None:
                self._task.cancel()
            return
        self._asked = True
        self._say("stopping after the current batch or step (again to stop at once)")


def _stopped(exc: MigrationStopped, bars: list[tqdm]) -> str:
    if bars:
        bar = bars[-1]
        done = f"{bar.n:,} of {bar.total:,} rows backfilled, each batch committed"
    else:
        done = f"{exc.done} done and committed"
    return f"stopped: {done}; run `session-lens migrate` again to continue where it stopped"


async def _print_plan(
    conn: asyncpg.Connection,
    found: Plan,
    tables: Tables,
    state_expression: str,
    online: Online,
    batches: Batches,
    out: TextIO,
) -> None:
    table = tables.sessions
    if not found.table_exists:
        print(f"-- {table} does not exist: it will be created", file=out)
    else:
        print(f"-- {table}: {found.rows} rows, {found.rows_to_backfill} to backfill", file=out)
    if found.unrecorded:
        print(
            f"-- {_versions(found.unrecorded)} applied before checksums were kept:"
            " their released checksums will be recorded",
            file=out,
        )
    if found.up_to_date:
        print(f"-- up to date: version {max(found.applied):03d}; nothing to do", file=out)
        return
    timeout = f"lock_timeout {online.lock_timeout.total_seconds():g}s, retried with backoff"
    steps = list(found.unfinished)
    for migration in MIGRATIONS:
        if migration not in found.pending:
            continue
        before, after = migration.render(tables)
        print(f"\n-- migration {migration.version:03d} {migration.name}: one transaction,"
              f" {timeout}", file=out)  # fmt: skip
        print(before.strip(), file=out)
        if after:
            print("\n".join(split_first(after, tables).now), file=out)
            steps = online_steps(tables, after)
    for step in steps:
        if step.name == "backfill":
            _print_backfill(found, batches, out)
            if not found.table_exists or not found.rows_to_backfill:
                continue
            try:
                batch = await backfill_sql(conn, tables, state_expression, online)
            except ValueError as exc:
                raise DatabaseError(str(exc)) from exc
            print(batch.first + ";", file=out)
            print(batch.rest + ";", file=out)
            continue
        how = "alone, not in a transaction" if step.alone else f"one transaction, {timeout}"
        print(f"\n-- step {step.name}: {how}; locks {table}: {step.lock}", file=out)
        print("\n".join(step.sql), file=out)


def _print_backfill(found: Plan, batches: Batches, out: TextIO) -> None:
    rows = found.rows_to_backfill
    if not found.table_exists:
        print("\n-- step backfill: the table is created empty: no backfill", file=out)
        return
    if not rows:
        print("\n-- step backfill: no row to backfill", file=out)
        return
    count = -(-rows // batches.size)
    pause = batches.pause.total_seconds()
    print(
        f"\n-- step backfill: {rows} rows in {count} batches of {batches.size},"
        f" each its own transaction ({pause:g}s between): ROW EXCLUSIVE, the batch's rows"
        " locked while it runs; $1 the batch size, $2 the IDs' zone, $3 the last key done",
        file=out,
    )


def _versions(versions: Iterable[int]) -> str:
    return ", ".join(f"{v:03d}" for v in versions)


async def run_explain(
    config: Config,
    session_id: str,
    at: datetime | None = None,
    given: Reason | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print what the lifecycle tables say of one ID (at the moment `at`, when given);
    returns the exit code."""
    rule = config.id_validator.check(session_id)
    if rule is not None:
        print(f"{session_id[:64]!r} is not a valid session ID ({rule}): invalid_format", file=out)
        print(f"  {config.id_validator.broken(session_id, rule)}", file=out)
        return 2
    explainer = Explainer(
        config, Metrics(CollectorRegistry(), ()), config.database_url, store_budget=STORE_PATIENCE
    )
    if config.observes:  # what the serving process has seen and not stored: its spools
        explainer.in_flight = await asyncio.to_thread(spooled, config.spool_path)
    await explainer.open()
    try:
        report = await explainer.report(session_id, at, given)
    except StoreError as exc:
        raise DatabaseError(f"cannot read the lifecycle tables: {exc.detail}") from exc
    except ReplayError as exc:
        print(f"session-lens: --at: {exc}", file=sys.stderr)
        return 2
    finally:
        await explainer.close()
    print(format_report(report), file=out)
    if report.tables_problem is not None:
        print(
            f"session-lens: cannot read the lifecycle tables: {report.tables_problem}"
            " (the report is of the events in flight alone)",
            file=sys.stderr,
        )
        return 1
    return 0


def format_report(report: Report) -> str:
    """A report as a person reads it."""
    evidence = report.evidence
    lines = [f"session   {report.session_id}", f"minted    {_when(report.minted_at)}"]
    lines.append(f"tracked   since {_when(evidence.horizon)}")
    if report.retained is not None:
        retained = report.retained
        lines.append(
            f"store     {retained.retention}: partition from {_when(retained.partition_start)}"
            f" {retained.fate}"
        )
    if report.store is not None or report.store_problem is not None:
        lines.append(f"questdb   {store_summary(store_json(report.store), report.store_problem)}")
    if evidence.has_row:
        lines.append(f"state     {evidence.state}")
        lines.append(f"created   {_when(evidence.created_at)}")
        lines.append(f"updated   {_when(evidence.updated_at)}")
        if evidence.deleted_at:
            lines.append(f"deleted   {_when(evidence.deleted_at)}")
    else:
        lines.append("state     (no row)")
    if report.at is None:
        lines.append(f"a miss now would be: {report.reason}")
    else:
        given = f" (it was given {report.given})" if report.given else ""
        lines.append(f"a miss at {_when(report.at)} was: {report.reason}{given}")
    lines.append(f"  {report.why()}")
    lines.extend(f"  replay: {note}" for note in report.replay_notes())
    note = report.retained.note() if report.retained and report.store is None else None
    if note:
        lines.append(f"  note: {note}")
    if report.reason_with_include_deleted != report.reason:
        lines.append(f"  with include_deleted=true: {report.reason_with_include_deleted}")
        lines.append(f"    {report.why_with_include_deleted()}")
    for event in report.in_flight:
        outcome = "" if event.ok else " (failed)"
        lines.append(
            f"in flight {event.action}{outcome} at {_when(datetime.fromtimestamp(event.at, UTC))},"
            f" request {event.request_id}: seen, not stored yet"
        )
    if report.tables_problem is not None:
        lines.append(f"tables    cannot be read: {report.tables_problem}")
        lines.append("timeline  (not read)")
    elif report.timeline:
        lines.append("timeline")
    else:
        empty = "nothing stored yet" if report.in_flight else "never heard of"
        lines.append(f"timeline  (empty: {empty})")
    for entry in report.timeline:
        move = f"{entry.old_state or '(none)'} -> {entry.new_state or '(none)'}"
        why = f"  ({entry.reason})" if entry.reason else ""
        lines.append(
            f"  {_when(entry.occurred_at)}  {move:<22} {entry.trigger} by {entry.actor}{why}"
        )
    return "\n".join(lines)


def _when(moment: object) -> str:
    return "-" if moment is None else str(moment)


async def run_prune(
    config: Config,
    older_than: Period | timedelta,
    *,
    batch_size: int,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Remove audit entries and observed events older than a period (or, dry, count them)."""
    try:
        async with _connect(config) as conn:
            tables = await qualified(conn, config.tables)
            now = await conn.fetchval("SELECT statement_timestamp()")
            if isinstance(older_than, timedelta):
                cutoff, label = now - older_than, f"{older_than.total_seconds():g} s"
            else:
                cutoff, label = older_than.before(now), str(older_than)
            pruning = Pruning(conn, tables, cutoff, batch_size)
            print(f"cut-off   {pruning.cutoff} (older than {label})", file=out)
            if dry_run:
                _print_preview(await pruning.preview(), out)
                return 0
            return await _prune(pruning, out, err)
    except PruneError as exc:
        raise DatabaseError(f"cannot prune: {exc.detail}") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise DatabaseError(f"cannot prune {AUDIT}: {exc}") from exc


AUDIT = "session_audit"
_LABELS = {Stage.HORIZON: "horizon", Stage.INDEXES: "indexes", Stage.AUDIT: "audit",
           Stage.EVENTS: "events"}  # fmt: skip


def _print_preview(preview: Preview, out: TextIO) -> None:
    before, after = preview.horizon, preview.would_be
    moves = "would move" if after.horizon != before.horizon else "would stay"
    counts = preview.audit_entries, preview.events
    _print_outcome(out, before, after, f" ({moves})", "would remove", *counts)
    print("dry run: nothing changed", file=out)


def _print_outcome(
    out: TextIO, before: Horizon, after: Horizon, note: str, verb: str, audit: int, events: int
) -> None:
    """The horizon's move, `note` after it; then what `verb` is done to what is older."""
    print(f"horizon   {_when(before.horizon)} -> {_when(after.horizon)}{note}", file=out)
    print(
        f"{verb} {audit:,} audit entries and {events:,}"
        f" observed events older than {_when(after.pruned_before)}",
        file=out,
    )


async def _prune(pruning: Pruning, out: TextIO, err: TextIO) -> int:
    started = time.perf_counter()
    bars: list[tqdm] = []

    def progress(stage: Stage, total: int) -> Progress:
        for done in bars:
            done.close()
        if not total:
            return lambda removed: None
        label = "audit entries" if stage is Stage.AUDIT else "events"
        bar = tqdm(total=total, unit="rows", unit_scale=True, desc=label, file=err)
        bars.append(bar)
        return bar.update  # type: ignore[no-any-return]

    def on_stage(stage: Stage) -> None:
        if stage is Stage.INDEXES:
            print(f"{stage.value} the batches walk (once; writes go on meanwhile)", file=err)

    try:
        await pruning.run(progress, on_stage)
    except asyncio.CancelledError:
        for bar in bars:
            bar.close()
        print(f"session-lens: {_how_far(pruning)}", file=err)
        raise
    finally:
        for bar in bars:
            bar.close()
    assert pruning.before is not None and pruning.after is not None
    before, after = pruning.before, pruning.after
    note = "" if after.horizon != before.horizon else " (unchanged)"
    counts = pruning.audit_removed, pruning.events_removed
    _print_outcome(out, before, after, note, "removed  ", *counts)
    stages = ", ".join(
        f"{_LABELS[stage]} {seconds:.1f} s" for stage, seconds in pruning.seconds.items()
    )
    print(f"took      {time.perf_counter() - started:.1f} s ({stages})", file=out)
    return 0


def _how_far(pruning: Pruning) -> str:
    """One line on what an interrupted run has done, for the person who stopped it."""
    if pruning.after is None:
        return "interrupted before the horizon moved: nothing changed"
    done = f"the horizon is at {_when(pruning.after.horizon)}"
    if pruning.stage is Stage.INDEXES:
        done += ", nothing removed yet"
    else:
        done += (
            f"; {pruning.audit_removed:,} of {pruning.audit_total:,} audit entries"
            f" and {pruning.events_removed:,} events removed"
        )
    return f"interrupted while {pruning.stage.value}: {done}; run it again to continue"


@dataclass(frozen=True, slots=True)
class TriageOptions:
    """What `session-lens triage` was asked for."""

    files: list[str]
    fields: Fields
    json: bool = False
    html: Path | None = None
    top: int = 10


async def run_triage(
    config: Config, options: TriageOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Read the log files, explain their misses, print the report; returns the exit code."""
    explainer = Explainer(
        config, Metrics(CollectorRegistry(), ()), config.database_url, store_budget=STORE_PATIENCE
    )
    await explainer.open()
    triage = Triage(explainer)
    reader = Reader(config, options.fields)
    bar = tqdm(
        unit="B", unit_scale=True, unit_divisor=1024, desc="triage", file=err, delay=1.0,
        disable=None,
        mininterval=0.5,
    )  # fmt: skip
    try:
        for name in options.files:
            with opened(name) as (stream, position, size):
                if size is not None:
                    bar.total = (bar.total or 0) + size
                for item in reader.read(name, stream, _progress(bar, position)):
                    if triage.add(item):
                        await triage.flush()
        await triage.flush()
    except StoreError as exc:
        raise DatabaseError(f"cannot read the lifecycle tables: {exc.detail}") from exc
    except OSError as exc:
        raise DatabaseError(f"cannot read the log: {exc.strerror or exc}") from exc
    finally:
        bar.close()
        await explainer.close()
    data = report(triage.tally, reader.lines, explainer.trail_queries, options.top)
    if options.html is not None:
        options.html.write_text(triage_page(data), encoding="utf-8")
    if options.json:
        print(json.dumps(data, indent=1), file=out)
    else:
        print(render_text(data), file=out)
    return 0


def _progress(bar: tqdm, position: Callable[[], int] | None) -> Callable[[int], None]:
    """What the reader tells of each line, as the bar counts it: the line's bytes, or for a
    compressed file how far into its compressed bytes the reading is."""
    if position is None:
        return bar.update  # type: ignore[no-any-return]
    start = bar.n

    def compressed(_: int) -> None:
        bar.update(start + position() - bar.n)

    return compressed


async def questdb_found(config: Config) -> str | None:
    """What the service's QuestDB says of its table, as TOML comment lines; None when no
    store is configured. `check-config` prints it."""
    settings = configured(config)
    if settings is None:
        return None
    store = QuestDBStore(settings)
    logger = logging.getLogger("session_lens.evidence.questdb")
    logger.disabled = True  # its problem is said here, once
    try:
        await store.open()
        meta = store.meta
    finally:
        await store.close()
        logger.disabled = False
    where = f"# questdb {mask_url(settings.url)}, table {settings.table}"
    if meta is None:
        return f"{where}: not reachable ({store.problem})"
    ttl = "no TTL" if meta.ttl is None else f"TTL {meta.ttl}"
    wal = "not a WAL table"
    if meta.wal is not None:
        wal = "WAL suspended" if meta.wal.suspended else "WAL applying"
        wal += f", {meta.wal.pending} transactions pending"
        wal += f" ({meta.wal.error})" if meta.wal.error else ""
    if meta.partition_by is None:
        return f"{where}: not partitioned, {ttl}; {wal}"
    count = len(meta.partitions)
    held = (
        "no partition yet"
        if not count
        else f"{count} partition{'' if count == 1 else 's'}"
        f" ({meta.oldest} to {max(meta.partitions)})"
    )
    return f"{where}: partitioned by {meta.partition_by}, {ttl}, {held}; {wal}"
