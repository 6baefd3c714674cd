"""Explaining misses within a time budget, without ever holding up the answer.

One evidence query per miss (shared by concurrent misses for the same ID), a
budget past which the reason is `unknown`, and a circuit breaker that stops
asking a sick database and tries again by itself.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from . import spoken
from .config import Config
from .events import Event
from .evidence.breaker import Breaker
from .evidence.classify import Rules, Said, Verdict, classify, creating_since, foregone, last_change
from .evidence.in_flight import InFlight, overlay
from .evidence.questdb import QuestDBStore, StoreEvidence, TableMeta, configured
from .evidence.questdb import StoreUnavailable as QuestDBUnavailable
from .evidence.replay import as_of, checked
from .evidence.retention import Retained
from .evidence.tables import (
    AuditEntry,
    Evidence,
    Queries,
    StoreError,
    StoreUnavailable,
    Trail,
    read_evidence,
    read_stored,
    read_timeline,
    read_trails,
    trails_query,
)
from .metrics import Metrics
from .pg import as_it_is, closed
from .reasons import Reason
from .schema import SessionState

log = logging.getLogger("session_lens.explain")

POOL_SIZE = 10
HEALTH_TIMEOUT = 1.0
EXPLAIN_TIMEOUT = 5.0
HORIZON_REFRESH = 60.0
"""How often the horizon gauge is read again when nothing else reads it."""
STORE_SHARE = 0.6
"""The most of the classification budget the service's store's row query may take..."""
STORE_WAIT = 0.7
"""...and a miss waits for it: the store's own timeout strikes first (and counts in its
breaker), and the lifecycle evidence still decides within the budget, with room to spare
on a busy machine (a store that timed out still has its connection dropped and its
failure logged before the miss goes on)."""
TIMELINE_LIMIT = 1000
"""The most audit entries `explain` reads of one ID."""
MAX_AUDIT_REASON = 200
TRAILS_TIMEOUT = 30.0
"""The longest a batch of trails may take to read: no one is waiting on an answer."""
"""The most of an audit entry's reason a sentence of `explain` quotes."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """A miss's reason, with the evidence behind it when there is some."""

    reason: Reason
    evidence: Evidence | None = None
    error: str | None = None
    note: str | None = None
    """What the reason cannot say: a partition at the store's retention boundary."""
    cause: str | None = None
    """Why an `unknown` is unknown, as `classifier_errors_total` names it."""
    store: StoreEvidence | None = None
    """What the service's own store said of the ID, when it was asked and answered."""

    def lifecycle(self) -> dict[str, Any] | None:
        """The evidence as the JSON members a response carries."""
        found = self.evidence
        if found is None or not (found.has_row or found.has_audit):
            return None
        last = None
        if found.has_audit:
            last = {
                "from": found.last_old_state,
                "to": found.last_new_state,
                "at": spoken.iso(found.last_at),
                "trigger": found.last_trigger,
            }
        return {
            "state": found.state,
            "deleted_at": spoken.iso(found.deleted_at),
            "last_transition": last,
        }


class Asked(NamedTuple):
    """A lookup that found nothing, as a log line tells of it."""

    session_id: str
    at: datetime | None
    """When it was made (None: not said, judged as of now)."""
    include_deleted: bool


