"""Wiring: the proxy app and the admin app, their lifecycles and routes."""

import asyncio
import base64
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .admin_site import guard_admin
from .config import Config
from .drain import Drain
from .evidence.replay import ReplayError, given_reason, moment
from .evidence.tables import StoreError
from .explain import Explainer, report_json
from .hop import MAX_HEADER_BYTES, Target
from .lane import Lane
from .logs import quiet_malformed_requests
from .metrics import Metrics
from .page import HTML, SECURITY_POLICY, prefers_html, problem_page, report_page
from .policy import Policy
from .reasons import Reason
from .recorder import Recorder, recorder_for
from .websocket import WebSocketRelay, take_back_added

POLICY = web.AppKey("policy", Policy)
LANE = web.AppKey("lane", Lane)
CONFIG = web.AppKey("config", Config)
TARGET = web.AppKey("target", Target)
REGISTRY = web.AppKey("registry", CollectorRegistry)
DRAIN = web.AppKey("drain", Drain)
EXPLAINER = web.AppKey("explainer", Explainer)
RECORDER_HEALTH: web.AppKey[Callable[[], Awaitable[str | None]]] = web.AppKey("recorder_health")


@dataclass(frozen=True)
class Listening:
    """The worker processes accepting connections on the proxy port."""

    count: int
    of: int
    ready: bool
    """Whether the port is served as it should be for traffic to come."""


