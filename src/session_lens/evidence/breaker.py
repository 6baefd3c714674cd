"""A circuit breaker: stop asking a sick database, and try again by itself."""

import time
from collections.abc import Callable


class Breaker:
    """Opens after `failures` failures in a row; after `cooldown` lets one trial through."""

    def __init__(
        self, failures: int = 5, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        """Whether calls are being refused (a trial may still be let through)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go to the database now."""
        if self._opened_at is None:
            return True
        if self._trial or self._clock() - self._opened_at < self._cooldown:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        """A call went through: close."""
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failed(self) -> None:
        """A call failed: count it, and open (again) at the threshold or after a failed trial."""
        self._failures += 1
        if self._trial or self._failures >= self._threshold:
            self._opened_at = self._clock()
        self._trial = False