@dataclass(frozen=True, slots=True)
class Report:
    """Everything known about one session ID, for `explain`."""

    session_id: str
    minted_at: datetime
    evidence: Evidence
    timeline: list[AuditEntry]
    reason: Reason
    reason_with_include_deleted: Reason
    retained: Retained | None
    visibility_window: timedelta
    creation_timeout: timedelta
    in_flight: list[Event] = field(default_factory=list)
    """Events this process has seen and not stored yet, laid over `evidence`."""
    doubt: str | None = None
    """Why no evidence does not mean never existed yet (observed mode): the reason is unknown."""
    at: datetime | None = None
    """The moment replayed (the evidence as it stood then); None: now."""
    given: Reason | None = None
    """The reason the miss at `at` was given, when the asker knows it (an exemplar's)."""
    limits: list[str] = field(default_factory=list)
    """What of the moment the records cannot replay."""
    store: StoreEvidence | None = None
    """What the service's own store says of the ID now (not asked for a replay)."""
    store_problem: str | None = None
    """Why the service's store, configured, gave no evidence."""
    tables_problem: str | None = None
    """Why the lifecycle tables could not be read: the report is of the events in flight."""

    def why(self) -> str:
        """The reason a miss gets (at `at`, or now), in a sentence a person can act on."""
        return self.because(self.reason)

    def replay_notes(self) -> list[str]:
        """What a replay cannot say, and where the reason given then differs from it."""
        notes = list(self.limits)
        given = self.given
        if self.at is not None and given is None:
            notes.append(
                "a replay cannot tell whether the evidence was had in time then: a miss given"
                " unknown (a timeout, the breaker open, the database down) got unknown whatever"
                " the records say"
            )
        elif given is Reason.UNKNOWN:
            notes.append(
                "the miss was given unknown: the evidence was not had in time (a timeout, the"
                " breaker open, the database down), which cannot be replayed; as the records"
                f" stood then, it would have been {self.reason}"
            )
        elif given is not None and given not in (self.reason, self.reason_with_include_deleted):
            notes.append(
                f"the miss was given {given}, the records as replayed give {self.reason}: they"
                " changed within moments of it (or the sidecar's clock differs from the"
                " database's)"
            )
        return notes

    def why_with_include_deleted(self) -> str:
        """The reason a miss asked with `include_deleted=true` would get, in a sentence."""
        return self.because(self.reason_with_include_deleted)

    def because(self, reason: Reason) -> str:
        """What the evidence gathered for this ID shows of `reason`, in one sentence."""
        return f"minted {spoken.when(self.minted_at)}, {_SHOWS.get(reason, _unknown)(self)}"


# What each reason's evidence shows: the sentence after "minted <when>, ".


def _expired(report: Report) -> str:
    store = report.store
    if store is not None:
        oldest = store.meta.oldest
        ttl = f", its TTL {store.meta.ttl}" if store.meta.ttl else ""
        return (
            f"in the partition {store.own}, which the service's store no longer has"
            f" (its oldest is {oldest or 'none'}{ttl}): dropped, and the row with it"
        )
    retained = report.retained
    if retained is None:
        return _unknown(report)
    return (
        f"in the partition from {spoken.when(retained.partition_start)}, which the store's"
        f" retention ({retained.retention}) has dropped by now"
    )


def _predates_tracking(report: Report) -> str:
    horizon = report.evidence.horizon
    since = (
        "and no tracking horizon is recorded"
        if horizon is None
        else f"before tracking began on {spoken.when(horizon)}"
    )
    return f"{since}: no evidence either way (import the service's store to know more)"


def _never_existed(report: Report) -> str:
    store = report.store
    if store is not None and store.row is None and any(store.present):
        return (
            f"not in its partition {', '.join(store.partitions)} of the service's store, which"
            " is there with every write applied: never written (the store deletes no row"
            " but with its partition)"
        )
    return (
        f"after tracking began on {spoken.when(report.evidence.horizon)}, and never recorded:"
        " no row and no audit entry"
    )


def _creating(report: Report) -> str:
    since = creating_since(report.evidence)
    return (
        f"CREATING since {spoken.when(since)}, {_ago(report, since)}, within the creation timeout"
        f" ({spoken.span(report.creation_timeout)}): the lookup raced the creation"
    )


def _creation_failed(report: Report) -> str:
    evidence = report.evidence
    if evidence.has_row:
        since = creating_since(evidence)
        return (
            f"CREATING since {spoken.when(since)}, {_ago(report, since)}, longer than the creation"
            f" timeout ({spoken.span(report.creation_timeout)}): the creation never completed"
        )
    return (
        f"its creation failed at {spoken.when(evidence.last_at)}{_by(_latest(report))}, no row left"
    )


def _deleted(report: Report) -> str:
    return (
        f"{_deletion(report)}: the upstream hides deleted sessions unless a lookup asks with"
        " include_deleted=true"
    )


def _deleted_not_served(report: Report) -> str:
    return (
        f"{_deletion(report)}: a lookup with include_deleted=true should find it, so a 404"
        " to one means the upstream ignores include_deleted"
    )