WORKERS: web.AppKey[Callable[[], Listening] | None] = web.AppKey("workers")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_proxy_app(
    config: Config,
    metrics: Metrics,
    explainer: Explainer | None = None,
    recorder: Recorder | None = None,
) -> web.Application:
    """The proxy listener's app: the lane (app[LANE]) serves its connections, and
    aiohttp's server only the WebSocket upgrades the lane gives it.

    It opens and closes the explainer's pool; without an explainer, misses are
    explained from `config.database_url` (none: every miss is `unknown`). Without
    a recorder, it has the one `recorder_for` gives (none in database mode).
    """
    quiet_malformed_requests()
    explainer = explainer or Explainer(config, metrics, config.database_url)
    if recorder is None:
        recorder = recorder_for(config, metrics)
    if recorder is not None:  # what it has seen and not stored yet is evidence too
        explainer.in_flight = recorder.in_flight
    policy = Policy(config, metrics, explainer, recorder)
    target = Target.of(config.upstream, config.upstream_ca_file)
    relay = WebSocketRelay(config, policy, target)

    # A middleware rather than a catch-all route: it skips the router's work.
    @web.middleware
    async def upgrade(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await relay.handle(request)

    app = web.Application(
        middlewares=[upgrade],
        handler_args={"max_field_size": MAX_HEADER_BYTES, "max_line_size": MAX_HEADER_BYTES},
    )
    app[POLICY] = policy
    lane = app[LANE] = Lane(policy, config, target)
    app[CONFIG] = config
    app[EXPLAINER] = explainer

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        await explainer.open()
        if recorder is not None:
            await recorder.start()
        await relay.open()
        yield
        lane.close()
        await relay.close()
        if recorder is not None:
            await recorder.stop()
        await explainer.close()

    async def drain(app: web.Application) -> None:
        policy.drain.start()
        lane.close_idle()
        grace = config.shutdown_grace.total_seconds()
        await policy.drain.unless_hurried(policy.drain.settled(grace), lane.drained(grace))

    app.cleanup_ctx.append(upstream_client)
    app.on_shutdown.append(drain)
    # A relayed answer carries the upstream's headers, not the ones aiohttp adds.
    app.on_response_prepare.append(take_back_added)
    return app


def create_admin_app(
    config: Config,
    registry: CollectorRegistry,
    explainer: Explainer,
    drain: Drain | None = None,
    recorder: Recorder | None = None,
    workers: Callable[[], Listening] | None = None,
) -> web.Application:
    """The app on the admin listener: /metrics, /healthz, /readyz, /sessions/{id}/explain.

    Served by one process, it starts once the proxy listener is up; a supervisor's
    (`workers`) asks its workers whether they listen.
    """
    app = web.Application(middlewares=[_bearer(config.admin_token)] if config.admin_token else [])
    guard_admin(app)
    app[CONFIG] = config
    app[TARGET] = Target.of(config.upstream, config.upstream_ca_file)
    app[REGISTRY] = registry
    app[EXPLAINER] = explainer
    app[DRAIN] = drain or Drain()
    app[RECORDER_HEALTH] = recorder.check if recorder else _no_recorder
    app[WORKERS] = workers
    app.router.add_get("/sessions/{session_id}/explain", _explain)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


_NOT_OBSERVING = "not observing"
_OPEN = frozenset({"/healthz", "/readyz"})
"""Probes stay open: a kubelet cannot send a secret."""


def _bearer(token: str) -> Any:
    """The admin token as a bearer token, or, for a browser, as a Basic password.

    A browser cannot send a bearer token from a link (Grafana's to the explain
    page); asked with Basic, it prompts once and sends it with every request.
    """
    secret = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN:
            given = request.headers.get("Authorization", "")
            if not (
                hmac.compare_digest(_bearer_token(given), secret)
                or hmac.compare_digest(_basic_password(given), secret)
            ):
                challenge = 'Bearer realm="session-lens admin"'
                if prefers_html(request.headers.get("Accept", "")):
                    challenge = 'Basic realm="session-lens admin", charset="UTF-8"'
                return web.json_response(
                    {"error": "a bearer token is required"},
                    status=401,
                    headers={"WWW-Authenticate": challenge},
                )
        return await handler(request)

    return check


def _bearer_token(authorization: str) -> bytes:
    """The token of a Bearer `Authorization` header (the scheme in any case), else nothing.

    aiohttp keeps bytes that are not UTF-8 as surrogates: the token is compared as sent.
    """
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return credentials.strip(" ").encode("utf-8", "surrogateescape")


def _basic_password(authorization: str) -> bytes:
    """The password of a Basic `Authorization` header (any user name), else nothing."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic":
        return b""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except ValueError:
        return b""
    return decoded.partition(b":")[2]


async def _no_recorder() -> str | None:
    return _NOT_OBSERVING


async def _metrics(request: web.Request) -> web.Response:
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(request.app[REGISTRY]), headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if request.app[DRAIN].draining:
        return web.json_response({"status": "draining", "checks": {}}, status=503)
    upstream, database, recorder = await asyncio.gather(
        upstream_reachable(request.app[TARGET], config.upstream_connect_timeout.total_seconds()),
        request.app[EXPLAINER].health(),
        request.app[RECORDER_HEALTH](),
    )
    checks = {
        "upstream": "ok" if upstream is None else f"down: {upstream}",
        "database": "ok" if database is None else f"down: {database}",
    }
    if recorder is not _NOT_OBSERVING:
        checks["recorder"] = "ok" if recorder is None else recorder
    questdb = request.app[EXPLAINER].questdb
    if questdb is not None:  # evidence only: without it the lifecycle tables decide alone
        checks["questdb"] = "ok" if questdb.problem is None else f"down: {questdb.problem}"
    workers = request.app[WORKERS]
    listening = None if workers is None else workers()
    if listening is not None:
        checks["workers"] = (
            "ok"
            if listening.count == listening.of
            else f"{listening.count} of {listening.of} listening"
        )
    # Only the upstream and the proxy port decide readiness: without the database,
    # traffic still flows and misses are `unknown`; taking the hop out of service
    # would be worse.
    if upstream is not None or (listening is not None and not listening.ready):
        status, code = "not ready", 503
    elif all(check == "ok" for check in checks.values()):
        status, code = "ready", 200
    else:
        status, code = "degraded", 200
    horizon = request.app[EXPLAINER].horizon
    body: dict[str, Any] = {
        "status": status,
        "checks": checks,
        "tracking_horizon": None if horizon is None else horizon.isoformat(),
    }
    if listening is not None:
        body["workers"] = {"listening": listening.count, "of": listening.of}
    return web.json_response(body, status=code)


async def _explain(request: web.Request) -> web.Response:
    """The report as JSON, or as a page for a client that prefers HTML (a browser)."""
    session_id = request.match_info["session_id"]
    config = request.app[CONFIG]
    html = prefers_html(request.headers.get("Accept", ""))
    rule = config.id_validator.check(session_id)
    if rule is not None:
        why = config.id_validator.broken(session_id, rule)
        if html:
            page = problem_page(
                "Not a session ID", f"{why} (the rule {rule.value!r})", session_id[:64]
            )
            return _page(page, 400)
        response = web.json_response(
            {
                "session_id": session_id[:64],
                "reason": "invalid_format",
                "rule": rule.value,
                "why": why,
            },
            status=400,
        )
    else:
        try:
            at, given = _moment_asked(request)
            report = report_json(await request.app[EXPLAINER].report(session_id, at, given))
        except ReplayError as exc:
            if html:
                return _page(problem_page("Cannot replay that moment", str(exc), session_id), 400)
            response = web.json_response(
                {"session_id": session_id, "error": "bad request", "detail": str(exc)}, status=400
            )
        except StoreError as exc:
            if html:
                return _page(problem_page("Database unavailable", exc.detail, session_id), 503)
            response = web.json_response(
                {"error": "database unavailable", "detail": exc.detail}, status=503
            )
        else:
            if html:
                return _page(report_page(report), 200)
            response = web.json_response(report)
    response.headers[hdrs.VARY] = "Accept"
    return response


def _moment_asked(request: web.Request) -> tuple[datetime | None, Reason | None]:
    """The `at` and `given` an explain request asks for; raises ReplayError."""
    at, given = request.query.get("at"), request.query.get("given")
    return (
        None if at is None else moment(at),
        given_reason(given) if given else None,  # empty: a link whose series has no reason
    )


def _page(text: str, status: int) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type=HTML,
        charset="utf-8",
        headers={
            hdrs.VARY: "Accept",
            "Content-Security-Policy": SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def upstream_reachable(target: Target, timeout: float) -> str | None:
    """None when a TCP connection to the upstream opens in time, else why not."""
    host, port = target.host, target.port
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
