"""Running both listeners until a signal, then draining within the grace period."""

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from . import __version__
from .admin_site import AdminSite
from .app import LANE, POLICY, create_admin_app, create_proxy_app, upstream_reachable
from .config import Address, Config, mask_url
from .explain import Explainer
from .hop import Target
from .lane import HopSite, Lane
from .lane.client import IDLE_CLIENT
from .metrics import Metrics
from .recorder import recorder_for

log = logging.getLogger("session_lens.server")


class ListenError(Exception):
    """A listener could not be opened."""

    def __init__(self, address: Address, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


async def start_proxy(runner: web.AppRunner, address: Address, lane: Lane) -> None:
    """Open a proxy listener: SO_REUSEPORT always, so that the next process of a
    rolling restart (or a sibling worker) binds beside this one."""
    await _start(
        runner,
        address,
        lambda: HopSite(runner, lane, address.host, address.port, backlog=1024, reuse_port=True),
    )


async def start_admin(runner: web.AppRunner, config: Config) -> None:
    """Open the admin listener, with the proxy's head timeout and a connection limit."""
    address = config.admin_listen
    await _start(
        runner,
        address,
        lambda: AdminSite(
            runner,
            address,
            header_timeout=config.header_read_timeout.total_seconds(),
            max_connections=config.admin_max_connections,
        ),
    )


async def start_runner(runner: web.AppRunner, address: Address) -> None:
    """Open a plain listener for `runner`'s app (the demo's reference service's)."""
    await _start(runner, address, lambda: web.TCPSite(runner, address.host, address.port))


async def _start(runner: web.AppRunner, address: Address, site: Callable[[], web.BaseSite]) -> None:
    await runner.setup()
    try:
        await site().start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(address, reason) from exc


def _proxy_runner(app: web.Application) -> web.AppRunner:
    """The runner of a proxy app."""
    # The proxy app drains itself within the grace period (on_shutdown); what is
    # still running after that gets this long to react to being cancelled.
    # handler_cancellation: a client that leaves takes its upstream request with it.
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=0.25,
        handle_signals=False,
        handler_cancellation=True,
    )


def admin_runner(app: web.Application) -> web.AppRunner:
    """The runner of an admin app, as every process with an admin listener runs it."""
    # Idle connections close after as long as the proxy's do (aiohttp's default is an hour).
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=1.0,
        handle_signals=False,
        keepalive_timeout=IDLE_CLIENT,
    )


@contextmanager
def stopped_by_signals(
    stop: asyncio.Event, at_once: Callable[[], None] | None = None
) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` meanwhile; once it is set, another calls `at_once`.

    A person who pressed Ctrl-C and sees the drain take its time presses it again:
    the first one says that this will not be ignored.
    """
    loop = asyncio.get_running_loop()

    def signalled(signum: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            if at_once is not None:
                log.info(
                    "a second Ctrl-C or SIGTERM stops at once, cutting what is in flight",
                    extra={"signal": signum.name},
                )
        elif at_once is not None:
            at_once()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(main)
        return
    uvloop.run(main)


async def serve(
    config: Config,
    stop: asyncio.Event | None = None,
    worker: int | None = None,
    listening: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or `stop` is set), then shut down gracefully.

    As one of several workers (`worker` is its index), only the proxy listener
    is served, on a port shared with the others; the supervisor has the admin one.
    `listening` is called once the proxy listener accepts connections.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the output and nobody graphs them
    registry = CollectorRegistry()
    metrics = Metrics(registry, config.session_routes, config.exemplars)
    grace = config.shutdown_grace.total_seconds()
    explainer = Explainer(config, metrics, config.database_url)
    recorder = recorder_for(config, metrics)
    proxy_app = create_proxy_app(config, metrics, explainer, recorder)
    proxy = _proxy_runner(proxy_app)
    admin = None
    if worker is None:
        admin = admin_runner(
            create_admin_app(config, registry, explainer, proxy_app[POLICY].drain, recorder)
        )
    stop = stop or asyncio.Event()
    # A worker's signals come from its supervisor (whose SIGTERM may follow one sent to
    # the whole group), which kills it when told to stop at once.
    at_once = proxy_app[POLICY].drain.hurry if worker is None else None
    with stopped_by_signals(stop, at_once):
        await _listen(config, proxy, proxy_app[LANE], admin, listening)
        log.info(
            "listening",
            extra={
                "listen": str(config.listen),
                "admin_listen": str(config.admin_listen) if admin else None,
                "worker": worker,
                "upstream": mask_url(config.upstream),
                "validation": config.validation,
                "version": __version__,
            },
        )
        async with upstream_checked(config, say=admin is not None):
            await stop.wait()
        log.info("shutting down", extra={"grace_seconds": grace})
        await proxy.cleanup()
        if admin is not None:
            await admin.cleanup()
        log.info("stopped", extra={"worker": worker})


@asynccontextmanager
async def upstream_checked(config: Config, say: bool = True) -> AsyncIterator[None]:
    """Meanwhile, say once (if `say`) when the upstream cannot be reached at start-up.

    Serving goes on (what is sent upstream gets a 502 until it comes up), and start-up
    waits for nothing: the check runs beside it, within the connect timeout.
    """
    check = asyncio.create_task(_say_if_unreachable(config)) if say else None
    try:
        yield
    finally:
        if check is not None:
            check.cancel()
            await asyncio.wait((check,))


async def _say_if_unreachable(config: Config) -> None:
    target = Target.of(config.upstream, config.upstream_ca_file)
    problem = await upstream_reachable(target, config.upstream_connect_timeout.total_seconds())
    if problem is not None:
        log.warning(
            "the upstream cannot be reached: requests sent to it get a 502 until it can be",
            extra={"upstream": mask_url(config.upstream), "problem": problem},
        )


async def _listen(
    config: Config,
    proxy: web.AppRunner,
    lane: Lane,
    admin: web.AppRunner | None,
    listening: Callable[[], None] | None,
) -> None:
    """Open the proxy listener, then the admin one; neither is left open if one fails."""
    # The proxy listener first: once /healthz answers, clients can connect.
    await start_proxy(proxy, config.listen, lane)
    if listening is not None:
        listening()
    if admin is not None:
        try:
            await start_admin(admin, config)
        except ListenError:
            await proxy.cleanup()
            raise