def _purged(report: Report) -> str:
    evidence = report.evidence
    first = (
        f"first recorded {spoken.when(report.timeline[0].occurred_at)}, " if report.timeline else ""
    )
    last = f"{spoken.when(evidence.last_at)}{_by(_latest(report))}"
    if evidence.last_new_state is not None:  # gone without a word: TRUNCATE, a table swapped
        return (
            f"{first}left {evidence.last_new_state} by the last audit entry ({last}) but without"
            " a row now: removed where the audit trigger did not see it"
        )
    return (
        f"{first}its row removed at {last} while {evidence.last_old_state}: hard-deleted,"
        " only the audit trail remembers it"
    )


def _archived(report: Report) -> str:
    entry = _entry_into(report, SessionState.ARCHIVED)
    when = "" if entry is None else f" at {spoken.when(entry.occurred_at)}{_by(entry)}"
    return f"archived{when}: moved to cold storage, where the upstream does not look"


def _store_suspended(report: Report) -> str:
    store = report.store
    wal = store.meta.wal if store is not None else None
    if wal is None:
        return _unknown(report)
    error = f" ({wal.error})" if wal.error else ""
    return (
        f"not in the service's store, whose write-ahead log is suspended{error} with"
        f" {wal.pending} transactions accepted and not applied: writes succeed but none is"
        " visible until RESUME WAL"
    )


def _not_yet_visible(report: Report) -> str:
    store = report.store
    if store is not None and store.row is None and store.meta.wal and store.meta.wal.pending:
        return (
            f"{_ago(report, report.minted_at)}, not in the service's store yet, which has"
            f" {store.meta.wal.pending} transactions accepted and not applied, within the"
            f" visibility window ({spoken.span(report.visibility_window)}): its row is on its way"
        )
    changed = last_change(report.evidence)
    return (
        f"{report.evidence.state} after a change at {spoken.when(changed)}{_by(_latest(report))},"
        f" {_ago(report, changed)}, within the visibility window"
        f" ({spoken.span(report.visibility_window)}): the upstream's store may not show it yet"
    )


def _upstream_inconsistent(report: Report) -> str:
    store = report.store
    if store is not None and store.row is not None:
        state = store.row.get("state") or report.evidence.state or "no state"
        return (
            f"its row is in the service's store ({state}, partition"
            f" {', '.join(store.partitions)}): the upstream answered 404 for a session its"
            " own store holds"
        )
    changed = last_change(report.evidence)
    return (
        f"{report.evidence.state} since {spoken.when(changed)}{_by(_latest(report))},"
        f" {_ago(report, changed)}, past the visibility window"
        f" ({spoken.span(report.visibility_window)}): the records say it is live, so a 404 means"
        " the upstream lost it"
    )


def _unknown(report: Report) -> str:
    if report.doubt is not None:
        return f"no record of it yet, but {report.doubt}"
    return (
        f"its row's state {report.evidence.state!r} is none the lifecycle model knows:"
        " no reason follows from it"
    )


_SHOWS: dict[Reason, Callable[[Report], str]] = {
    Reason.EXPIRED: _expired,
    Reason.PREDATES_TRACKING: _predates_tracking,
    Reason.NEVER_EXISTED: _never_existed,
    Reason.CREATING: _creating,
    Reason.CREATION_FAILED: _creation_failed,
    Reason.DELETED: _deleted,
    Reason.DELETED_NOT_SERVED: _deleted_not_served,
    Reason.PURGED: _purged,
    Reason.ARCHIVED: _archived,
    Reason.NOT_YET_VISIBLE: _not_yet_visible,
    Reason.STORE_SUSPENDED: _store_suspended,
    Reason.UPSTREAM_INCONSISTENT: _upstream_inconsistent,
}


def _ago(report: Report, moment: datetime | None) -> str:
    """How long before the evidence was read (or the moment replayed) `moment` was."""
    if moment is None:
        return "at an unknown time"
    span = spoken.span(report.evidence.now - moment)
    return f"{span} ago" if report.at is None else f"{span} before then"


def _latest(report: Report) -> AuditEntry | None:
    """The newest audit entry, when the timeline read holds it (it stops at its limit)."""
    entry = report.timeline[-1] if report.timeline else None
    return entry if entry is not None and entry.occurred_at == report.evidence.last_at else None


