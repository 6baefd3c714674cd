"""Exemplars: the IDs behind a miss, in OpenMetrics, for a scraper that asks for it."""

from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from session_lens.app import create_admin_app
from session_lens.config import load_config
from session_lens.explain import Explainer
from session_lens.metrics import Metrics

from .conftest import MakeProxy, ProxyUnderTest, Upstream, not_found, raw_exchange

SID = "exec_20251230_020944_4ad060d9"
ROUTE = "/api/sessions/{session_id}"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


async def scrape(aiohttp_client: Any, proxy: ProxyUnderTest, accept: str) -> tuple[str, str]:
    """/metrics of the proxy's registry, through a real admin listener."""
    config = load_config(flags={"upstream": "http://127.0.0.1:1"})
    explainer = Explainer(config, Metrics(CollectorRegistry(), ()), None)
    client = await aiohttp_client(create_admin_app(config, proxy.registry, explainer))
    response = await client.get("/metrics", headers={"Accept": accept})
    assert response.status == 200
    return response.headers["Content-Type"], await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], Sample]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exemplar_of(text: str, name: str, **labels: str) -> dict[str, str] | None:
    sample = samples(text)[name, tuple(sorted(labels.items()))]
    return None if sample.exemplar is None else dict(sample.exemplar.labels)


async def get(proxy: ProxyUnderTest, path: str, request_id: str | None = None) -> int:
    headers = {"X-Request-ID": request_id} if request_id is not None else {}
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}{path}", headers=headers) as response,
    ):
        await response.read()
        return response.status


async def test_a_miss_leaves_its_ids_in_openmetrics_exemplars(
    aiohttp_client: Any, upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    upstream.respond = not_found
    proxy = await make_proxy(upstream.url, database_url=db)
    assert await get(proxy, f"/api/sessions/{SID}", "req-1") == 404
    assert await get(proxy, "/api/sessions/exec_2025", "req-2") == 404

    content_type, text = await scrape(aiohttp_client, proxy, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert exemplar_of(
        text, "session_lens_not_found_total", route=ROUTE, reason="never_existed"
    ) == {"session_id": SID, "request_id": "req-1"}
    assert exemplar_of(
        text, "session_lens_not_found_total", route=ROUTE, reason="invalid_format"
    ) == {"session_id": "exec_2025", "request_id": "req-2"}
    assert exemplar_of(text, "session_lens_invalid_ids_total", route=ROUTE, rule="pattern") == {
        "session_id": "exec_2025",
        "request_id": "req-2",
    }
    classified = [
        dict(sample.exemplar.labels)
        for (name, _), sample in samples(text).items()
        if name == "session_lens_classification_duration_seconds_bucket" and sample.exemplar
    ]
    assert classified == [{"session_id": SID, "request_id": "req-1"}]
    # Series without a request behind them carry none.
    assert exemplar_of(text, "session_lens_not_found_total", route=ROUTE, reason="purged") is None

    # The classic text format has no exemplars: a scraper that does not ask sees none.
    content_type, plain = await scrape(aiohttp_client, proxy, "text/plain")
    assert content_type.startswith("text/plain; version=0.0.4")
    assert SID not in plain and "req-1" not in plain


async def answered_id(proxy: ProxyUnderTest, path: str, request_id: str) -> str:
    """The request ID the answer carries back: a new one where the client's was replaced."""
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}{path}", headers={"X-Request-ID": request_id}) as response,
    ):
        await response.read()
        return response.headers.get("X-Request-ID", request_id)


