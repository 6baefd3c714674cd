"""`session-lens demo`: the whole point in one command.

The embedded PostgreSQL, the reference service with its faults, session-lens in
front of it and a traffic generator, with a live table of lookups and not-found
reasons, then a summary with one example ID per reason and how to explain it.
Given a QuestDB (`--questdb URL`), the reference service keeps its sessions there
instead, and session-lens observes its traffic (a QuestDB has no lifecycle tables).
"""

import asyncio
import contextlib
import random
import shlex
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import IO

import aiohttp
import asyncpg
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .config import Address, Config, LifecycleSource, mask_url
from .evidence.questdb import META_REFRESH
from .evidence.retention import Period, Unit
from .operate import DatabaseError
from .reasons import Reason
from .reference import Faults, ReferenceService, new_session_id
from .reference_questdb import QuestDBReferenceService, StoreFaults, create_table, seed
from .server import serve, start_runner

DEMO_RETENTION_DAYS = 365
"""The reference store's TTL in the demo (its days-partitioned table keeps a year)."""

QUESTDB_TABLE = "session_lens_demo_sessions"
QUESTDB_TTL_DAYS = 30
WAL_SUSPENSION = META_REFRESH + 1.0
"""How long the QuestDB-backed service suspends its table's WAL: longer than session-lens
reads the table's metadata apart, so every suspension shows in the WAL gauges."""
QUESTDB_NEVER = frozenset({Reason.CREATING, Reason.CREATION_FAILED, Reason.PURGED})
"""Reasons the QuestDB-backed service never causes: its creations are one INSERT, and
its store drops whole partitions (`expired`), never single rows."""

SERVICE_LOG = "service-misses.log"
"""Where, in the demo's data directory, the reference service logs its misses."""

EMBEDDED_NEVER = frozenset({Reason.STORE_SUSPENDED})
"""Reasons the embedded service never causes: its store has no write-ahead log to suspend."""

MAX_IN_FLIGHT = 64
"""Requests out at once: past this the generator waits, whatever rate it was asked for,
so a rate the machine cannot keep adds no tasks, memory or shutdown time."""

MALFORMED = (
    "exec_2025",
    "exec_20251330_020944_4ad060d9",
    "EXEC_20251230_020944_4AD060D9",
    "exec_20991231_000000_4ad060d9",
    "sess-42",
)


@dataclass
class Traffic:
    """What the generator knows of the sessions it made, and what it saw."""

    states: dict[str, str] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    seen: Counter[str] = field(default_factory=Counter)
    errors: int = 0

    def pick(self, rng: random.Random, *states: str) -> str | None:
        matching = [sid for sid, state in self.states.items() if state in states]
        return rng.choice(matching) if matching else None


