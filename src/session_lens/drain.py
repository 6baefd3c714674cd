"""The process's one drain: whether shutdown has begun, and the requests still in flight.

The proxy's connections, the WebSocket relay, the admin app's /readyz and a supervisor
of workers all read the same one.
"""

import asyncio
import logging
from collections.abc import Awaitable, Iterable

log = logging.getLogger("session_lens.proxy")


class Drain:
    """Shutdown begun or not, and the requests in flight until it ends."""

    def __init__(self) -> None:
        self.draining = False
        """Whether shutdown has begun: connections are kept alive no more."""
        self.started = asyncio.Event()
        """The same, to wait for: open WebSockets are closed when it is set."""
        self.cut_short = asyncio.Event()
        """Set when shutdown is to end now, whatever is still in flight."""
        self._inflight = 0
        self._idle = asyncio.Event()

    def begin(self) -> None:
        """A request is in flight."""
        self._inflight += 1

    def finish(self) -> None:
        """A request is answered."""
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    def start(self) -> None:
        """Shutdown begins."""
        self.draining = True
        self.started.set()

    def hurry(self) -> None:
        """End the drain now (a second Ctrl-C): what is in flight is cut."""
        if not self.cut_short.is_set():
            log.warning("stopping at once", extra={"cut_requests": self._inflight})
            self.cut_short.set()

    async def unless_hurried(self, *waiting: Awaitable[object]) -> None:
        """Await all of `waiting`, or cancel them as soon as `hurry` is called."""
        task = asyncio.create_task(_all(waiting))
        hurried = asyncio.create_task(self.cut_short.wait())
        try:
            done, _ = await asyncio.wait((task, hurried), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (task, hurried):
                waiter.cancel()
            await asyncio.wait((task, hurried))
        if task in done:
            task.result()  # raises what it raised

    async def settled(self, grace: float) -> None:
        """Wait up to `grace` seconds for the requests in flight; say how many were cut."""
        self.start()
        if self._inflight:
            self._idle.clear()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("grace period over", extra={"cut_requests": self._inflight})


async def _all(waiting: Iterable[Awaitable[object]]) -> None:
    # A task of its own: a gather cancelled from outside keeps a CancelledError
    # nobody retrieves, and asyncio logs it.
    await asyncio.gather(*waiting)
