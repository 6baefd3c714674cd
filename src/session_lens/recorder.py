"""Recording lifecycle events seen in traffic, without delaying a response or losing one.

Every event is appended to a spool file on disk the moment the upstream confirms
it (one `write`, no waiting: it survives a `kill -9` of this process) and a
background writer moves it to PostgreSQL in batches, in order, exactly once
(each event carries an ID the database keeps). A checkpoint file says how far
the database has the spool; a restart replays from there. When the database is
down or slow, the spool simply grows, fsync'd by the writer, until it is back.
At `spool_max_bytes` new events are dropped, counted and logged, and traffic
goes on.
"""

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from .config import Config
from .events import Event
from .evidence.in_flight import MAX_IN_FLIGHT, InFlight
from .metrics import Metrics
from .pg import UNREACHABLE, as_it_is, closed, executed, held, refused_for_itself, remedy
from .routes import TARGET_STATE, Action
from .schema import TRANSITIONS, SessionState, Tables

log = logging.getLogger("session_lens.recorder")

BATCH = 500
WRITE_TIMEOUT = 5.0
ANNOUNCE_TIMEOUT = 2.0
RETRY_MIN, RETRY_MAX = 0.2, 5.0
STALLED = WRITE_TIMEOUT + 1.0
"""How long one write attempt may go unanswered before it counts as an outage."""
CHECK_WITHIN = 1.0
"""How long /readyz waits for the writer's fresh attempt at the database."""
COALESCE = 0.02
SYNC_INTERVAL = 0.2
"""How often the writer fsyncs the spool; appends reach the kernel at once regardless."""
TRUNCATE_AT = 1 << 20
READ_CHUNK = 4 << 20


class SpoolWriteError(Exception):
    """The spool file did not take an event (disk full, read-only, ...)."""


class SpoolError(Exception):
    """The spool cannot be opened, or another process has it."""


