"""Every miss carries its true reason, read from real table state written with plain SQL."""

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from session_lens.embedded import start_embedded
from session_lens.explain import Breaker
from session_lens.lifecycle import CreationFailed, Lifecycle
from session_lens.migrations import migrate
from session_lens.schema import Tables

from .conftest import MakeProxy, ProxyUnderTest, RawResponse, Upstream, not_found, raw_exchange

SID = "exec_20251230_020944_4ad060d9"
ROUTE = "/api/sessions/{session_id}"


async def lookup(proxy: ProxyUnderTest, query: str = "") -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/api/sessions/{SID}{query}") as response,
    ):
        body = await response.read()
        return response.status, dict(response.headers), json.loads(body) if body else None


# Each case: the SQL an application or an operator would run, settings, the query string.
CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("never_existed", [], {}, ""),
    ("creating", ["INSERT INTO sessions (id, state) VALUES ($1, 'CREATING')"], {}, ""),
    (
        "creation_failed",
        ["INSERT INTO sessions (id, state) VALUES ($1, 'CREATING')"],
        {"creation_timeout": "1ms"},
        "",
    ),
    (
        "creation_failed",
        [
            "INSERT INTO sessions (id, state) VALUES ($1, 'CREATING')",
            "DELETE FROM sessions WHERE id = $1",
        ],
        {},
        "",
    ),
    (
        "deleted",
        [
            "INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')",
            "UPDATE sessions SET state = 'DELETED' WHERE id = $1",
        ],
        {},
        "",
    ),
    (
        "deleted_not_served",
        [
            "INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')",
            "UPDATE sessions SET state = 'DELETED' WHERE id = $1",
        ],
        {},
        "?include_deleted=true",
    ),
    (
        "purged",
        ["INSERT INTO sessions (id) VALUES ($1)", "DELETE FROM sessions WHERE id = $1"],
        {},
        "",
    ),
    ("archived", ["INSERT INTO sessions (id, state) VALUES ($1, 'ARCHIVED')"], {}, ""),
    ("not_yet_visible", ["INSERT INTO sessions (id) VALUES ($1)"], {}, ""),
    (
        "upstream_inconsistent",
        ["INSERT INTO sessions (id, state) VALUES ($1, 'PAUSED')"],
        {"visibility_window": "0s"},
        "",
    ),
]


@pytest.mark.parametrize(("reason", "statements", "settings", "query"), CASES)
async def test_every_reason_from_real_table_state(
    missing: Upstream,
    make_proxy: MakeProxy,
    conn: asyncpg.Connection,
    db: str,
    reason: str,
    statements: list[str],
    settings: dict[str, str],
    query: str,
) -> None:
    for statement in statements:
        await conn.execute(statement, SID)
    proxy = await make_proxy(missing.url, database_url=db, classification_budget="2s", **settings)
    status, headers, body = await lookup(proxy, query)
    assert status == 404
    assert headers["X-Session-Not-Found-Reason"] == reason
    assert body["error"] == "session_not_found"  # the upstream's keys stay
    assert body["reason"] == reason
    assert body["session_id"] == SID
    assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason=reason) == 1
    assert proxy.metric("session_lens_lookups_total", route=ROUTE, outcome="not_found") == 1
    assert proxy.metric("session_lens_classification_duration_seconds_count") == 1


