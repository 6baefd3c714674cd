"""The admin listener: /metrics, /healthz, /readyz."""

from typing import Any

from prometheus_client import CollectorRegistry

from session_lens.app import create_admin_app
from session_lens.config import load_config
from session_lens.explain import Explainer
from session_lens.metrics import Metrics

from .conftest import Upstream, free_port, raw_exchange


async def admin_client(aiohttp_client: Any, upstream_url: str) -> Any:
    config = load_config(flags={"upstream": upstream_url, "upstream_connect_timeout": "1s"})
    registry = CollectorRegistry()
    metrics = Metrics(registry, config.session_routes)
    explainer = Explainer(config, metrics, None)
    return await aiohttp_client(create_admin_app(config, registry, explainer))


async def test_metrics_are_exposed(aiohttp_client: Any, upstream: Upstream) -> None:
    client = await admin_client(aiohttp_client, upstream.url)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    text = await response.text()
    series = (
        'session_lens_not_found_total{reason="never_existed",route="/api/sessions/{session_id}"}'
    )
    assert f"{series} 0.0" in text
    assert "session_lens_inflight_requests 0.0" in text


async def test_healthz(aiohttp_client: Any) -> None:
    client = await admin_client(aiohttp_client, f"http://127.0.0.1:{free_port()}")
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_follows_the_upstream(aiohttp_client: Any, upstream: Upstream) -> None:
    client = await admin_client(aiohttp_client, upstream.url)
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "degraded",
        "checks": {"upstream": "ok", "database": "down: no database configured"},
        "tracking_horizon": None,
    }

    port = free_port()
    down = await admin_client(aiohttp_client, f"http://127.0.0.1:{port}")
    response = await down.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["upstream"].startswith(f"down: 127.0.0.1:{port}: ")


async def test_proxy_routes_are_not_on_the_admin_listener(
    aiohttp_client: Any, upstream: Upstream
) -> None:
    client = await admin_client(aiohttp_client, upstream.url)
    response = await client.get("/api/sessions/exec_20251230_020944_4ad060d9")
    assert response.status == 404
    assert upstream.seen == []


async def test_explain_endpoint_and_database_readiness(
    aiohttp_client: Any, upstream: Upstream, db: str
) -> None:
    import asyncpg

    conn = await asyncpg.connect(db)
    await conn.execute(
        "INSERT INTO sessions (id, state) VALUES ('exec_20251230_020944_4ad060d9', 'STOPPED')"
    )
    await conn.execute("UPDATE sessions SET state = 'DELETED'")
    await conn.close()
    config = load_config(flags={"upstream": upstream.url, "database_url": db})
    registry = CollectorRegistry()
    metrics = Metrics(registry, config.session_routes)
    explainer = Explainer(config, metrics, db)
    await explainer.open()
    try:
        client = await aiohttp_client(create_admin_app(config, registry, explainer))
        response = await client.get("/sessions/exec_20251230_020944_4ad060d9/explain")
        assert response.status == 200
        report = await response.json()
        assert report["state"] == "DELETED"
        assert report["reason"] == "deleted"
        assert report["reason_with_include_deleted"] == "deleted_not_served"
        assert report["minted_at"] == "2025-12-30T02:09:44+00:00"
        assert report["tracking_horizon"] == "2025-01-01T00:00:00+00:00"
        assert report["store_retention"] is None
        assert [(e["from"], e["to"]) for e in report["timeline"]] == [
            (None, "STOPPED"),
            ("STOPPED", "DELETED"),
        ]
        response = await client.get("/sessions/nope/explain")
        assert response.status == 400
        assert (await response.json())["rule"] == "pattern"
        response = await client.get("/readyz")
        assert await response.json() == {
            "status": "ready",
            "checks": {"upstream": "ok", "database": "ok"},
            "tracking_horizon": "2025-01-01T00:00:00+00:00",
        }
        scraped = (await (await client.get("/metrics")).read()).decode()
        assert "session_lens_tracking_horizon_timestamp_seconds 1.7356896e+09" in scraped
    finally:
        await explainer.close()


async def test_admin_token_guards_all_but_the_probes(
    aiohttp_client: Any, upstream: Upstream
) -> None:
    token = "t0ken-for-the-admin-listener"
    config = load_config(flags={"upstream": upstream.url, "admin_token": token})
    registry = CollectorRegistry()
    explainer = Explainer(config, Metrics(registry, config.session_routes), None)
    client = await aiohttp_client(create_admin_app(config, registry, explainer))
    for path in ("/metrics", "/sessions/exec_20251230_020944_4ad060d9/explain"):
        response = await client.get(path)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
    allowed = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert allowed.status == 200
    # The scheme's name is case-insensitive (RFC 9110 §11.1), one or more spaces follow it.
    for said in (f"bearer {token}", f"BEARER {token}", f"Bearer  {token}"):
        response = await client.get("/metrics", headers={"Authorization": said})
        assert response.status == 200, said
    for said in (f"Bearer {token}x", f"Bearer{token}", token, f"Token {token}"):
        response = await client.get("/metrics", headers={"Authorization": said})
        assert response.status == 401, said
    for probe in ("/healthz", "/readyz"):
        assert (await client.get(probe)).status in (200, 503)


async def test_credentials_that_are_not_utf8_get_401_not_a_traceback(
    aiohttp_server: Any, upstream: Upstream, caplog: Any
) -> None:
    config = load_config(flags={"upstream": upstream.url, "admin_token": "t0ken-for-the-admin"})
    registry = CollectorRegistry()
    explainer = Explainer(config, Metrics(registry, config.session_routes), None)
    server = await aiohttp_server(create_admin_app(config, registry, explainer))
    for credentials in (b"Bearer \xff\xfe", b"Basic \xff", b"\xc3\x28"):
        response = await raw_exchange(
            server.port,
            b"GET /sessions/exec_20251230_020944_4ad060d9/explain HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: " + credentials + b"\r\nConnection: close\r\n\r\n",
        )
        assert response.status == 401, credentials
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