class Spool:
    """An append-only file of event lines and the checkpoint of what the database has."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._path = directory / "events.jsonl"
        self._checkpoint_path = directory / "events.checkpoint"
        self._fd = -1
        self.size = 0
        self.checkpoint = 0
        self._checkpoint_fd = -1
        self._lock_fd = -1
        self._synced = 0.0

    @property
    def synced_ago(self) -> float:
        """Seconds since the last fsync."""
        return time.monotonic() - self._synced

    def open(self) -> None:
        """Open (or create) the spool, as its only writer, and read the checkpoint; raises
        SpoolError."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.directory / "events.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:  # two writers would interleave their lines and fight over the checkpoint
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                raise SpoolError(
                    f"the spool in {self.directory} is in use by another session-lens process:"
                    " give each its own spool_dir (in a rolling restart, the new process too)"
                ) from None
            self._lock_fd = lock
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._checkpoint_fd = os.open(self._checkpoint_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool in {self.directory}: {exc}") from exc
        self.size = os.fstat(self._fd).st_size
        self._trim_cut_line()
        self.checkpoint = min(_checkpoint(os.pread(self._checkpoint_fd, 32, 0)), self.size)

    def stored_up_to(self) -> int:
        """The checkpoint as a process of another reads it, without opening the spool:
        0 unless it is a regular file."""
        if _regular_size(self._checkpoint_path) is None:
            return 0
        fd = os.open(self._checkpoint_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            return _checkpoint(os.read(fd, 32))
        finally:
            os.close(fd)

    def readable_size(self) -> int | None:
        """The spool file's size for a process of another, None unless a regular file."""
        return _regular_size(self._path)

    def _trim_cut_line(self) -> None:
        """Drop a last line a crash cut short, so the next event does not join it."""
        if not self.size:
            return
        with self._path.open("rb") as handle:
            handle.seek(max(0, self.size - READ_CHUNK))
            tail = handle.read()
        if tail.endswith(b"\n"):
            return
        keep = self.size - len(tail) + tail.rfind(b"\n") + 1
        log.warning(
            "dropping a cut line at the end of the spool", extra={"bytes": self.size - keep}
        )
        os.ftruncate(self._fd, keep)
        self.size = keep

    def append(self, line: bytes) -> bool:
        """Write one line now; False when the spool is at its cap."""
        if self.size + len(line) > self.max_bytes:
            return False
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            raise SpoolWriteError(str(exc)) from exc
        if written != len(line):  # the disk filled up mid-line: take the stub back
            os.ftruncate(self._fd, self.size)
            raise SpoolWriteError(f"short write: {written} of {len(line)} bytes")
        self.size += len(line)
        return True

    def read(self, start: int, limit: int = READ_CHUNK) -> tuple[list[tuple[int, bytes]], int]:
        """Whole lines from `start`: (end offset of each, line), and how far they reach.

        Lines end at `\\n` only. A line longer than `limit` (damage: events are short)
        comes as one that no event parses from, so that what follows is still read."""
        with self._path.open("rb") as handle:
            handle.seek(start)
            data = handle.read(limit)
            lines, offset, at = [], start, 0
            while (end := data.find(b"\n", at)) >= 0:
                offset += end + 1 - at
                lines.append((offset, data[at : end + 1]))
                at = end + 1
            if not lines and len(data) == limit:  # no end within a whole chunk: damage
                skipped = len(data)
                while chunk := handle.read(limit):
                    end = chunk.find(b"\n")
                    if end >= 0:
                        offset = start + skipped + end + 1
                        lines.append((offset, b"(a spool line longer than the read chunk)\n"))
                        break
                    skipped += len(chunk)
        return lines, offset

    def count(self, start: int) -> int:
        """How many whole lines lie past `start`."""
        total = 0
        with self._path.open("rb") as handle:
            handle.seek(start)
            while chunk := handle.read(READ_CHUNK):
                total += chunk.count(b"\n")
        return total

    def commit(self, offset: int) -> None:
        """Record that the database has everything before `offset`."""
        # One fixed-width write in place: a checkpoint lost to a crash only means
        # replaying events the database then recognises and skips.
        self.checkpoint = offset
        os.pwrite(self._checkpoint_fd, b"%20d\n" % offset, 0)

    def truncate_if_done(self, at_least: int = 0) -> None:
        """Start the file afresh once the database has all of it (and it is this large)."""
        if self.size > at_least and self.checkpoint == self.size:
            # Checkpoint first, both on disk before the file empties: a power cut can
            # then never leave a checkpoint pointing into a refilled spool.
            self.commit(0)
            os.fsync(self._checkpoint_fd)
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self.size = 0

    async def truncate_when_done(self, at_least: int = 0) -> None:
        """`truncate_if_done` with its syncs in a thread, appends going on meanwhile: the
        file is emptied only if none came while the checkpoint was being synced."""
        done = self.size
        if not (done > at_least and self.checkpoint == done):
            return
        self.commit(0)
        try:
            await asyncio.to_thread(os.fsync, self._checkpoint_fd)
        except BaseException:
            self.commit(done)
            raise
        if self.size != done:  # appended meanwhile: kept, and emptied another time
            self.commit(done)
            return
        os.ftruncate(self._fd, 0)
        self.size = 0
        await asyncio.to_thread(os.fsync, self._fd)

    def sync(self) -> None:
        """Make what was appended survive a crash of the machine too."""
        if self._fd >= 0:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        """Sync and close."""
        if self._fd >= 0:
            self.truncate_if_done()
            self.sync()
            os.close(self._fd)
            os.close(self._checkpoint_fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = -1


class EventWriter:
    """Writes spooled events into the lifecycle tables, one transaction a batch, and
    counts what became of each."""

    def __init__(self, tables: Tables, metrics: Metrics) -> None:
        self._metrics = metrics
        # One statement, one round trip: its own transaction, the actor set for it first.
        self._record_sql = (
            "SELECT {record_events}($1, $2, $3, $4, $5, $6, $7)"
            " FROM (SELECT set_config('session_lens.actor', 'session-lens', true)) AS actor"
        ).format(**tables.names)

    async def write_isolating(self, pool: asyncpg.Pool, batch: list[Event]) -> None:
        """Write a batch; when the database refuses an event's values, skip just that event.

        A refusal about the database itself (no connection, not migrated, a privilege,
        read-only, disk full) is raised: the events stay spooled until it is fixed. An
        event the database will never take must not hold up everything behind it.
        """
        try:
            await self._write(pool, batch)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, UNREACHABLE) or not refused_for_itself(exc):
                raise
            if len(batch) == 1:
                self._reject(batch[0], exc)
                return
            for event in batch:
                try:
                    await self._write(pool, [event])
                except asyncpg.PostgresError as single:
                    if isinstance(single, UNREACHABLE) or not refused_for_itself(single):
                        raise
                    self._reject(event, single)

    def _reject(self, event: Event, exc: BaseException) -> None:
        self._metrics.lifecycle_events[event.action, "rejected"].inc()
        log.error(
            "the database refused a lifecycle event; skipped",
            extra={
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "line": event.line()[:200].decode(errors="replace"),
            },
        )

    async def _write(self, pool: asyncpg.Pool, batch: list[Event]) -> None:
        # Sessions in one order for every recorder: each locks its sessions as it goes,
        # and two batches taking the same locks in the same order cannot deadlock.
        # The sort is stable, so one session's events keep their order.
        events = sorted(batch, key=lambda event: event.session_id)
        async with held(pool) as conn:
            befores = await conn.fetchval(self._record_sql, *_columns(events))
        counted: Counter[tuple[Action, str]] = Counter()
        for event, before in zip(events, befores, strict=True):
            result = _result(event, before)
            counted[event.action, result] += 1
            if result == "future":
                log.error(
                    "refused a lifecycle event stamped in the future: is this host's clock right?",
                    extra={
                        "session_id": event.session_id,
                        "action": event.action.value,
                        "occurred_at": datetime.fromtimestamp(event.at, UTC).isoformat(),
                    },
                )
        for (action, result), count in counted.items():
            self._metrics.lifecycle_events[action, result].inc(count)


def _regular_size(path: Path) -> int | None:
    """The size of the regular file at `path` (not followed if a symlink); None if it is
    missing or anything else."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return None
    return found.st_size if stat.S_ISREG(found.st_mode) else None


def _checkpoint(text: bytes) -> int:
    """A checkpoint file's offset; 0 for an empty or damaged one (all replayed)."""
    try:
        return max(int(text.strip() or 0), 0)
    except ValueError:
        return 0


def load_spooled(spool: Spool, start: int, into: InFlight) -> float | None:
    """Index what `spool` holds past `start` into `into` (up to `MAX_IN_FLIGHT` events in
    all); the time of the oldest, if any."""
    offset, oldest = start, None
    while True:
        lines, reached = spool.read(offset)
        if not lines:
            return oldest
        for _, event in _parse(lines):
            if event is not None:
                oldest = event.at if oldest is None else min(oldest, event.at)
                into.add(event)
        if len(into) >= MAX_IN_FLIGHT:
            into.overflow = True
            return oldest
        offset = reached


def spooled(spool_dir: Path) -> InFlight:
    """The events in flight in the spools under `spool_dir` (a sidecar's, and each of its
    workers'), read from the files and never written to: for `explain` in a process of
    its own, what the serving process holds in memory. Only regular files are read (no
    symlink, no FIFO); a spool that cannot be read is said in a log line and left out."""
    in_flight = InFlight()
    directories = [spool_dir]
    try:
        with os.scandir(spool_dir) as entries:
            directories += sorted(Path(e.path) for e in entries if e.name.startswith("worker-"))
    except FileNotFoundError:
        return in_flight
    except OSError as exc:
        _unread(spool_dir, exc)
    for directory in directories:
        spool = Spool(directory, 0)
        try:
            size = spool.readable_size()
            if size:
                load_spooled(spool, min(spool.stored_up_to(), size), in_flight)
        except OSError as exc:
            _unread(directory, exc)
    return in_flight


def _unread(directory: Path, exc: OSError) -> None:
    log.warning(
        "cannot read a spool for its events in flight",
        extra={"spool_dir": str(directory), "error": f"{type(exc).__name__}: {exc}"},
    )


def _parse(lines: list[tuple[int, bytes]]) -> list[tuple[int, Event | None]]:
    """Spool lines as (end offset, event), a damaged line's event None; the damaged ones
    logged in one line."""
    parsed: list[tuple[int, Event | None]] = []
    damaged, first = 0, ""
    for offset, line in lines:
        try:
            parsed.append((offset, Event.parse(line)))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            damaged, first = damaged + 1, first or f"{type(exc).__name__}: {exc}"[:200]
            parsed.append((offset, None))
    if damaged:
        log.error("skipping damaged spool lines", extra={"lines": damaged, "first": first})
    return parsed


def _columns(events: list[Event]) -> list[list[Any]]:
    """The events as the record function's arrays, one a column."""
    columns: list[list[Any]] = [[] for _ in range(7)]
    ids, sessions, actions, states, oks, ats, reasons = columns
    for event in events:
        target = TARGET_STATE[event.action]
        ids.append(event.event_id)
        sessions.append(event.session_id)
        actions.append(event.action.value)
        states.append(target.value if target is not None and event.ok else None)
        oks.append(event.ok)
        ats.append(_micros(event.at))
        reasons.append(event.detail or f"request {event.request_id}")
    return columns


def _micros(at: float) -> int:
    """Microseconds since the epoch, rounded as `datetime.fromtimestamp` rounds."""
    whole = int(at)
    return whole * 1_000_000 + round((at - whole) * 1_000_000)


class Recorder:
    """Spools observed events and writes them to the lifecycle tables in the background."""

    def __init__(self, config: Config, metrics: Metrics, dsn: str | None) -> None:
        self._metrics = metrics
        self._dsn = dsn
        self._spool = Spool(config.spool_path, config.spool_max_bytes)
        self._writer = EventWriter(config.tables, metrics)
        names = config.tables.names
        # Tracking begins with the first recorder to start; the earliest start counts.
        # A store that has no event yet was made for observing (migrated after events
        # were spooled, perhaps): its horizon is no later than the first event it keeps.
        self._observing_sql = (
            "UPDATE {tracking} SET observing_since = least(coalesce(observing_since, $1), $1),"
            " migrated_at = CASE WHEN EXISTS (SELECT 1 FROM {events})"
            " THEN migrated_at ELSE least(migrated_at, $1) END"
        ).format(**names)
        self._replaying_sql = (
            "INSERT INTO {replays} AS r (recorder, events, newest)"
            " VALUES ($1, $2, to_timestamp($3))"
            " ON CONFLICT (recorder) DO UPDATE SET events = $2,"
            " newest = greatest(r.newest, excluded.newest), heartbeat = clock_timestamp()"
        ).format(**names)
        self._replayed_sql = (
            "DELETE FROM {replays} WHERE recorder = $1"
            " OR heartbeat < clock_timestamp() - interval '10 minutes'"
        ).format(**names)
        self._id = uuid.uuid4()
        self._window = config.visibility_window.total_seconds()
        self.in_flight = InFlight()
        """The events spooled that the database does not have yet, for the explainer."""
        self._backlog = False
        """Events were left in the spool by an earlier run: a replay, as after an outage."""
        self._fresh: list[tuple[int, int, Event]] = []
        """The events this process spooled and the database does not have, with the spool
        offsets each starts and ends at: the writer takes them from here, not the file."""
        self._started_at = datetime.now(UTC)
        self._announced = False
        self._pool: asyncpg.Pool | None = None
        self._wake = asyncio.Event()
        self._retry = asyncio.Event()
        """Set to end a back-off at once: someone asks how things stand."""
        self._tried = asyncio.Event()
        """Set when a write attempt has ended, well or not."""
        self._replaying = False
        """In an outage, the database has taken a batch again: the rest is on its way."""
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attempting: asyncio.Future[None] | None = None
        """The write attempt under way, if any."""
        self._answered = 0.0
        """When the database last answered the attempt under way (`time.monotonic()`)."""
        self._pending = 0
        self._gauges_due = False
        self._outage_since: float | None = None
        self._full = False
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Events in the spool the database does not have yet."""
        return self._pending

    async def start(self) -> None:
        """Open the spool, count what an earlier run left, start the writer."""
        self._spool.open()
        self._pending = await asyncio.to_thread(self._spool.count, self._spool.checkpoint)
        if self._pending:
            log.warning("replaying spooled events", extra={"events": self._pending})
            self._backlog = True
            # Observed since the first of them at the latest, whenever the run that
            # spooled them began.
            oldest = await asyncio.to_thread(self._load_in_flight)
            if oldest is not None:
                self._started_at = min(self._started_at, datetime.fromtimestamp(oldest, UTC))
        self._publish()
        if self._dsn is not None:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=2, reset=as_it_is
            )
            # Before the first request, when the database lets us in time; else the
            # writer says it as soon as the database is back.
            with contextlib.suppress(TimeoutError, *UNREACHABLE, asyncpg.PostgresError):
                await self._announce(ANNOUNCE_TIMEOUT)
        self._task = asyncio.create_task(self._run(), name="session-lens recorder")
        if self._pending or not self._announced:
            self._wake.set()

    def _load_in_flight(self) -> float | None:
        """Index what the spool holds past its checkpoint; the time of the oldest, if any.
        Runs before anything records."""
        return load_spooled(self._spool, self._spool.checkpoint, self.in_flight)

    def record(self, event: Event) -> None:
        """Spool an event now and let the writer take it; never waits."""
        start = self._spool.size
        try:
            kept = self._spool.append(event.line())
            problem = None if kept else f"spool full at {self._spool.max_bytes} bytes"
        except SpoolWriteError as exc:
            kept, problem = False, f"spool not writable: {exc}"
        if not kept:
            self._metrics.lifecycle_events[event.action, "dropped"].inc()
            if not self._full:
                self._full = True
                log.error(
                    "lifecycle events are being dropped",
                    extra={"problem": problem, "spool_bytes": self._spool.size},
                )
            return
        self._pending += 1
        self._fresh.append((start, self._spool.size, event))
        self.in_flight.add(event)
        self._drained.clear()
        if not self._gauges_due:  # the gauges once a turn of the loop, not once an event
            self._gauges_due = True
            asyncio.get_running_loop().call_soon(self._publish)
        self._wake.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is spooled if the database lets us in time; the rest waits on disk."""
        attempt = self._attempting
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if attempt is not None and not attempt.done():  # cancelled, and not over yet
            await asyncio.wait({attempt}, timeout=timeout)
        if self._pool is not None:
            if attempt is not None and not attempt.done():  # stuck: no second writer
                log.warning("left events in the spool", extra={"events": self._pending})
                self._pool.terminate()
                self._spool.close()
                return
            try:
                async with asyncio.timeout(timeout):
                    await self._drain()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("left events in the spool", extra={"events": self._pending})
            await closed(self._pool)
        self._spool.close()

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            if self._outage_since is None:
                await self._wake.wait()
                await asyncio.sleep(COALESCE)  # let a batch gather: one write for many events
            else:  # back off while the database is away, unless asked how things stand
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry.wait(), delay)
            self._wake.clear()
            self._retry.clear()
            try:
                await self._attempt()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._outage(exc)
                delay = min(delay * 2, RETRY_MAX)
                continue
            finally:
                self._tried.set()
            delay = RETRY_MIN
            if self._outage_since is not None:
                log.warning(
                    "replay completed",
                    extra={"outage_seconds": round(time.monotonic() - self._outage_since, 3)},
                )
                self._outage_since = None
                self._replaying = False
                self.last_error = None

    async def _attempt(self) -> None:
        """`_drain`, said to be an outage as soon as it has gone `STALLED` seconds without
        an answer: a database that stops answering (frozen, or a link that drops packets)
        can hold a call past its own timeout while the driver waits to cancel it. A drain
        kept going by a steady stream of events, each batch answered, is not one."""
        attempt = self._attempting = asyncio.ensure_future(self._drain())
        self._answered = time.monotonic()
        try:
            while not attempt.done():
                silent = time.monotonic() - self._answered
                if silent >= STALLED:
                    self._outage(TimeoutError(f"the database has not answered for {STALLED:g} s"))
                    break
                await asyncio.wait({attempt}, timeout=STALLED - silent)
            await attempt
        finally:
            attempt.cancel()  # when this is cancelled; a finished one does not mind
            self._attempting = None

    def _outage(self, exc: BaseException) -> None:
        self._replaying = False
        hint = remedy(exc)
        said = str(exc) or (
            f"no answer within {WRITE_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else ""
        )
        error = type(exc).__name__ + (f": {said}" if said else "")
        error = error[:300] + (f" ({hint})" if hint else "")
        if self._outage_since is None or error != self.last_error:
            log.warning(
                "spooling lifecycle events: the database is not taking them",
                extra={"error": error, "events": self._pending, "remedy": hint},
            )
        self.last_error = error
        if self._outage_since is None:  # since the attempt that failed began, at the latest
            self._outage_since = self._answered or time.monotonic()

    async def _drain(self) -> None:
        """Move everything past the checkpoint into the database, batch by batch."""
        pool = self._pool
        if pool is None:
            return
        await self._announce(WRITE_TIMEOUT)
        self._answered = time.monotonic()
        spool = self._spool
        replay = (self._backlog or self._outage_since is not None) and spool.checkpoint < spool.size
        if replay:
            await self._say_replaying(pool)
        while spool.checkpoint < spool.size:
            batch = await self._next_batch()
            if not batch:
                break
            if spool.synced_ago >= SYNC_INTERVAL:
                await asyncio.to_thread(spool.sync)
            events = [event for _, event in batch if event is not None]
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self._writer.write_isolating(pool, events)
            self._answered = time.monotonic()
            spool.commit(batch[-1][0])  # a few bytes written in place: no need of a thread
            written = 0
            while written < len(self._fresh) and self._fresh[written][1] <= spool.checkpoint:
                written += 1
            del self._fresh[:written]
            self.in_flight.stored(events)
            self._replaying = self._outage_since is not None
            self._pending = max(self._pending - len(batch), 0)
            self._publish()
            if replay:
                await self._say_replaying(pool)
                self._answered = time.monotonic()
        if replay:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await executed(pool, self._replayed_sql, self._id)
            self._backlog = False
        if self._pending == 0:
            self.in_flight.clear()
        await spool.truncate_when_done(at_least=min(TRUNCATE_AT, spool.max_bytes // 4))
        if self._full and spool.size < spool.max_bytes // 2:
            self._full = False
            log.warning("spool has room again")
        self._publish()

    async def _next_batch(self) -> list[tuple[int, Event | None]]:
        """The next events to write, with the offset each ends at: what this process
        spooled, from memory; what an earlier run left, read from the file."""
        fresh, spool = self._fresh, self._spool
        if fresh and fresh[0][0] == spool.checkpoint:
            return [(end, event) for _, end, event in fresh[:BATCH]]
        lines, _ = await asyncio.to_thread(spool.read, spool.checkpoint)
        return _parse(lines[:BATCH])

    async def _say_replaying(self, pool: asyncpg.Pool) -> None:
        """Tell every sidecar, through the database, what this one is replaying: until
        it is done, IDs minted before its newest event may have evidence on the way."""
        in_flight = self.in_flight
        newest = time.time() if in_flight.overflow or not in_flight.newest else in_flight.newest
        async with asyncio.timeout(WRITE_TIMEOUT):
            await executed(pool, self._replaying_sql, self._id, self._pending, newest)

    async def _announce(self, timeout: float) -> None:
        """Record, once, that tracking by observation has begun (when this process started)."""
        if self._announced or self._pool is None:
            return
        async with asyncio.timeout(timeout):
            await executed(self._pool, self._observing_sql, self._started_at)
        self._announced = True

    async def drained(self) -> None:
        """Wait until the database has every event spooled so far."""
        await self._drained.wait()

    def _publish(self) -> None:
        self._gauges_due = False
        if self._pending:
            self._drained.clear()
        else:
            self._drained.set()
        self._metrics.spooled_events.set(self._pending)
        self._metrics.spool_bytes.set(self._spool.size)

    def health(self) -> str | None:
        """None when events reach the database in time, else what is wrong (as last seen)."""
        if self._full:
            return f"dropping events (spool at {self._spool.size} bytes)"
        if self._replaying:
            return f"replaying {self._pending} spooled events: the database is back"
        if self._outage_since is not None:
            return f"spooling {self._pending} events: {self.last_error}"
        if self._fresh:  # the writer may fall behind a load: past the window, it is said
            lag = time.time() - self._fresh[0][2].at
            if lag > self._window:
                return (
                    f"behind: {self._pending} events not stored yet, the oldest {lag:.1f} s"
                    f" ago (other sidecars know of them only once stored; visibility_window"
                    f" is {self._window:g} s)"
                )
        return None

    async def check(self, within: float = CHECK_WITHIN) -> str | None:
        """`health` as it is now: in an outage the writer tries the database at once
        (a back-off would leave an error said after the database is back), and what
        that attempt finds, within `within` seconds, is said."""
        if self._outage_since is not None and not self._replaying and self._task is not None:
            self._tried.clear()
            self._retry.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tried.wait(), within)
        return self.health()


def recorder_for(config: Config, metrics: Metrics) -> Recorder | None:
    """The recorder a process needs: one in observed mode, into `database_url`; else None."""
    return Recorder(config, metrics, config.database_url) if config.observes else None


def _result(event: Event, before: Any) -> str:
    """How an event went in: recorded, duplicate, creation_failed, unexpected_transition."""
    if before in ("duplicate", "before_horizon", "future"):
        return str(before)
    if before.startswith("late:"):
        return "late"
    if not event.ok:
        return "creation_failed"
    target = TARGET_STATE[event.action]
    if before == "none":
        return "recorded" if event.action is Action.CREATE else "unexpected_transition"
    if event.action is Action.CREATE:
        return "unexpected_transition"  # created again while it existed
    if target is None or SessionState(before) == target:
        return "recorded"
    return "recorded" if target in TRANSITIONS[SessionState(before)] else "unexpected_transition"