async def test_lifecycle_members_describe_the_evidence(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')", SID)
    await conn.execute("UPDATE sessions SET state = 'DELETED' WHERE id = $1", SID)
    proxy = await make_proxy(missing.url, database_url=db, disclose="lifecycle")
    _, _, body = await lookup(proxy)
    lifecycle = body["lifecycle"]
    assert lifecycle["state"] == "DELETED"
    assert lifecycle["deleted_at"] is not None
    assert lifecycle["last_transition"]["from"] == "STOPPED"
    assert lifecycle["last_transition"]["to"] == "DELETED"
    assert lifecycle["last_transition"]["trigger"] == "sql"


async def test_problem_and_passthrough_bodies(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'ARCHIVED')", SID)
    problem = await make_proxy(missing.url, database_url=db, not_found_body="problem")
    status, headers, body = await lookup(problem)
    assert status == 404
    assert headers["Content-Type"] == "application/problem+json"
    assert body["status"] == 404 and body["reason"] == "archived"
    assert body["title"] == "Not Found" and "archived" in body["detail"]
    passthrough = await make_proxy(missing.url, database_url=db, not_found_body="passthrough")
    status, headers, body = await lookup(passthrough)
    assert headers["X-Session-Not-Found-Reason"] == "archived"
    assert body == {"error": "session_not_found"}


async def test_non_json_and_colliding_bodies_are_left_alone(
    upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    async def answers(request: web.Request) -> web.StreamResponse:
        if request.query.get("kind") == "text":
            return web.Response(status=404, text="nope")
        return web.json_response({"reason": "theirs"}, status=404)

    upstream.respond = answers
    proxy = await make_proxy(upstream.url, database_url=db)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/api/sessions/{SID}?kind=text") as response:
            assert await response.text() == "nope"
            assert response.headers["X-Session-Not-Found-Reason"] == "never_existed"
        async with client.get(f"{proxy.url}/api/sessions/{SID}") as response:
            body = await response.json()
    assert body["reason"] == "theirs"
    assert body["session_lens"]["reason"] == "never_existed"


async def test_miss_statuses_are_configurable(
    upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    async def gone(request: web.Request) -> web.StreamResponse:
        return web.json_response({}, status=410)

    upstream.respond = gone
    proxy = await make_proxy(upstream.url, database_url=db, miss_statuses="404,410")
    status, headers, _ = await lookup(proxy)
    assert status == 410
    assert headers["X-Session-Not-Found-Reason"] == "never_existed"


async def test_lookup_races_a_two_step_creation(
    upstream: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    # The service commits CREATING, then finishes; a lookup lands in between.
    async def creating_meanwhile(request: web.Request) -> web.StreamResponse:
        await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'CREATING')", SID)
        return await not_found(request)

    upstream.respond = creating_meanwhile
    proxy = await make_proxy(upstream.url, database_url=db)
    _, headers, _ = await lookup(proxy)
    assert headers["X-Session-Not-Found-Reason"] == "creating"


async def test_delete_during_the_lookup(
    upstream: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    await Lifecycle(conn).create_session(SID)
    await Lifecycle(conn).stop(SID)

    async def deleted_meanwhile(request: web.Request) -> web.StreamResponse:
        await Lifecycle(conn).soft_delete(SID)
        return await not_found(request)

    upstream.respond = deleted_meanwhile
    proxy = await make_proxy(upstream.url, database_url=db)
    _, headers, _ = await lookup(proxy)
    assert headers["X-Session-Not-Found-Reason"] == "deleted"


async def test_read_after_write_lag(
    upstream: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    # A replica that has not seen the creation yet answers 404 right after it.
    async def lagging(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            await Lifecycle(conn).create_session(SID)
            return web.json_response({"id": SID}, status=201)
        return await not_found(request)

    upstream.respond = lagging
    proxy = await make_proxy(upstream.url, database_url=db)
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/api/sessions") as created,
    ):
        assert created.status == 201
    _, headers, _ = await lookup(proxy)
    assert headers["X-Session-Not-Found-Reason"] == "not_yet_visible"


async def test_failed_atomic_creation_explains_itself(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    async def boom(connection: asyncpg.Connection, session_id: str) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(CreationFailed):
        await Lifecycle(conn).create_session(SID, verify=boom)
    proxy = await make_proxy(missing.url, database_url=db, disclose="lifecycle")
    _, headers, body = await lookup(proxy)
    assert headers["X-Session-Not-Found-Reason"] == "creation_failed"
    assert body["lifecycle"]["last_transition"] == {
        "from": "CREATING",
        "to": None,
        "at": body["lifecycle"]["last_transition"]["at"],
        "trigger": "create",
    }


async def test_concurrent_misses_share_one_query(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    proxy = await make_proxy(missing.url, database_url=db, classification_budget="5s")
    async with conn.transaction():
        # Hold the table so the first query waits; the others must join it, not queue up.
        await conn.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        lookups = [asyncio.create_task(lookup(proxy)) for _ in range(20)]
        # Every miss counted means every one is waiting on the shared query (or queued).
        while proxy.metric("session_lens_lookups_total", route=ROUTE, outcome="not_found") < 20:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    answers = await asyncio.gather(*lookups)
    assert {headers["X-Session-Not-Found-Reason"] for _, headers, _ in answers} == {"never_existed"}
    assert proxy.metric("session_lens_classification_queries_total") == 1


async def test_database_unreachable_means_unknown_on_time(
    missing: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(
        missing.url,
        database_url="postgresql://nobody@127.0.0.1:1/none",
        breaker=Breaker(2, 60),
        disclose="lifecycle",
    )
    for _ in range(4):
        started = time.perf_counter()
        status, headers, body = await lookup(proxy)
        assert time.perf_counter() - started < 1.0
        assert (status, headers["X-Session-Not-Found-Reason"]) == (404, "unknown")
        assert body["reason"] == "unknown" and body["lifecycle"] is None
    assert proxy.metric("session_lens_classifier_errors_total", kind="unavailable") == 2
    assert proxy.metric("session_lens_classifier_errors_total", kind="breaker_open") == 2
    assert proxy.metric("session_lens_classifier_breaker_open") == 1
    assert proxy.metric("session_lens_classification_queries_total") == 2


async def test_database_stopped_mid_run_and_back(
    missing: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    import os

    if os.environ.get("SESSION_LENS_TEST_DATABASE_URL"):
        pytest.skip("needs a PostgreSQL of its own to stop and start")
    server = start_embedded(tmp_path, delete_on_exit=True)
    url = server.url
    setup = await asyncpg.connect(url)
    await migrate(setup, Tables())
    await setup.execute("INSERT INTO sessions (id, state) VALUES ($1, 'ARCHIVED')", SID)
    await setup.close()
    proxy = await make_proxy(
        missing.url, database_url=url, breaker=Breaker(failures=2, cooldown=0.3)
    )
    assert (await lookup(proxy))[1]["X-Session-Not-Found-Reason"] == "archived"

    await asyncio.to_thread(server.stop)
    for _ in range(5):
        started = time.perf_counter()
        status, headers, _ = await lookup(proxy)
        assert time.perf_counter() - started < 1.0  # the budget holds, the answer goes out
        assert (status, headers["X-Session-Not-Found-Reason"]) == (404, "unknown")
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/other") as response:
        assert response.status == 404  # forwarding never stopped

    await asyncio.to_thread(server.start)
    deadline = time.monotonic() + 10
    while (await lookup(proxy))[1]["X-Session-Not-Found-Reason"] != "archived":
        assert time.monotonic() < deadline, "classification did not recover"
        await asyncio.sleep(0.1)
    assert proxy.metric("session_lens_classifier_breaker_open") == 0


async def test_classification_query_uses_indexes_only(conn: asyncpg.Connection) -> None:
    from session_lens.evidence.tables import Queries

    await conn.execute(
        "INSERT INTO sessions (id) SELECT 'exec_20250101_000000_' || lpad(to_hex(g), 8, '0')"
        " FROM generate_series(1, 20000) AS g"
    )
    await conn.execute("ANALYZE sessions; ANALYZE session_audit")
    plan = await conn.fetchval(
        "EXPLAIN (FORMAT JSON) " + Queries(Tables()).evidence.replace("$1::text", f"'{SID}'")
    )
    nodes: list[tuple[str, str | None]] = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append((node["Node Type"], node.get("Relation Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(json.loads(plan)[0]["Plan"])
    # The horizon's one-row table may be read whole; the big ones never.
    assert {("Seq Scan", "sessions"), ("Seq Scan", "session_audit")}.isdisjoint(nodes)
    assert {"Index Scan", "Index Only Scan"} & {kind for kind, _ in nodes}


async def test_legacy_timestamps_without_zone(
    missing: Upstream, make_proxy: MakeProxy, empty_db: str
) -> None:
    conn = await asyncpg.connect(empty_db)
    await conn.execute(
        "CREATE TABLE sessions (id text PRIMARY KEY, created_at timestamp DEFAULT now(),"
        " updated_at timestamp)"
    )
    await migrate(conn, Tables())
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'ACTIVE')", SID)
    await conn.close()
    proxy = await make_proxy(missing.url, database_url=empty_db)
    status, headers, _ = await lookup(proxy)
    assert status == 404
    assert headers["X-Session-Not-Found-Reason"] == "not_yet_visible"


@pytest.mark.parametrize(
    ("convention", "reason"), [("first", "deleted"), ("last", "deleted_not_served")]
)
async def test_a_repeated_include_deleted_is_read_as_the_upstream_reads_it(
    missing: Upstream,
    make_proxy: MakeProxy,
    conn: asyncpg.Connection,
    db: str,
    caplog: pytest.LogCaptureFixture,
    convention: str,
    reason: str,
) -> None:
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'DELETED')", SID)
    proxy = await make_proxy(missing.url, database_url=db, repeated_parameter=convention)
    with caplog.at_level(logging.INFO, logger="session_lens"):
        _, headers, _ = await lookup(proxy, "?include_deleted=false&include_deleted=true")
        assert headers["X-Session-Not-Found-Reason"] == reason
        [record] = [r for r in caplog.records if r.getMessage() == "session not found"]
        assert "disagree" in record.note and convention in record.note  # type: ignore[attr-defined]
        caplog.clear()
        _, headers, _ = await lookup(proxy, "?include_deleted=true&include_deleted=1")
        assert headers["X-Session-Not-Found-Reason"] == "deleted_not_served"
        [record] = [r for r in caplog.records if r.getMessage() == "session not found"]
        assert record.note is None  # type: ignore[attr-defined]  # they agree: nothing to say


async def deleted(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO sessions (id, state) VALUES ($1, 'STOPPED')", SID)
    await conn.execute("UPDATE sessions SET state = 'DELETED' WHERE id = $1", SID)


async def test_a_client_learns_the_reason_and_only_the_reason_by_default(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    await deleted(conn)
    for body_mode in ("merge", "problem"):
        proxy = await make_proxy(missing.url, database_url=db, not_found_body=body_mode)
        _, headers, body = await lookup(proxy)
        assert headers["X-Session-Not-Found-Reason"] == "deleted"
        assert body["reason"] == "deleted" and body["session_id"] == SID
        assert "lifecycle" not in body and "DELETED" not in json.dumps(body), body
    told = await make_proxy(missing.url, database_url=db, disclose="lifecycle")
    _, _, body = await lookup(told)
    assert body["lifecycle"]["state"] == "DELETED" and body["lifecycle"]["deleted_at"]


async def test_disclosing_nothing_leaves_the_upstreams_answer_and_keeps_the_rest(
    missing: Upstream,
    make_proxy: MakeProxy,
    conn: asyncpg.Connection,
    db: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await deleted(conn)
    for body_mode in ("merge", "problem", "passthrough"):
        proxy = await make_proxy(
            missing.url, database_url=db, disclose="nothing", not_found_body=body_mode
        )
        with caplog.at_level(logging.INFO, logger="session_lens"):
            status, headers, body = await lookup(proxy)
        assert status == 404 and "X-Session-Not-Found-Reason" not in headers
        assert body == {"error": "session_not_found"}
        assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason="deleted") == 1
        [record] = [r for r in caplog.records if r.getMessage() == "session not found"]
        assert record.reason == "deleted"  # type: ignore[attr-defined]
        caplog.clear()


def _head_fields(response: RawResponse) -> dict[str, str]:
    """An answer's fields, but those that differ from one answer to the next."""
    return {k.lower(): v for k, v in response.headers if k.lower() not in ("date",)}


@pytest.mark.parametrize("disclose", ["reason", "lifecycle", "nothing"])
@pytest.mark.parametrize("body_mode", ["merge", "problem", "passthrough"])
async def test_head_on_a_miss_has_the_head_get_has(
    missing: Upstream,
    make_proxy: MakeProxy,
    conn: asyncpg.Connection,
    db: str,
    disclose: str,
    body_mode: str,
) -> None:
    await deleted(conn)
    proxy = await make_proxy(
        missing.url, database_url=db, disclose=disclose, not_found_body=body_mode
    )
    answers = {}
    for method in ("GET", "HEAD"):
        request = (
            f"{method} /api/sessions/{SID} HTTP/1.1\r\nHost: h\r\nX-Request-ID: r-1\r\n"
            "Connection: close\r\n\r\n"
        )
        answers[method] = await raw_exchange(proxy.port, request.encode())
    get, head = answers["GET"], answers["HEAD"]
    assert head.body == b""
    assert int(get.header("Content-Length")[0]) == len(get.body)
    assert _head_fields(head) == _head_fields(get)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than Python's stack
        b'{"a": NaN}',
        b'{"b": 1e999}',
        b'{"a": 1, "a": 2}',
    ],
    ids=["nested", "nan", "huge", "repeated"],
)
async def test_a_body_that_would_not_survive_a_merge_is_relayed_as_it_is(
    upstream: Upstream, make_proxy: MakeProxy, db: str, body: bytes
) -> None:
    async def odd(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, body=body, content_type="application/json")

    upstream.respond = odd
    proxy = await make_proxy(upstream.url, database_url=db)
    request = f"GET /api/sessions/{SID} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    answer = await asyncio.wait_for(raw_exchange(proxy.port, request.encode()), 5)
    assert answer.status == 404
    assert answer.header("X-Session-Not-Found-Reason") == ["never_existed"]
    assert answer.content == body
    assert proxy.metric("session_lens_inflight_requests") == 0


async def test_each_unknown_is_counted_once_under_its_cause(
    missing: Upstream, make_proxy: MakeProxy, conn: asyncpg.Connection, db: str
) -> None:
    """A query past the budget used to count twice: the miss's wait and the query's own."""
    proxy = await make_proxy(missing.url, database_url=db, classification_budget="100ms")
    async with conn.transaction():
        await conn.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        answers = await asyncio.gather(*(lookup(proxy) for _ in range(5)))
        await asyncio.sleep(0.3)  # the shared query has given up too by now
    assert {headers["X-Session-Not-Found-Reason"] for _, headers, _ in answers} == {"unknown"}
    assert proxy.metric("session_lens_classifier_errors_total", kind="timeout") == 5
    assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason="unknown") == 5