def _entry_into(report: Report, state: SessionState) -> AuditEntry | None:
    """The newest audit entry that moved the session into `state`."""
    return next((e for e in reversed(report.timeline) if e.new_state == state), None)


def _deletion(report: Report) -> str:
    """When and by whom a session was deleted, and how long after its creation."""
    evidence = report.evidence
    entry = _entry_into(report, SessionState.DELETED)
    deleted = evidence.deleted_at or (entry.occurred_at if entry else None)
    row = report.store.row if report.store is not None else None
    if deleted is None and row is not None:  # the service's store holds it as deleted
        stamp = row.get("deleted_at")
        if not isinstance(stamp, datetime):
            return "deleted, as the service's store holds it (when, it does not say)"
        deleted = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
        return f"deleted at {spoken.when(deleted)}, as the service's store holds it"
    said = f"deleted at {spoken.when(deleted)}{_by(entry)}"
    if deleted is None or evidence.created_at is None or deleted < evidence.created_at:
        return said
    return f"{said}, {spoken.span(deleted - evidence.created_at)} after its creation"


def _by(entry: AuditEntry | None) -> str:
    """Who made a change, as its audit entry names them: " by ops (sql: a reason)"."""
    if entry is None:
        return ""
    reason = " ".join((entry.reason or "").split())  # one line, whatever the writer gave
    if len(reason) > MAX_AUDIT_REASON:
        reason = reason[:MAX_AUDIT_REASON] + "…"
    return f" by {entry.actor} ({entry.trigger}{': ' + reason if reason else ''})"


