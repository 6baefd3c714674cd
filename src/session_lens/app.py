"""Wiring: the proxy app and the admin app, their lifecycles and routes."""

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import Config
from .metrics import Metrics
from .proxy import Proxy

PROXY = web.AppKey("proxy", Proxy)
CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", CollectorRegistry)

# aiohttp's defaults are 8190 bytes for a header line; session services behind
# gateways see larger cookies and tokens than that.
MAX_HEADER_BYTES = 65536


def create_proxy_app(config: Config, metrics: Metrics) -> web.Application:
    """The app on the proxy listener: one catch-all route, everything forwarded."""
    app = web.Application(
        handler_args={"max_field_size": MAX_HEADER_BYTES, "max_line_size": MAX_HEADER_BYTES}
    )
    proxy = Proxy(config, metrics)
    app[PROXY] = proxy
    app[CONFIG] = config

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        await proxy.open()
        yield
        await proxy.close()

    app.cleanup_ctx.append(upstream_client)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def create_admin_app(config: Config, registry: CollectorRegistry) -> web.Application:
    """The app on the admin listener: /metrics, /healthz, /readyz."""
    app = web.Application()
    app[CONFIG] = config
    app[REGISTRY] = registry
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
