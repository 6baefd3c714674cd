"""The evidence as it stood at a moment in the past, replayed from the audit timeline.

A miss is explained from what the lifecycle tables say when it happens; `explain`
asked later reads them as they are by then. Given the moment of the miss (`at`),
the row's state then comes from the newest audit entry at or before it, and the
visibility window and the creation timeout run from that moment. What the tables
cannot tell of the past (history pruned since, a timeline longer than read) is
said, never guessed; nor can a replay know that the database was slow or the
breaker open then: a miss given `unknown` is explained by what it would have
been given.
"""

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from ..reasons import Reason
from ..schema import SessionState
from .tables import AuditEntry, Evidence

CLOSE = timedelta(seconds=1)
"""A change this close before the moment may not have been committed when the miss was
explained: its transaction's time is when it began, not when others could see it."""
FUTURE_TOLERANCE = timedelta(minutes=1)
"""How far past the database's clock a moment may be (the sidecars' clocks differ)."""
_MILLISECONDS = re.compile(r"\d{1,15}(\.\d+)?")


class ReplayError(ValueError):
    """A moment that cannot be replayed: unreadable, in the future, before the ID."""


def moment(text: str) -> datetime:
    """A moment as ISO 8601 (UTC when no offset is given) or Unix milliseconds, as
    Grafana's `${__value.time}` gives an exemplar's time; raises ReplayError."""
    text = text.strip()
    if _MILLISECONDS.fullmatch(text):
        return datetime.fromtimestamp(float(text) / 1000, UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"{text[:64]!r} is not a moment: ISO 8601 (2026-12-05T01:02:03Z) or Unix milliseconds"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def given_reason(text: str) -> Reason:
    """The reason a miss was given, as its exemplar's series names it; raises ReplayError."""
    try:
        return Reason(text.strip())
    except ValueError:
        raise ReplayError(
            f"{text[:64]!r} is not a reason: one of {', '.join(r.value for r in Reason)}"
        ) from None


def checked(at: datetime, minted_at: datetime, skew: timedelta, now: datetime) -> datetime:
    """`at`, if a miss of an ID minted at `minted_at` can have happened then; raises
    ReplayError."""
    if at > now + FUTURE_TOLERANCE:
        raise ReplayError(f"at ({_when(at)}) is later than the database's clock ({_when(now)})")
    if at < minted_at - skew:
        raise ReplayError(
            f"at ({_when(at)}) is before the ID was minted ({_when(minted_at)}): no lookup of"
            " it can have missed then (Unix seconds where milliseconds were meant?)"
        )
    return at


def as_of(
    evidence: Evidence, timeline: list[AuditEntry], at: datetime, complete: bool = True
) -> tuple[Evidence, list[str]]:
    """The evidence as the one query would have read it at `at`, and what of it the
    records cannot replay. `complete`: whether `timeline` holds every entry read."""
    limits = []
    horizon = evidence.horizon
    if horizon is not None and at < horizon:
        limits.append(
            f"the records before {_when(horizon)} were pruned since: the evidence then may"
            " have held more than is left"
        )
    if not complete and timeline and at >= timeline[-1].occurred_at:
        limits.append(
            f"only the first {len(timeline)} audit entries were read: later ones may have"
            " changed the state by then"
        )
    before = [entry for entry in timeline if entry.occurred_at <= at]
    if before and at - before[-1].occurred_at < CLOSE:
        limits.append(
            f"the change at {_when(before[-1].occurred_at)} came"
            f" {_ms(at - before[-1].occurred_at)} before the moment: a miss explained before it"
            " was committed read the records without it"
        )
    if not timeline and evidence.has_row and _unchanged_since(evidence, at):
        limits.append("the row has no audit entry: its state now stands for its state then")
        return replace(evidence, now=at, replaying=None), limits
    if timeline and len(before) == len(timeline) and complete and _unchanged_since(evidence, at):
        return replace(evidence, now=at, replaying=None), limits  # the row then is the row now
    if not before:
        return _nothing(evidence, at), limits
    last = before[-1]
    state = last.new_state
    created_at = evidence.created_at
    if created_at is None or created_at > at:
        created_at = next((e.occurred_at for e in before if e.old_state is None), None)
    deleted = next((e for e in reversed(before) if e.new_state == SessionState.DELETED), None)
    return (
        Evidence(
            state=state,
            created_at=created_at if state is not None else None,
            updated_at=last.occurred_at if state is not None else None,
            deleted_at=deleted.occurred_at
            if state == SessionState.DELETED and deleted is not None
            else None,
            last_old_state=last.old_state,
            last_new_state=last.new_state,
            last_at=last.occurred_at,
            last_trigger=last.trigger,
            now=at,
            horizon=horizon,
        ),
        limits,
    )


def _unchanged_since(evidence: Evidence, at: datetime) -> bool:
    """Whether nothing the evidence shows happened after `at`."""
    stamps = (evidence.updated_at, evidence.last_at, evidence.created_at)
    return all(stamp is None or stamp <= at for stamp in stamps)


def _nothing(evidence: Evidence, at: datetime) -> Evidence:
    """No row and no audit entry yet at `at`."""
    return Evidence(None, None, None, None, None, None, None, None, at, evidence.horizon)


def _ms(span: timedelta) -> str:
    return f"{span.total_seconds() * 1000:.0f} ms"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
