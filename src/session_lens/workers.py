"""`--workers N`: N processes on one port (SO_REUSEPORT), one /metrics adding them up.

The supervisor reserves the port (bound, never listening, so the kernel sends
it no connections), starts the workers with spawn, and serves the admin
listener itself. Workers write their metrics to files in a private directory
(prometheus-client's multiprocess mode); /metrics sums them. A worker that dies
is started again; SIGTERM or SIGINT drains every worker within the grace period.

Each worker says when its listener is up (an event shared with the supervisor):
/readyz waits for all of them at start, so a rolling restart hands the port to a
full set. Afterwards it stays 200 while one still listens: the kernel gives new
connections only to listening sockets, so they are served, and taking the whole
process out of rotation for a worker's restart would cost more than the worker.
"""

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

from prometheus_client import CollectorRegistry, multiprocess

from .app import Listening, create_admin_app
from .config import Address, Config, mask_url
from .drain import Drain
from .explain import Explainer
from .logs import setup_logging
from .metrics import Metrics
from .server import (
    ListenError,
    admin_runner,
    run_fast,
    serve,
    start_admin,
    stopped_by_signals,
    upstream_checked,
)

log = logging.getLogger("session_lens.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXIT_LISTEN = 3
"""A worker's exit code when it cannot open the shared port."""
RESTARTS = 5
"""Workers that die this many times within `RESTART_WINDOW` stop the supervisor."""
RESTART_WINDOW = 60.0
POLL = 0.2
PR_SET_PDEATHSIG = 1


class WorkersFailed(Exception):
    """The workers keep dying: the supervisor gives up."""


def _worker(config: Config, index: int, supervisor: int, listening: Event) -> None:
    """A worker process's body (spawned: nothing is inherited but the arguments)."""
    setup_logging(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains
    if sys.platform == "linux":  # a supervisor killed with SIGKILL takes its workers along
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != supervisor:  # it died before that was set
            return
    try:
        run_fast(serve(config, worker=index, listening=listening.set))
    except ListenError as exc:
        print(f"session-lens worker {index}: {exc}", file=sys.stderr)
        sys.exit(EXIT_LISTEN)


def reserve(address: Address) -> socket.socket:
    """Bind `address` with SO_REUSEPORT without listening: the port is ours, and known."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise ListenError(address, os.strerror(exc.errno) if exc.errno else str(exc)) from exc
    return sock


class Supervisor:
    """The worker processes: started, watched, restarted, stopped."""

    def __init__(self, config: Config, metrics_dir: str) -> None:
        self._config = config
        self._metrics_dir = metrics_dir
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, BaseProcess] = {}
        self._listening: dict[int, Event] = {}
        self._deaths: list[float] = []
        self._complete = False
        """Every worker has been listening at once."""

    def start(self, index: int) -> None:
        config = self._config
        if config.observes:  # one spool each: appends never interleave
            config = replace(config, spool_dir=config.spool_path / f"worker-{index}")
        listening = self._context.Event()
        process = self._context.Process(
            target=_worker,
            args=(config, index, os.getpid(), listening),
            name=f"session-lens-worker-{index}",
        )
        process.start()
        self._processes[index] = process
        self._listening[index] = listening

    def listening(self) -> Listening:
        """How many workers accept connections now; ready once all have, while one does."""
        count = sum(
            1
            for index, process in self._processes.items()
            if self._listening[index].is_set() and process.is_alive()
        )
        if count == self._config.workers:
            self._complete = True
        return Listening(count, self._config.workers, self._complete and count > 0)

    def check(self) -> None:
        """Start again the workers that died; raise when they keep dying or cannot listen."""
        for index, process in list(self._processes.items()):
            if process.is_alive():
                continue
            assert process.pid is not None
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if process.exitcode == EXIT_LISTEN:
                raise ListenError(self._config.listen, "a worker could not listen")
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
            log.warning(
                "worker died, starting it again",
                extra={"worker": index, "pid": process.pid, "exit_code": process.exitcode},
            )
            if len(self._deaths) >= RESTARTS:
                raise WorkersFailed(f"workers died {RESTARTS} times within {RESTART_WINDOW:g}s")
            self.start(index)

    def hurry(self) -> None:
        """Stop at once (a second Ctrl-C): every worker is killed, what it serves cut."""
        alive = [process for process in self._processes.values() if process.is_alive()]
        log.warning("stopping at once", extra={"workers": len(alive)})
        for process in alive:
            process.kill()

    async def stop(self, grace: float) -> None:
        """SIGTERM to every worker; those still running after the grace period are killed."""
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace + 2.0
        while any(p.is_alive() for p in self._processes.values()):
            if time.monotonic() > deadline:
                for process in self._processes.values():
                    if process.is_alive():
                        process.kill()
                break
            await asyncio.sleep(0.05)
        for process in self._processes.values():
            process.join(timeout=1.0)


async def supervise(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run `config.workers` workers on the proxy port and the admin listener here."""
    reserved = reserve(config.listen)
    config = replace(config, listen=Address(config.listen.host, reserved.getsockname()[1]))
    metrics_dir = tempfile.mkdtemp(prefix="session-lens-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # read by each spawned worker at import
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    # The supervisor's own explainer (for /explain and /readyz) counts privately:
    # /metrics is the workers' sum.
    explainer = Explainer(
        config, Metrics(CollectorRegistry(), config.session_routes), config.database_url
    )
    drain = Drain()
    stop = stop or asyncio.Event()
    supervisor = Supervisor(config, metrics_dir)
    admin = admin_runner(
        create_admin_app(config, registry, explainer, drain, workers=supervisor.listening)
    )
    with stopped_by_signals(stop, supervisor.hurry):
        try:
            await explainer.open()
            await start_admin(admin, config)
            if config.exemplars:
                log.info(
                    "no exemplars with several workers: prometheus-client's multiprocess"
                    " mode keeps only values",
                    extra={"workers": config.workers},
                )
            for index in range(config.workers):
                supervisor.start(index)
            log.info(
                "listening",
                extra={
                    "listen": str(config.listen),
                    "admin_listen": str(config.admin_listen),
                    "upstream": mask_url(config.upstream),
                    "workers": config.workers,
                },
            )
            async with upstream_checked(config):
                while not stop.is_set():
                    supervisor.check()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), POLL)
            grace = config.shutdown_grace.total_seconds()
            log.info("shutting down", extra={"grace_seconds": grace, "workers": config.workers})
            drain.start()
        finally:
            await supervisor.stop(config.shutdown_grace.total_seconds())
            await admin.cleanup()
            await explainer.close()
            reserved.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            log.info("stopped")
