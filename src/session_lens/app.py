"""Wiring: the proxy app and the admin app, their lifecycles and routes."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import Config
from .metrics import Metrics
from .proxy import MAX_HEADER_BYTES, Proxy

PROXY = web.AppKey("proxy", Proxy)
CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", CollectorRegistry)
DRAINING = web.AppKey("draining", asyncio.Event)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_proxy_app(config: Config, metrics: Metrics) -> web.Application:
    """The app on the proxy listener: no routes, every request goes to the proxy."""
    proxy = Proxy(config, metrics)

    # A middleware rather than a catch-all route: it also sees targets no route
    # template can match (`OPTIONS *`), and skips the router's work.
    @web.middleware
    async def forward_all(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await proxy.handle(request)

    app = web.Application(
        middlewares=[forward_all],
        handler_args={"max_field_size": MAX_HEADER_BYTES, "max_line_size": MAX_HEADER_BYTES},
    )
    app[PROXY] = proxy
    app[CONFIG] = config

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        await proxy.open()
        yield
        await proxy.close()

    async def drain(app: web.Application) -> None:
        await proxy.drain(config.shutdown_grace.total_seconds())

    app.cleanup_ctx.append(upstream_client)
    app.on_shutdown.append(drain)
    return app


def create_admin_app(
    config: Config, registry: CollectorRegistry, draining: asyncio.Event | None = None
) -> web.Application:
    """The app on the admin listener: /metrics, /healthz, /readyz."""
    app = web.Application()
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[DRAINING] = draining or asyncio.Event()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


async def _metrics(request: web.Request) -> web.Response:
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(request.app[REGISTRY]), headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining", "checks": {}}, status=503)
    upstream = await upstream_reachable(config)
    checks = {"upstream": "ok" if upstream is None else f"down: {upstream}"}
    ready = upstream is None
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


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
