"""Session lookups: fail-fast validation, outcomes, and what the metrics say of them."""

import logging

import aiohttp
import pytest
from aiohttp import web

from session_lens.reasons import Reason

from .conftest import VALID_ID, MakeProxy, ProxyUnderTest, Upstream, raw_exchange

API = "/api/sessions/{session_id}"
SHORT = "/sessions/{session_id}"


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as client, client.request(method, url) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/api/sessions/", "missing"),
        ("/api/sessions/" + "a" * 65, "too_long"),
        ("/api/sessions/exec_20251230_020944_4AD060D9", "pattern"),
        ("/api/sessions/exec_20251230_020944_4ad060d9%00", "pattern"),
        ("/api/sessions/exec_20251330_020944_4ad060d9/events", "calendar"),
        ("/api/sessions/exec_20990101_000000_4ad060d9?include_deleted=true", "future"),
    ],
)
async def test_malformed_ids_are_answered_here(
    upstream: Upstream, proxy: ProxyUnderTest, path: str, rule: str
) -> None:
    status, headers, body = await get(proxy.url + path)
    assert status == 404
    assert headers["X-Session-Not-Found-Reason"] == "invalid_format"
    assert headers["Content-Type"] == "application/problem+json"
    problem = __import__("json").loads(body)
    assert problem["status"] == 404
    assert problem["reason"] == "invalid_format"
    assert problem["rule"] == rule
    assert problem["request_id"] == headers["X-Request-ID"]
    assert problem["detail"]
    assert upstream.seen == []
    assert proxy.metric("session_lens_invalid_ids_total", route=API, rule=rule) == 1
    assert proxy.metric("session_lens_lookups_total", route=API, outcome="invalid") == 1
    assert proxy.metric("session_lens_not_found_total", route=API, reason="invalid_format") == 1
    assert proxy.metric("session_lens_requests_total", kind="lookup", code="4xx") == 1
    # Answered here: timed apart from the lookups the upstream answered.
    here = {"kind": "lookup", "answered_by": "session_lens"}
    assert proxy.metric("session_lens_request_duration_seconds_count", **here) == 1
    assert proxy.metric("session_lens_upstream_duration_seconds_count", kind="lookup") == 0


async def test_echoed_id_is_truncated_and_escaped(
    upstream: Upstream, proxy: ProxyUnderTest
) -> None:
    async with aiohttp.ClientSession() as client:
        hostile = "%22%3Cscript%3E" + "b" * 40
        async with client.get(f"{proxy.url}/sessions/{hostile}") as response:
            problem = await response.json(content_type="application/problem+json")
        async with client.get(f"{proxy.url}/sessions/{'c' * 500}") as response:
            long_problem = await response.json(content_type="application/problem+json")
    assert problem["session_id"] == hostile  # raw, as sent: never decoded into markup
    assert long_problem["rule"] == "too_long"
    assert long_problem["session_id"] == "c" * 64 + "…"


@pytest.mark.parametrize("status", [400, 422])
async def test_invalid_status_is_configurable(
    upstream: Upstream, make_proxy: MakeProxy, status: int
) -> None:
    proxy = await make_proxy(upstream.url, invalid_status=str(status))
    code, headers, _ = await get(f"{proxy.url}/sessions/nope")
    assert code == status
    assert headers["X-Session-Not-Found-Reason"] == "invalid_format"