class Generator:
    """Drives the reference service through session-lens the way clients would."""

    def __init__(
        self,
        proxy_url: str,
        rate: float,
        seed: int | None = None,
        horizon: datetime | None = None,
        retention_days: int = DEMO_RETENTION_DAYS,
    ) -> None:
        self._url = proxy_url
        self._rate = rate
        self._rng = random.Random(seed)  # noqa: S311 - traffic, not secrets
        self._horizon = horizon or datetime.now(UTC)
        self._retention_days = retention_days
        self.traffic = Traffic()

    def _old_id(self) -> str:
        """An ID a client kept from before: minted before tracking began, or long before."""
        if self._rng.random() < 0.5:  # before the records, within the store's retention
            within = min(30, self._retention_days - 2) * 86400
            age = timedelta(seconds=self._rng.uniform(60, within))
            return new_session_id(self._horizon - age)
        age = timedelta(days=self._rng.uniform(1.2, 2) * self._retention_days)
        return new_session_id(datetime.now(UTC) - age)  # the store has dropped it

    async def run(self, until: asyncio.Event | None = None) -> None:
        """Send requests at the configured rate until cancelled, or until `until` is set:
        then the requests under way are answered before it returns."""
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as client:
            pending: set[asyncio.Task[None]] = set()
            interval = 1.0 / self._rate
            next_at = time.monotonic()
            try:
                while until is None or not until.is_set():
                    if len(pending) >= MAX_IN_FLIGHT:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        next_at = max(next_at, time.monotonic())  # behind: no burst to catch up
                    task = asyncio.create_task(self._one(client))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                await asyncio.gather(*pending, return_exceptions=True)
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, client: aiohttp.ClientSession) -> None:
        rng, traffic = self._rng, self.traffic
        roll = rng.random()
        try:
            if roll < 0.25 or len(traffic.states) < 20:
                await self._create(client)
            elif roll < 0.55:
                await self._move(client)
            elif roll < 0.62:
                await self._lookup(client, new_session_id())  # never created
            elif roll < 0.65:
                await self._lookup(client, self._old_id())
            elif roll < 0.70:
                await self._lookup(client, rng.choice(MALFORMED))
            else:
                # A state first, then a session in it: rare states get looked at too.
                state = rng.choice(sorted(set(traffic.states.values())))
                session_id = traffic.pick(rng, state)
                assert session_id is not None
                asked = state == "DELETED" and rng.random() < 0.5
                await self._lookup(client, session_id, include_deleted=asked)
        except (aiohttp.ClientError, TimeoutError):
            traffic.errors += 1

    async def _create(self, client: aiohttp.ClientSession) -> None:
        session_id = new_session_id()
        async with client.post(f"{self._url}/api/sessions", json={"id": session_id}) as response:
            await response.read()
            status = response.status
        if status in (201, 202, 503):
            self.traffic.states[session_id] = {201: "ACTIVE", 202: "CREATING", 503: "GONE"}[status]
            await self._lookup(client, session_id)  # right away: races and lag show here
        if len(self.traffic.states) > 2_000:
            self.traffic.states.pop(next(iter(self.traffic.states)))

    async def _move(self, client: aiohttp.ClientSession) -> None:
        rng, traffic = self._rng, self.traffic
        moves = {
            "ACTIVE": ["pause", "stop"],
            "PAUSED": ["resume", "stop"],
            "STOPPED": ["delete", "delete", "archive"],
            "DELETED": ["restore", "archive"],
            "CREATING": [],
        }
        session_id = traffic.pick(rng, "ACTIVE", "PAUSED", "STOPPED", "DELETED")
        if session_id is None:
            return
        choices = moves.get(traffic.states[session_id], [])
        if not choices:
            return
        action = rng.choice(choices)
        if action == "delete":
            request = client.delete(f"{self._url}/api/sessions/{session_id}")
        else:
            request = client.post(f"{self._url}/api/sessions/{session_id}/{action}")
        async with request as response:
            body = await response.json(content_type=None) if response.status == 200 else {}
        if response.status == 200 and isinstance(body, dict) and "state" in body:
            traffic.states[session_id] = body["state"]

    async def _lookup(
        self, client: aiohttp.ClientSession, session_id: str, include_deleted: bool = False
    ) -> None:
        query = "?include_deleted=true" if include_deleted else ""
        async with client.get(f"{self._url}/api/sessions/{session_id}{query}") as response:
            await response.read()
            reason = response.headers.get("X-Session-Not-Found-Reason")
        self.traffic.seen["lookup"] += 1
        if reason:
            self.traffic.seen[reason] += 1
            self.traffic.examples.setdefault(reason, session_id)


async def read_metrics(client: aiohttp.ClientSession, admin: Address) -> dict[str, float]:
    """Lookups by outcome and misses by reason, summed over routes, from /metrics."""
    async with client.get(f"http://{admin}/metrics") as response:
        text = await response.text()
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "session_lens_lookups_total":
                totals[sample.labels["outcome"]] += sample.value
            elif sample.name == "session_lens_not_found_total":
                totals[sample.labels["reason"]] += sample.value
    return dict(totals)


def render(
    now: dict[str, float], before: dict[str, float], elapsed: float, caption: str | None = None
) -> Table:
    """The live table: totals and per-second rates."""
    table = Table(title=f"session-lens demo, {elapsed:.0f}s", caption=caption, expand=False)
    table.add_column("")
    table.add_column("total", justify="right")
    table.add_column("per second", justify="right")
    for key in ("found", "not_found", "invalid", "upstream_error"):
        table.add_row(f"lookups {key}", f"{now.get(key, 0):.0f}",
                      f"{now.get(key, 0) - before.get(key, 0):.0f}")  # fmt: skip
    table.add_section()
    for reason in Reason:
        total = now.get(reason.value, 0)
        rate = total - before.get(reason.value, 0)
        table.add_row(f"  {reason.value}", f"{total:.0f}", f"{rate:.0f}")
    return table


@dataclass(frozen=True)
class DemoOptions:
    """What `session-lens demo` was asked for."""

    duration: float | None
    """Seconds to run; None: until Ctrl-C."""
    rate: float
    service_listen: Address
    seed: int | None = None
    questdb_url: str | None = None
    """The QuestDB (PostgreSQL wire URL) the reference service keeps its sessions in."""


