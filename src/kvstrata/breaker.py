"""Circuit breaker: a tier that keeps failing is skipped for a while, then tried again.

closed --(``failures`` consecutive failures)--> open --(``cooldown_s``)--> half-open
half-open lets one call through: success closes the breaker, failure opens it
again for another cooldown. Skipped calls cost nothing: a load becomes a miss
(recompute), a save is dropped and counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self,
        failures: int = 3,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.failures, self.cooldown_s, self._clock = failures, cooldown_s, clock
        self._consecutive = 0
        self._open_until: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None and self._clock() < self._open_until

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one trial at a time."""
        with self._lock:
            if self._open_until is None:
                return True
            if self._clock() < self._open_until or self._trial:
                return False
            self._trial = True
            return True

    def record(self, ok: bool) -> bool:
        """Record a call's outcome; returns True if this changed open/closed state."""
        with self._lock:
            was_open = self._open_until is not None
            self._trial = False
            if ok:
                self._consecutive, self._open_until = 0, None
            else:
                self._consecutive += 1
                if was_open or self._consecutive >= self.failures:
                    self._open_until = self._clock() + self.cooldown_s
            return was_open != (self._open_until is not None)