class Explainer:
    """The classifier's side of the database: a lazy pool, a budget, a breaker."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        dsn: str | None,
        breaker: Breaker | None = None,
        store_budget: float | None = None,
    ) -> None:
        """`store_budget`: seconds the service's store may take per ID (None: a share of the
        classification budget, as a miss on the hop affords; commands may wait longer)."""
        self._config = config
        self._metrics = metrics
        self._dsn = dsn
        self._queries = Queries(config.tables)
        self._budget = config.classification_budget.total_seconds()
        self._breaker = breaker or Breaker()
        self._ids = config.id_validator
        self._retention = config.store_retention
        self._rules = Rules(config.visibility_window, config.creation_timeout, config.observes)
        self._pool: asyncpg.Pool | None = None
        self.questdb = _questdb(config, metrics, store_budget)
        """The service's own store, asked beside the lifecycle tables; None: not configured."""
        self._pending: dict[tuple[str, bool], asyncio.Task[Explanation]] = {}
        self._watch: asyncio.Task[None] | None = None
        self.horizon: datetime | None = None
        """The tracking horizon as last read from the database."""
        self.in_flight: InFlight | None = None
        """This process's recorder's events not stored yet (observed mode): evidence too."""
        self._trails = trails_query(config.tables)
        self.trail_queries = 0
        """How many queries `explain_lookups` has made."""

    async def open(self) -> None:
        """Create the pool; it connects on first use, so a down database does not stop start-up."""
        if self.questdb is not None:
            await self.questdb.open()
        if self._dsn is not None:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=POOL_SIZE,
                max_inactive_connection_lifetime=60,
                reset=as_it_is,
            )
            self._watch = asyncio.create_task(self._watch_horizon(), name="session-lens horizon")

    async def close(self) -> None:
        """Cancel the explanations still running and the horizon watch, then close the pool."""
        for task in [*self._pending.values(), *([self._watch] if self._watch else [])]:
            task.cancel()
        if self._pool is not None:
            await closed(self._pool)
        if self.questdb is not None:
            await self.questdb.close()

    async def explain_miss(
        self, session_id: str, include_deleted: bool, exemplar: dict[str, str] | None = None
    ) -> Explanation:
        """Why the upstream found nothing; `unknown` when the answer is not had in time.

        `exemplar` goes with the time it took into `classification_duration_seconds`.
        """
        started = time.perf_counter()
        try:
            retained = self._retained(session_id, datetime.now(UTC))
            foregone_reason = foregone(retained, store_asked=self.questdb is not None)
            if foregone_reason is not None:
                return Explanation(foregone_reason)  # the ID alone says so: no query
            key = (session_id, include_deleted)
            task = self._pending.get(key)
            if task is None:
                task = asyncio.create_task(self._explain(session_id, include_deleted))
                self._pending[key] = task
                task.add_done_callback(lambda _: self._pending.pop(key, None))
            try:
                async with asyncio.timeout(self._budget):
                    explanation = await asyncio.shield(task)
            except TimeoutError:
                explanation = Explanation(
                    Reason.UNKNOWN, error="no answer within the budget", cause="timeout"
                )
            if explanation.cause is not None:  # each miss counted once, by what decided it
                self._metrics.classifier_errors[explanation.cause].inc()
            return explanation
        finally:
            self._metrics.classification_duration.observe(time.perf_counter() - started, exemplar)

    async def _explain(self, session_id: str, include_deleted: bool) -> Explanation:
        if self._pool is None:
            return Explanation(Reason.UNKNOWN, error="no database configured", cause="unavailable")
        # The events in flight as the query starts: one stored while it runs is in these
        # or in what it reads, never in neither.
        in_flight = self._in_flight_of(session_id)
        if not self._breaker.allow():
            if in_flight:
                return self._in_flight_alone(session_id, in_flight, include_deleted, _BREAKER)
            return Explanation(Reason.UNKNOWN, error=_BREAKER, cause="breaker_open")
        self._metrics.classification_queries.inc()
        # The store's answer is waited for only while the budget leaves room for the
        # lifecycle evidence to decide alone.
        deadline = asyncio.get_running_loop().time() + self._budget * STORE_WAIT
        asked = asyncio.create_task(self._ask_store(session_id))
        try:
            evidence = await read_evidence(self._pool, self._queries, session_id, self._budget)
        except StoreError as exc:
            asked.cancel()
            self._breaker.failed()
            self._metrics.breaker_open.set(self._breaker.is_open)
            if in_flight:
                return self._in_flight_alone(
                    session_id, in_flight, include_deleted, exc.detail, exc.kind
                )
            return Explanation(Reason.UNKNOWN, error=exc.detail, cause=exc.kind)
        self._breaker.succeeded()
        self._metrics.breaker_open.set(0)
        self._saw(evidence)
        try:
            async with asyncio.timeout_at(deadline):
                store = await asked
        except TimeoutError:
            self._metrics.questdb_errors["timeout"].inc()
            store = None
        retained = self._retained(session_id, evidence.now)
        try:
            seen = overlay(evidence, in_flight) if in_flight else evidence
            verdict = self._judge(session_id, seen, include_deleted, retained, store)
            return Explanation(verdict.reason, seen, note=verdict.note, store=store)
        except (TypeError, ValueError) as exc:  # evidence of a shape nobody planned for
            log.error("cannot classify", extra={"session_id": session_id, "error": repr(exc)})
            error = f"unclassifiable evidence: {exc}"
            return Explanation(Reason.UNKNOWN, evidence, error=error, cause="query")

    async def _ask_store(self, session_id: str) -> StoreEvidence | None:
        """The service's store's evidence on the ID; None when it is not configured or gave
        none (counted by kind; the store logs the first failure of a run)."""
        minted = self._ids.minted_at(session_id)
        if self.questdb is None or minted is None:
            return None
        try:
            return await self.questdb.look_up(session_id, minted)
        except QuestDBUnavailable as exc:
            self._metrics.questdb_errors[exc.kind.value].inc()
            return None
        except Exception as exc:
            log.error("cannot read the store's evidence", extra={"session_id": session_id[:64],
                      "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            self._metrics.questdb_errors["query"].inc()
            return None

    def _in_flight_alone(
        self,
        session_id: str,
        events: list[Event],
        include_deleted: bool,
        error: str,
        cause: str = "breaker_open",
    ) -> Explanation:
        """What this process's events not stored yet say of the ID when the lifecycle
        tables cannot be read: the evidence it holds itself, said to be all there is."""
        seen = overlay(_unread(datetime.now(UTC), self.horizon), events)
        verdict = self._judge(
            session_id, seen, include_deleted, self._retained(session_id, seen.now)
        )
        note = f"{_ALONE} ({error})"
        if verdict.note:
            note = f"{verdict.note}; {note}"
        unknown = verdict.reason is Reason.UNKNOWN
        return Explanation(
            verdict.reason, seen, error=error, note=note, cause=cause if unknown else None
        )

    def _in_flight_of(self, session_id: str) -> list[Event]:
        """This process's events in flight for the ID, oldest first."""
        return self.in_flight.of(session_id) if self.in_flight is not None else []

    def _judge(
        self,
        session_id: str,
        seen: Evidence,
        include_deleted: bool,
        retained: Retained | None,
        store: StoreEvidence | None = None,
    ) -> Verdict:
        """What `classify` makes of the sources' evidence on the ID."""
        in_flight = self.in_flight
        unindexed = in_flight.newest if in_flight is not None and in_flight.overflow else None
        said = Said(seen, self._ids.minted_at(session_id), retained, store, unindexed)
        return classify(said, include_deleted, self._rules)

    def _retained(self, session_id: str, now: datetime) -> Retained | None:
        if self._retention is None:
            return None
        minted = self._ids.minted_at(session_id)
        return None if minted is None else Retained.of(self._retention, minted, now)

    def _saw(self, evidence: Evidence) -> None:
        """Keep the horizon (and its gauge) as the database last gave it."""
        if evidence.horizon is not None and evidence.horizon != self.horizon:
            self.horizon = evidence.horizon
            self._metrics.tracking_horizon.set(evidence.horizon.timestamp())

    async def _watch_horizon(self) -> None:
        """Read the horizon now and then, so its gauge is right before any miss.

        The first read happens at start-up: a store that cannot be read (not
        migrated, say) is said at once, in one log line, and again when that changes.
        """
        said: str | None = None
        while True:
            problem = await self.health()
            if problem != said:
                if problem is not None:
                    log.error("the lifecycle tables cannot be read", extra={"problem": problem})
                elif said is not None:
                    log.warning("the lifecycle tables can be read again")
                said = problem
            await asyncio.sleep(HORIZON_REFRESH)

    async def report(
        self, session_id: str, at: datetime | None = None, given: Reason | None = None
    ) -> Report:
        """State, audit timeline and the reason a lookup would get now, or got at `at`
        (the evidence replayed as it stood then); raises StoreError, or ReplayError for
        an `at` no miss of the ID can have happened at."""
        if self._pool is None:
            raise StoreUnavailable("no database configured")
        events = self._in_flight_of(session_id)  # before the query: see `_explain`
        tables_problem = None
        try:
            if events:  # a read of a spool being emptied may hold some stored already;
                # asked before the evidence is read, so none falls between the two
                ids = [event.event_id for event in events]
                stored = await read_stored(self._pool, self._queries, ids, EXPLAIN_TIMEOUT)
                events = [event for event in events if event.event_id not in stored]
            evidence = await read_evidence(self._pool, self._queries, session_id, EXPLAIN_TIMEOUT)
            timeline = await read_timeline(
                self._pool, self._queries, session_id, EXPLAIN_TIMEOUT, TIMELINE_LIMIT
            )
        except StoreError as exc:
            if not events or at is not None:
                raise
            # What this process saw and has not stored is evidence all the same.
            evidence, timeline = _unread(datetime.now(UTC), self.horizon), []
            tables_problem = exc.detail
        self._saw(evidence)
        minted = self._ids.minted_at(session_id)
        if minted is None:
            raise ValueError(f"{session_id[:64]!r} is not a valid session ID")
        limits: list[str] = []
        if at is not None:
            checked(at, minted, self._config.max_future_skew, evidence.now)
            complete = len(timeline) < TIMELINE_LIMIT
            evidence, limits = as_of(evidence, timeline, at, complete)
            events = [event for event in events if event.at <= at.timestamp()]
        store, store_problem = None, None
        if self.questdb is not None and at is None:  # the store tells of now, not of then
            try:
                await self.questdb.refresh()
                store = await self.questdb.look_up(session_id, minted)
            except QuestDBUnavailable as exc:
                store_problem = f"{exc.kind.value}: {exc.detail}"
            except Exception as exc:
                store_problem = f"query: {type(exc).__name__}: {exc}"
        retained = self._retained(session_id, evidence.now)
        seen = overlay(evidence, events) if events else evidence
        plain = self._judge(session_id, seen, False, retained, store)
        asked = self._judge(session_id, seen, True, retained, store)
        return Report(
            session_id,
            minted,
            seen,
            timeline,
            plain.reason,
            asked.reason,
            retained,
            self._config.visibility_window,
            self._config.creation_timeout,
            events,
            next((v.note for v in (plain, asked) if v.reason is Reason.UNKNOWN), None),
            at,
            given,
            limits,
            store,
            store_problem,
            tables_problem,
        )

    async def explain_lookups(
        self, asked: Sequence[Asked], trails: dict[str, Trail] | None = None
    ) -> list[Explanation]:
        """Why each of many logged lookups found nothing, judged as of when it was made,
        from one query for all their IDs (those not in `trails` already); raises StoreError.

        The same classification as a miss's, on the evidence replayed to the lookup's moment
        as `report(at=...)` replays it: a lookup 0.3 s after its session's creation is
        read-after-write even if the session is visible now. A lookup judged as one
        before it of the same ID, flag and audit entries was, where time cannot change the
        reason (deleted, archived, no row), gets that reason without its evidence.
        """
        if self._pool is None:
            raise StoreUnavailable("no database configured")
        known = trails if trails is not None else {}
        wanted = sorted({a.session_id for a in asked} - known.keys())
        if wanted:
            read = await read_trails(self._pool, self._trails, wanted, TRAILS_TIMEOUT)
            self._metrics.classification_queries.inc()
            self.trail_queries += 1
            known.update(read)
        witnessed = await self._store_now(asked)
        rules = replace(self._rules, observed=False)  # the records have the lookup's moment
        minted: dict[str, datetime | None] = {}
        explained = []
        for index, lookup in enumerate(asked):
            trail = known[lookup.session_id]
            store = witnessed[index] if witnessed is not None else None
            alike = (lookup.include_deleted, trail.steps_by(lookup.at))
            timeless = self._retention is None and store is None
            reason = trail.judged.get(alike) if timeless else None
            evidence = None
            if reason is None:
                evidence = trail.evidence()
                if lookup.at is not None and lookup.at < trail.now:  # as `explain --at` does
                    evidence = as_of(evidence, trail.entries, lookup.at, trail.complete)[0]
                if lookup.session_id not in minted:
                    minted[lookup.session_id] = self._ids.minted_at(lookup.session_id)
                born = minted[lookup.session_id]
                retained = None
                if self._retention is not None and born is not None:
                    retained = Retained.of(self._retention, born, evidence.now)
                said = Said(evidence, born, retained, store, store_read_later=True)
                reason = classify(said, lookup.include_deleted, rules).reason
                if timeless and _timeless(evidence, trail):
                    trail.judged[alike] = reason
            explained.append(Explanation(reason, evidence))
        return explained

    async def _store_now(self, asked: Sequence[Asked]) -> list[StoreEvidence | None] | None:
        """What the service's store says now of each lookup's ID (None where it gave no
        answer), asked once per ID, as many at a time as its pool holds; None: no store."""
        store = self.questdb
        if store is None:
            return None
        said: dict[str, StoreEvidence | None] = {}
        room = asyncio.Semaphore(store.settings.pool_size)

        async def ask(session_id: str) -> None:
            async with room:
                said[session_id] = await self._ask_store(session_id)

        await asyncio.gather(*(ask(i) for i in {a.session_id for a in asked}))
        return [said[a.session_id] for a in asked]

    async def health(self) -> str | None:
        """None when the lifecycle tables answer, else what is wrong."""
        if self._pool is None:
            return "no database configured"
        try:
            evidence = await read_evidence(
                self._pool, self._queries, "exec_health_check", HEALTH_TIMEOUT
            )
        except StoreError as exc:
            return exc.detail
        self._saw(evidence)
        self._breaker.succeeded()  # the probe was a trial that went through
        self._metrics.breaker_open.set(0)
        return None


_BREAKER = "circuit breaker open"
_ALONE = "the lifecycle tables cannot be read: from what this sidecar saw and has not stored"


def _unread(now: datetime, horizon: datetime | None) -> Evidence:
    """The lifecycle tables' evidence when they cannot be read: none (the horizon as
    last read), for the events in flight to be laid over."""
    return Evidence(None, None, None, None, None, None, None, None, now, horizon)


def _timeless(evidence: Evidence, trail: Trail) -> bool:
    """Whether the reason `evidence` gives holds at any moment with the same audit entries
    behind it: no age is compared (a deletion, an archive, a row gone or never there)."""
    if evidence.state in (SessionState.DELETED, SessionState.ARCHIVED):
        return True
    return evidence.state is None and (evidence.has_audit or trail.state is None)


def report_json(report: Report) -> dict[str, Any]:
    """A report as the admin endpoint serves it."""
    evidence = report.evidence
    retained = report.retained
    return {
        "session_id": report.session_id,
        "at": spoken.iso(report.at),
        "given": report.given.value if report.given else None,
        "replay_notes": report.replay_notes(),
        "minted_at": spoken.iso(report.minted_at),
        "tracking_horizon": spoken.iso(evidence.horizon),
        "store_retention": None
        if retained is None
        else {
            "ttl": str(retained.retention.ttl),
            "partition": retained.retention.partition.value,
            "partition_start": spoken.iso(retained.partition_start),
            "partition_end": spoken.iso(retained.partition_end),
            "fate": retained.fate.value,
        },
        "state": evidence.state,
        "created_at": spoken.iso(evidence.created_at),
        "updated_at": spoken.iso(evidence.updated_at),
        "deleted_at": spoken.iso(evidence.deleted_at),
        "reason": report.reason.value,
        "reason_with_include_deleted": report.reason_with_include_deleted.value,
        "why": report.why(),
        "why_with_include_deleted": report.why_with_include_deleted(),
        "in_flight": [
            {
                "at": spoken.iso(datetime.fromtimestamp(event.at, UTC)),
                "action": event.action.value,
                "ok": event.ok,
                "request_id": event.request_id,
            }
            for event in report.in_flight
        ],
        "note": retained.note() if retained and report.store is None else None,
        "questdb": store_json(report.store),
        "questdb_problem": report.store_problem,
        "lifecycle_tables_problem": report.tables_problem,
        "timeline": [
            {
                "at": spoken.iso(entry.occurred_at),
                "from": entry.old_state,
                "to": entry.new_state,
                "trigger": entry.trigger,
                "actor": entry.actor,
                "reason": entry.reason,
            }
            for entry in report.timeline
        ],
    }


def store_json(store: StoreEvidence | None) -> dict[str, Any] | None:
    """What the service's store said of an ID, as JSON members."""
    if store is None:
        return None
    meta, wal = store.meta, store.meta.wal
    return {
        "partitions": [
            {"name": name, "present": here}
            for name, here in zip(store.partitions, store.present, strict=True)
        ],
        "oldest_partition": meta.oldest,
        "ttl": None if meta.ttl is None else str(meta.ttl),
        "row": None if store.row is None else {k: _plain(v) for k, v in store.row.items()},
        "wal": None
        if wal is None
        else {
            "suspended": wal.suspended,
            "pending": wal.pending,
            "writer_txn": wal.writer_txn,
            "sequencer_txn": wal.sequencer_txn,
            "error": wal.error or None,
        },
        "read_at": spoken.iso(meta.read_at),
    }


def _plain(value: object) -> object:
    """A row's value as JSON holds it: times as ISO 8601 (QuestDB's are UTC), the rest text."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _questdb(config: Config, metrics: Metrics, budget: float | None) -> QuestDBStore | None:
    """The service's QuestDB as configured, its WAL state into the gauges; None: not asked."""
    if budget is None:
        budget = min(
            config.questdb_budget.total_seconds(),
            config.classification_budget.total_seconds() * STORE_SHARE,
        )
    settings = configured(config, budget=budget)
    if settings is None:
        return None

    def gauge(meta: TableMeta) -> None:
        wal = meta.wal
        metrics.questdb_wal_suspended.set(int(wal is not None and wal.suspended))
        metrics.questdb_wal_pending.set(0 if wal is None else wal.pending)

    return QuestDBStore(settings, on_meta=gauge)