async def run_demo(config: Config, options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo; returns the exit code.

    A run of a set duration is a check that the demo shows every reason: 1 when some
    never appeared. A run until Ctrl-C (or SIGTERM) ends when the user says so: 0.
    """
    console = console or Console()
    assert config.database_url is not None
    config = _demo_config(config, options)
    retention = DEMO_RETENTION_DAYS if options.questdb_url is None else QUESTDB_TTL_DAYS
    with (config.data_dir / SERVICE_LOG).open("w") as misses:
        async with asyncpg.create_pool(config.database_url, min_size=1, max_size=8) as pool:
            service = (
                _reference_service(pool, options.service_listen, misses)
                if options.questdb_url is None
                else _questdb_service(options.questdb_url, options.service_listen)
            )
            async with service:
                horizon = await pool.fetchval("SELECT horizon FROM session_lens_tracking")
                generator = Generator(
                    f"http://{config.listen}", options.rate, options.seed, horizon, retention
                )
                await _through_lens(config, generator, console, options.duration)
    never = QUESTDB_NEVER if options.questdb_url else EMBEDDED_NEVER
    missing = _summary(console, generator.traffic, config, never)
    return 1 if missing and options.duration is not None else 0


def _demo_config(config: Config, options: DemoOptions) -> Config:
    """session-lens in front of the reference service, tuned to its faults unless set."""
    config = replace(config, upstream=f"http://{options.service_listen}")
    retention = DEMO_RETENTION_DAYS
    if options.questdb_url is not None:
        # Its store is QuestDB: what happens to sessions is seen in the traffic.
        config = replace(config, lifecycle_source=LifecycleSource.OBSERVED)
        if config.questdb_url is None:  # and the store itself is evidence
            config = replace(config, questdb_url=options.questdb_url, questdb_table=QUESTDB_TABLE)
        retention = QUESTDB_TTL_DAYS
    if config.sources.get("upstream_retention", "default") == "default":
        # The reference store keeps its TTL's days: IDs older than that read expired.
        config = replace(config, upstream_retention=Period(retention, Unit.DAY))
    if config.sources.get("visibility_window", "default") == "default":
        # The reference replica lags 1.5 s (the QuestDB apply pauses 1 s, or 6 s when
        # suspended): a window a little wider shows both not_yet_visible and, for
        # sessions lost or held longer, upstream_inconsistent soon.
        config = replace(config, visibility_window=timedelta(seconds=2.5))
    return config


@contextlib.asynccontextmanager
async def _reference_service(
    pool: asyncpg.Pool, address: Address, misses: IO[str]
) -> AsyncIterator[None]:
    """The faulty reference service on `address`, logging its misses to `misses`; raises
    ListenError when the address is taken."""
    runner = web.AppRunner(ReferenceService(pool, Faults(), misses).app(), access_log=None)
    await start_runner(runner, address)
    try:
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _questdb_service(questdb_url: str, address: Address) -> AsyncIterator[None]:
    """The QuestDB-backed reference service on `address`, its table made and seeded once."""
    try:
        made = await asyncpg.create_pool(questdb_url, min_size=1, max_size=8)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        where = mask_url(questdb_url)
        raise DatabaseError(
            f"cannot reach QuestDB at {where}: {type(exc).__name__}: {exc}"
        ) from exc
    async with made as pool:
        await create_table(pool, QUESTDB_TABLE, QUESTDB_TTL_DAYS)
        if not await pool.fetchval(f"SELECT count() FROM {QUESTDB_TABLE}"):  # noqa: S608
            await seed(pool, QUESTDB_TABLE, days=QUESTDB_TTL_DAYS, per_day=200)
        faults = StoreFaults(suspend_for=WAL_SUSPENSION)
        service = QuestDBReferenceService(pool, faults, QUESTDB_TABLE)
        runner = web.AppRunner(service.app(), access_log=None)
        await start_runner(runner, address)
        try:
            yield
        finally:
            await runner.cleanup()


async def _through_lens(
    config: Config, generator: Generator, console: Console, duration: float | None
) -> None:
    """session-lens serving, the generator's traffic through it, watched until the end."""
    stop = asyncio.Event()
    lens = asyncio.create_task(serve(config, stop))
    traffic = None
    try:
        await _wait_ready(config.admin_listen, lens)
        traffic = asyncio.create_task(generator.run())
        await _watch(console, config.admin_listen, duration)
    finally:
        if traffic is not None:
            traffic.cancel()
            await asyncio.gather(traffic, return_exceptions=True)
        stop.set()
        await asyncio.gather(lens, return_exceptions=True)


async def _watch(console: Console, admin: Address, duration: float | None) -> None:
    """The live table, until `duration` is up or Ctrl-C (or SIGTERM) ends the run."""
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, ended.set)
    try:
        await _live_table(console, admin, duration, ended)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if not console.is_terminal:
        console.line()  # rich ends the table's last line on a terminal only


