"""Recording a batch as a set leaves what recording it one event at a time leaves.

`session_lens_record_events` (migration 008) records the events that are alone of
their session in a batch with a few statements for the whole batch, and the rest
through `session_lens_record`, one at a time. Here the same random histories go
through it in one database and through `session_lens_record_batch` (one call of
`session_lens_record` an event) in a copy of it, batch by batch: every result, row,
event and audit entry must be the same.
"""

import json
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from session_lens.events import Event
from session_lens.recorder import _micros
from session_lens.routes import TARGET_STATE, Action
from tests.conftest import with_database

SEED = int(os.environ.get("SESSION_LENS_SETS_SEED", "20261205"))
NOW = datetime.now(UTC).replace(microsecond=0)
ACTOR = " FROM (SELECT set_config('session_lens.actor', 'session-lens', true)) AS actor"
ONE_AT_A_TIME = "SELECT session_lens_record_batch($1, $2, $3, $4, $5, $6, $7)" + ACTOR
AS_A_SET = "SELECT session_lens_record_events($1, $2, $3, $4, $5, $6, $7)" + ACTOR


def histories(rng: random.Random) -> tuple[list[tuple[str, str, datetime]], list[list[Any]]]:
    """Rows a service wrote itself, and batches of events: sessions of one to four
    events, some late, some repeated, some failed, some before the horizon or ahead."""
    rows, events = [], []
    for n in range(300):
        session = f"exec_20251230_020944_{n:08x}"
        start = NOW - timedelta(minutes=30) + timedelta(seconds=rng.uniform(0, 600))
        if rng.random() < 0.2:
            rows.append((session, rng.choice(["ACTIVE", "PAUSED", "DELETED"]), start))
        at = start
        for _ in range(rng.choice([1, 1, 1, 2, 3, 4])):
            at += timedelta(seconds=rng.uniform(-2, 30))  # now and then earlier than the last
            action = rng.choice(list(Action))
            ok = action is not Action.CREATE or rng.random() > 0.2
            when = at
            if rng.random() < 0.03:
                when = NOW - timedelta(days=400)  # before the horizon
            elif rng.random() < 0.03:
                when = NOW + timedelta(hours=1)  # ahead of the database's clock
            moment = when.timestamp() + rng.random() / 1e3
            events.append((uuid.uuid4().hex, session, action, ok, moment))
    events += rng.sample(events, 40)  # delivered twice
    rng.shuffle(events)
    batches = []
    while events:
        size = rng.choice([1, 5, 50, 200])
        batch, events = events[:size], events[size:]
        batch.sort(key=lambda event: event[1])  # as a recorder sorts its batch
        batches.append(batch)
    return rows, batches


def columns(batch: list[Any], as_a_set: bool) -> list[list[Any]]:
    rows = []
    for event_id, session, action, ok, at in batch:
        target = TARGET_STATE[action]
        rows.append(
            (
                event_id if as_a_set else uuid.UUID(event_id),
                session,
                action.value,
                target.value if target is not None and ok else None,
                ok,
                _micros(at) if as_a_set else datetime.fromtimestamp(at, UTC),
                f"event {event_id[:8]}",
            )
        )
    return [list(column) for column in zip(*rows, strict=True)]


async def contents(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "sessions": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT id, state, created_at, updated_at, deleted_at FROM sessions ORDER BY id"
            )
        ],
        "events": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT event_id, session_id, action, occurred_at, ok"
                " FROM session_lens_events ORDER BY event_id"
            )
        ],
        # One session's entries in the order they were written; sessions apart.
        "audit": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT session_id, occurred_at, old_state, new_state, trigger, actor, reason"
                " FROM session_audit ORDER BY session_id, id"
            )
        ],
    }


async def test_a_batch_as_a_set_leaves_what_one_event_at_a_time_leaves(db: str) -> None:
    rng = random.Random(SEED)
    rows, batches = histories(rng)
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(
            "UPDATE session_lens_tracking SET pruned_before = $1", NOW - timedelta(days=30)
        )
        for session, state, at in rows:
            await conn.execute(
                "INSERT INTO sessions (id, state, created_at, updated_at, deleted_at)"
                " VALUES ($1, $2, $3, $3, CASE WHEN $2::text = 'DELETED' THEN $3::timestamptz END)",
                session,
                state,
                at,
            )
    finally:
        await conn.close()
    name = urlsplit(db).path.lstrip("/")
    twin = name + "_twin"
    admin = await asyncpg.connect(with_database(db, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{twin}" TEMPLATE "{name}"')
    finally:
        await admin.close()
    set_conn = await asyncpg.connect(db)
    one_conn = await asyncpg.connect(with_database(db, twin))
    try:
        said_as_set, said_one_by_one = [], []
        for batch in batches:
            said_as_set += await set_conn.fetchval(AS_A_SET, *columns(batch, True))
            said_one_by_one += await one_conn.fetchval(ONE_AT_A_TIME, *columns(batch, False))
        assert said_as_set == said_one_by_one, f"SESSION_LENS_SETS_SEED={SEED}"
        # The histories reach every case: each result, and late events.
        kinds = {said.split(":")[0] for said in said_as_set}
        assert {"none", "duplicate", "before_horizon", "future", "late"} <= kinds
        assert await contents(set_conn) == await contents(one_conn), (
            f"SESSION_LENS_SETS_SEED={SEED}"
        )
    finally:
        await set_conn.close()
        await one_conn.close()
        admin = await asyncpg.connect(with_database(db, "postgres"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{twin}" WITH (FORCE)')
        await admin.close()


def test_a_spool_line_is_what_json_writes_and_reads_back() -> None:
    """An event's spool line skips json.dumps where it may; the line is the same."""
    rng = random.Random(SEED)
    texts = ["exec_20251230_020944_0000abcd", "req-1", 'a"b', "a\\b", "é", "x\ty", "x\x7fy", ""]
    for _ in range(2000):
        detail = rng.choice([None, None, "the upstream answered 503", 'é"'])
        event = Event.new(
            rng.choice(texts),
            rng.choice(list(Action)),
            rng.choice(texts),
            ok=detail is None,
            detail=detail,
            at=rng.choice([time.time(), rng.uniform(0, 2e9), 1772366400.0000076]),
        )
        fields = [event.event_id, event.session_id, event.action.value, event.ok, event.at,
                  event.request_id, event.detail]  # fmt: skip
        assert event.line() == json.dumps(fields, separators=(",", ":")).encode() + b"\n"
        assert Event.parse(event.line()) == event