async def test_observe_mode_forwards_and_counts(
    upstream: Upstream, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(upstream.url, validation="observe")
    with caplog.at_level(logging.INFO, logger="session_lens"):
        status, headers, _ = await get(f"{proxy.url}/sessions/nope")
    assert status == 200
    assert "X-Session-Not-Found-Reason" not in headers
    assert [seen.raw_path for seen in upstream.seen] == ["/sessions/nope"]
    assert proxy.metric("session_lens_invalid_ids_total", route=SHORT, rule="pattern") == 1
    assert proxy.metric("session_lens_lookups_total", route=SHORT, outcome="invalid") == 1
    [record] = [r for r in caplog.records if r.getMessage() == "invalid session id"]
    assert record.rule == "pattern"  # type: ignore[attr-defined]
    assert record.enforced is False  # type: ignore[attr-defined]


async def test_observe_mode_explains_a_malformed_ids_miss_as_invalid_format_counted_once(
    missing: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(missing.url, validation="observe")
    status, headers, body = await get(f"{proxy.url}/sessions/exec_2025")
    assert status == 404
    assert headers["X-Session-Not-Found-Reason"] == "invalid_format"
    assert __import__("json").loads(body)["reason"] == "invalid_format"
    assert len(missing.seen) == 1
    for outcome in ("invalid", "not_found", "found", "other", "upstream_error"):
        expected = 1 if outcome == "invalid" else 0
        assert proxy.metric("session_lens_lookups_total", route=SHORT, outcome=outcome) == expected
    for reason in Reason:
        expected = 1 if reason is Reason.INVALID_FORMAT else 0
        count = proxy.metric("session_lens_not_found_total", route=SHORT, reason=reason.value)
        assert count == expected, reason


async def test_only_get_and_head_are_lookups(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, _, _ = await get(f"{proxy.url}/api/sessions/not-an-id", method)
        assert status == 200
    assert len(upstream.seen) == 4
    status, _, _ = await get(f"{proxy.url}/api/sessions/not-an-id", "HEAD")
    assert status == 404
    assert len(upstream.seen) == 4
    assert proxy.metric("session_lens_requests_total", kind="passthrough", code="2xx") == 4
    assert proxy.metric("session_lens_requests_total", kind="lookup", code="4xx") == 1


async def test_found_miss_and_error_outcomes(
    upstream: Upstream, proxy: ProxyUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    answers = {"found": 200, "missing": 404, "broken": 503, "moved": 301}

    async def by_query(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "x"}, status=answers[request.query["case"]])

    upstream.respond = by_query
    with caplog.at_level(logging.INFO, logger="session_lens"):
        for case in answers:
            status, _, _ = await get(f"{proxy.url}/api/sessions/{VALID_ID}?case={case}")
            assert status == answers[case]
    lookups = {
        outcome: proxy.metric("session_lens_lookups_total", route=API, outcome=outcome)
        for outcome in ("found", "not_found", "upstream_error", "other", "invalid")
    }
    assert lookups == {"found": 1, "not_found": 1, "upstream_error": 1, "other": 1, "invalid": 0}
    assert proxy.metric("session_lens_not_found_total", route=API, reason="unknown") == 1
    [miss] = [r for r in caplog.records if r.getMessage() == "session not found"]
    assert miss.session_id == VALID_ID  # type: ignore[attr-defined]
    assert miss.reason == "unknown"  # type: ignore[attr-defined]
    assert miss.route == API  # type: ignore[attr-defined]
    assert miss.upstream_ms >= 0  # type: ignore[attr-defined]
    assert miss.duration_ms >= miss.upstream_ms  # type: ignore[attr-defined]
    relayed = {"kind": "lookup", "answered_by": "upstream"}
    assert proxy.metric("session_lens_request_duration_seconds_count", **relayed) == 4
    assert proxy.metric("session_lens_upstream_duration_seconds_count", kind="lookup") == 4
    assert proxy.metric("session_lens_inflight_requests") == 0


async def test_every_reason_exists_at_zero_from_start(proxy: ProxyUnderTest) -> None:
    for route in (API, SHORT):
        for reason in Reason:
            sample = proxy.registry.get_sample_value(
                "session_lens_not_found_total", {"route": route, "reason": reason.value}
            )
            assert sample == 0.0
    assert (
        proxy.registry.get_sample_value(
            "session_lens_build_info", {"version": __import__("session_lens").__version__}
        )
        == 1
    )


async def test_no_label_holds_request_data(upstream: Upstream, proxy: ProxyUnderTest) -> None:
    await get(f"{proxy.url}/api/sessions/{VALID_ID}")
    await get(f"{proxy.url}/api/sessions/bad-id-value")
    await get(f"{proxy.url}/some/raw/path")
    for family in proxy.registry.collect():
        for sample in family.samples:
            for value in sample.labels.values():
                assert VALID_ID not in value
                assert "bad-id-value" not in value
                assert "/some/raw/path" not in value


async def raw_get(proxy: ProxyUnderTest, target: str) -> tuple[int, dict[str, str], bytes]:
    """A GET with its target as written: HTTP clients normalise the paths these tests need."""
    request = f"GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    response = await raw_exchange(proxy.port, request.encode())
    return response.status, dict(response.headers), response.content


@pytest.mark.parametrize(
    "spelling",
    [
        "//api/sessions/{id}",
        "/api//sessions/{id}",
        "/api/./sessions/{id}",
        "/api/x/../sessions/{id}",
        "/api/sessions/x/../{id}",
        "/api/%73essions/{id}",
    ],
)
async def test_a_lookup_in_another_spelling_is_validated_and_forwarded_as_sent(
    missing: Upstream, make_proxy: MakeProxy, db: str, spelling: str
) -> None:
    proxy = await make_proxy(missing.url, database_url=db)
    status, headers, _ = await raw_get(proxy, spelling.format(id="exec_2025"))
    assert status == 404 and headers["X-Session-Not-Found-Reason"] == "invalid_format"
    assert missing.seen == []
    sent = spelling.format(id=VALID_ID)
    status, headers, _ = await raw_get(proxy, sent)
    assert status == 404 and headers["X-Session-Not-Found-Reason"] == "never_existed"
    assert [seen.raw_path for seen in missing.seen] == [sent]  # byte for byte
    assert proxy.metric("session_lens_lookups_total", route=API, outcome="invalid") == 1
    assert proxy.metric("session_lens_not_found_total", route=API, reason="never_existed") == 1


async def test_a_percent_encoded_valid_id_is_valid(
    missing: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    proxy = await make_proxy(missing.url, database_url=db)
    sent = "/api/sessions/exec%5F20251230%5f020944%5F4ad060d9"
    status, headers, body = await raw_get(proxy, sent)
    assert status == 404 and headers["X-Session-Not-Found-Reason"] == "never_existed"
    assert __import__("json").loads(body)["session_id"] == VALID_ID
    assert [seen.raw_path for seen in missing.seen] == [sent]


async def test_empty_segments_are_kept_when_merge_slashes_is_off(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url, merge_slashes="false")
    status, _, _ = await raw_get(proxy, "//api/sessions/exec_2025")
    assert status == 200  # not a session route: forwarded unvalidated
    assert [seen.raw_path for seen in upstream.seen] == ["//api/sessions/exec_2025"]
    status, _, _ = await raw_get(proxy, "/api/./sessions/exec_2025")
    assert status == 404  # dot segments are removed all the same