async def _live_table(
    console: Console, admin: Address, duration: float | None, ended: asyncio.Event
) -> None:
    caption = "runs until Ctrl-C" if duration is None else None
    started = time.monotonic()
    elapsed = 0.0
    async with aiohttp.ClientSession() as client:
        before = now = await read_metrics(client, admin)
        with Live(render(now, before, 0, caption), console=console, refresh_per_second=2) as live:
            while not ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), timeout=1.0)
                before, now = now, await read_metrics(client, admin)
                elapsed = time.monotonic() - started
                if duration is not None and elapsed >= duration:
                    ended.set()
                live.update(render(now, before, elapsed, caption))
            live.update(render(now, before, elapsed))  # what stays on screen: no longer running


async def _wait_ready(admin: Address, lens: asyncio.Task[None]) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            if lens.done():
                lens.result()  # raises what stopped it
            with contextlib.suppress(aiohttp.ClientError):
                async with client.get(f"http://{admin}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError("session-lens did not come up")


def _summary(
    console: Console, traffic: Traffic, config: Config, never: frozenset[Reason] = frozenset()
) -> list[str]:
    """The reasons seen, with an example each and how to explain it; returns those never
    seen, but for the `never` the service cannot cause."""
    table = Table(title="not-found reasons seen")
    table.add_column("reason")
    table.add_column("lookups", justify="right")
    table.add_column("example session ID")
    missing = []
    for reason in Reason:
        example = traffic.examples.get(reason.value)
        if example is None and reason not in never:
            missing.append(reason.value)
        table.add_row(reason.value, str(traffic.seen[reason.value]), example or "-")
    console.print(table)
    console.print(f"{traffic.seen['lookup']} lookups, {traffic.errors} client errors")
    explained = next((e for r, e in traffic.examples.items() if r != "invalid_format"), None)
    data_dir = shlex.quote(str(config.data_dir))
    # Judged as the demo judged: its window, and the year its store keeps.
    window = config.visibility_window.total_seconds()
    judged = f" --data-dir {data_dir} --visibility-window {window:g}s"
    if config.upstream_retention is not None:
        judged += f" --upstream-retention {config.upstream_retention}"
    if config.observes:
        judged += " --lifecycle-source observed"
    if config.questdb_url is not None:  # its store too, the password left for you to put back
        judged += f" --questdb-url {shlex.quote(mask_url(config.questdb_url))}"
        judged += f" --questdb-table {config.questdb_table}"
        judged += f" --questdb-id-column {config.questdb_id_column}"
        judged += f" --questdb-timestamp-column {config.questdb_timestamp_column}"
    if explained:
        console.print("Look at any of them with:")
        console.print(f"  {_program()} explain {explained}{judged}", soft_wrap=True)
        if config.questdb_url is not None and mask_url(config.questdb_url) != config.questdb_url:
            console.print("  (with the QuestDB password in place of ***)")
    service_log = config.data_dir / SERVICE_LOG
    if explained and service_log.exists() and service_log.stat().st_size:
        console.print("Triage every miss the service logged with:")
        log = shlex.quote(str(service_log))
        console.print(f"  {_program()} triage {log}{judged}", soft_wrap=True)
    if missing:
        console.print(f"not seen this time: {', '.join(missing)} (run longer: --duration 30)")
    else:
        console.print("every reason appeared")
    return missing


def _program() -> str:
    """This program as it was started, so a command printed for the user runs as printed.

    Started with `python -m`, that interpreter and module (a venv's, even when it is
    not activated); otherwise the script's path as given (`.venv/bin/session-lens`).
    """
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None:
        module = spec.name.removesuffix(".__main__")
        return f"{shlex.quote(sys.executable)} -m {module}"
    return shlex.quote(sys.argv[0]) if sys.argv and sys.argv[0] else "session-lens"
