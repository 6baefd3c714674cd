"""Wiring: the proxy app and the admin app, their lifecycles and routes."""

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import Config
from .explain import Explainer, report_json
from .fastlane import Lane
from .ids import IdValidator
from .logs import quiet_malformed_requests
from .metrics import Metrics
from .proxy import MAX_HEADER_BYTES, Proxy
from .recorder import Recorder
from .store import StoreError

PROXY = web.AppKey("proxy", Proxy)
LANE: web.AppKey[Lane | None] = web.AppKey("lane")
CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", CollectorRegistry)
DRAINING = web.AppKey("draining", asyncio.Event)
EXPLAINER = web.AppKey("explainer", Explainer)
RECORDER_HEALTH: web.AppKey[Callable[[], str | None]] = web.AppKey("recorder_health")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_proxy_app(
    config: Config,
    metrics: Metrics,
    explainer: Explainer | None = None,
    recorder: Recorder | None = None,
) -> web.Application:
    """The app on the proxy listener: no routes, every request goes to the proxy.

    It opens and closes the explainer's pool; without an explainer, misses are
    explained from `config.database_url` (none: every miss is `unknown`).
    """
    quiet_malformed_requests()
    explainer = explainer or Explainer(config, metrics, config.database_url)
    if recorder is None and config.lifecycle_source == "observed":
        recorder = Recorder(config, metrics, config.database_url)
    proxy = Proxy(config, metrics, explainer, recorder)

    # A middleware rather than a catch-all route: it also sees targets no route
    # template can match (`OPTIONS *`), and skips the router's work.
    @web.middleware
    async def forward_all(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await proxy.handle(request)

    app = web.Application(
        middlewares=[forward_all],
        handler_args={
            "max_field_size": MAX_HEADER_BYTES,
            "max_line_size": MAX_HEADER_BYTES,
            # The upstream gets the client's bytes: a gzip body stays gzip.
            "auto_decompress": False,
        },
    )
    app[PROXY] = proxy
    lane = app[LANE] = Lane(proxy, config) if Lane.serves(config) else None
    app[CONFIG] = config
    app[EXPLAINER] = explainer

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        await explainer.open()
        if recorder is not None:
            await recorder.start()
        await proxy.open()
        yield
        if lane is not None:
            lane.close()
        await proxy.close()
        if recorder is not None:
            await recorder.stop()
        await explainer.close()

    async def drain(app: web.Application) -> None:
        if lane is not None:
            lane.drain()
        await proxy.drain(config.shutdown_grace.total_seconds())

    app.cleanup_ctx.append(upstream_client)
    app.on_shutdown.append(drain)
    return app


def create_admin_app(
    config: Config,
    registry: CollectorRegistry,
    explainer: Explainer,
    draining: asyncio.Event | None = None,
    recorder: Recorder | None = None,
) -> web.Application:
    """The app on the admin listener: /metrics, /healthz, /readyz, /sessions/{id}/explain."""
    app = web.Application(middlewares=[_bearer(config.admin_token)] if config.admin_token else [])
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[EXPLAINER] = explainer
    app[DRAINING] = draining or asyncio.Event()
    app[RECORDER_HEALTH] = recorder.health if recorder else _no_recorder
    app.router.add_get("/sessions/{session_id}/explain", _explain)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


_NOT_OBSERVING = "not observing"
_OPEN = frozenset({"/healthz", "/readyz"})
"""Probes stay open: a kubelet cannot send a secret."""


def _bearer(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "a bearer token is required"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="session-lens admin"'},
                )
        return await handler(request)

    return check


def _no_recorder() -> str | None:
    return _NOT_OBSERVING


async def _metrics(request: web.Request) -> web.Response:
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(request.app[REGISTRY]), headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining", "checks": {}}, status=503)
    upstream, database = await asyncio.gather(
        upstream_reachable(config), request.app[EXPLAINER].health()
    )
    checks = {
        "upstream": "ok" if upstream is None else f"down: {upstream}",
        "database": "ok" if database is None else f"down: {database}",
    }
    recorder = request.app[RECORDER_HEALTH]()
    if recorder is not _NOT_OBSERVING:
        checks["recorder"] = "ok" if recorder is None else recorder
    # Only the upstream decides readiness: without the database, traffic still
    # flows and misses are `unknown`; taking the hop out of service would be worse.
    if upstream is not None:
        status, code = "not ready", 503
    elif all(check == "ok" for check in checks.values()):
        status, code = "ready", 200
    else:
        status, code = "degraded", 200
    horizon = request.app[EXPLAINER].horizon
    body = {
        "status": status,
        "checks": checks,
        "tracking_horizon": None if horizon is None else horizon.isoformat(),
    }
    return web.json_response(body, status=code)


async def _explain(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    config = request.app[CONFIG]
    rule = IdValidator(config.max_future_skew, config.id_timezone).check(session_id)
    if rule is not None:
        return web.json_response(
            {"session_id": session_id[:64], "reason": "invalid_format", "rule": rule.value},
            status=400,
        )
    try:
        report = await request.app[EXPLAINER].report(session_id)
    except StoreError as exc:
        return web.json_response(
            {"error": "database unavailable", "detail": exc.detail}, status=503
        )
    return web.json_response(report_json(report))


async def upstream_reachable(config: Config) -> str | None:
    """None when a TCP connection to the upstream opens in time, else why not."""
    parts = urlsplit(config.upstream)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = config.upstream_connect_timeout.total_seconds()
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"no connection to {host}:{port} within {timeout:g}s"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    writer.close()
    await writer.wait_closed()
    return None