async def test_exemplar_labels_stay_within_128_characters(
    aiohttp_client: Any, upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    upstream.respond = not_found
    proxy = await make_proxy(upstream.url, database_url=db)
    longest_request_id = "r" * 128
    too_long_id = "exec_" + "1" * 200
    assert await get(proxy, f"/api/sessions/{SID}", longest_request_id) == 404
    assert await get(proxy, f"/api/sessions/{too_long_id}", "req-3") == 404
    # A request ID that is not plain ASCII is replaced, as a missing one is.
    replaced = await answered_id(proxy, "/api/sessions/exec_%C3%A9t%C3%A9", "req-\u00e9")
    assert replaced != "req-\u00e9" and len(replaced) == 32

    _, text = await scrape(aiohttp_client, proxy, OPENMETRICS)
    miss = exemplar_of(text, "session_lens_not_found_total", route=ROUTE, reason="never_existed")
    assert miss is not None
    assert miss["session_id"] == SID
    assert miss["request_id"] == "r" * (128 - len("session_id") - len(SID) - len("request_id"))
    assert sum(len(k) + len(v) for k, v in miss.items()) == 128
    # Too long to be useful: the ID is left out, the request ID stays.
    assert exemplar_of(text, "session_lens_invalid_ids_total", route=ROUTE, rule="too_long") == {
        "request_id": "req-3"
    }
    # The ID as the path carries it (percent-encoded).
    assert exemplar_of(text, "session_lens_invalid_ids_total", route=ROUTE, rule="pattern") == {
        "session_id": "exec_%C3%A9t%C3%A9",
        "request_id": replaced,
    }
    assert proxy.metric("session_lens_invalid_ids_total", route=ROUTE, rule="pattern") == 1


async def test_a_request_id_outside_the_safe_set_is_replaced_everywhere(
    aiohttp_client: Any, upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    upstream.respond = not_found
    proxy = await make_proxy(upstream.url, database_url=db)
    hostile = 'q"} 9 # {evil="y\\'
    for sent in (hostile, "r" * 129, "two words", "tab\there"):
        upstream.seen.clear()
        replaced = await answered_id(proxy, f"/api/sessions/{SID}", sent)
        assert replaced != sent and len(replaced) == 32, sent
        [seen] = upstream.seen
        assert seen.header("X-Request-ID") == [replaced], sent  # sent upstream, as generated
    kept = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    assert await answered_id(proxy, f"/api/sessions/{SID}", kept) == kept
    assert upstream.seen[-1].header("X-Request-ID") == [kept]
    _, text = await scrape(aiohttp_client, proxy, OPENMETRICS)
    assert "evil" not in text
    # prometheus-client's own OpenMetrics parser reads every exemplar.
    miss = exemplar_of(text, "session_lens_not_found_total", route=ROUTE, reason="never_existed")
    assert miss is not None and miss["session_id"] == SID


async def test_exemplars_can_be_turned_off(
    aiohttp_client: Any, upstream: Upstream, make_proxy: MakeProxy, db: str
) -> None:
    upstream.respond = not_found
    proxy = await make_proxy(upstream.url, database_url=db, exemplars="false")
    assert await get(proxy, f"/api/sessions/{SID}", "req-1") == 404
    assert await get(proxy, "/api/sessions/exec_2025", "req-2") == 404
    _, text = await scrape(aiohttp_client, proxy, OPENMETRICS)
    assert " # {" not in text
    assert SID not in text and "req-1" not in text
    assert proxy.metric("session_lens_not_found_total", route=ROUTE, reason="never_existed") == 1


def test_the_setting_reads_like_every_other() -> None:
    assert load_config(flags={"upstream": "http://u"}).exemplars is True
    environ = {"SESSION_LENS_EXEMPLARS": "off"}
    assert load_config(flags={"upstream": "http://u"}, environ=environ).exemplars is False
    assert load_config(file={"upstream": "http://u", "exemplars": False}).exemplars is False


async def test_a_repeated_request_id_is_replaced_as_one(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream.url)
    for first, second in (("good-a", "bad id"), ("good-a", "good-b"), ("bad id", "good-b")):
        upstream.seen.clear()
        request = (
            f"GET /api/sessions/{SID} HTTP/1.1\r\nHost: h\r\nX-Request-ID: {first}\r\n"
            f"X-Request-ID: {second}\r\nConnection: close\r\n\r\n"
        )
        answer = await raw_exchange(proxy.port, request.encode())
        [replaced] = answer.header("X-Request-ID")
        assert replaced not in (first, second) and len(replaced) == 32
        [seen] = upstream.seen
        assert seen.header("X-Request-ID") == [replaced], (first, second)
