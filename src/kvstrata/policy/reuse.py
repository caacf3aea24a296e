"""Prefix-reuse estimator: a decaying count-min sketch of chunk keys.

Each lookup reports its chunk keys (:meth:`observe`); the sketch counts
sightings with exponential decay (``half_life_s``), in fixed memory
(``width x depth`` float32 counters: 65536 x 4 = 1 MiB by default). A count
never underestimates (count-min) and old popularity fades, so the estimate
follows a changing workload.

Prediction for a request: each chunk seen ``c`` times is read again with
probability ``1 - exp(-c)`` (one recent sighting: 0.63, two: 0.86); the
request's reuse is the mean over its chunks. A hint from the request
(``reuse`` in ``kv_transfer_params``) overrides the prediction: the caller
knows its workload better than any sketch.

Keys are SHA-256 digests, already uniform: the sketch's ``depth`` hash
functions are ``depth`` disjoint 4-byte slices of the digest.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from kvstrata.keys import ChunkKey


class ReuseEstimator:
    def __init__(
        self,
        width: int = 65536,
        depth: int = 4,
        half_life_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 1 <= depth <= 8:
            raise ValueError("sketch depth must be 1..8 (it slices a 32-byte digest)")
        self.width, self.depth, self.half_life_s = width, depth, half_life_s
        self._counts = np.zeros((depth, width), dtype=np.float32)
        self._rows = np.arange(depth)
        self._clock = clock
        self._decayed_at = clock()
        self._lock = threading.Lock()

    def _cells(self, key: ChunkKey) -> np.ndarray:
        return np.frombuffer(key.digest, dtype="<u4", count=self.depth) % self.width

    def _decay(self) -> None:
        now = self._clock()
        elapsed = now - self._decayed_at
        # decay in steps of 1/16 half-life: cheap, and precise enough for a popularity signal
        if elapsed >= self.half_life_s / 16:
            self._counts *= np.float32(0.5 ** (elapsed / self.half_life_s))
            self._decayed_at = now

    def observe(self, keys: Sequence[ChunkKey]) -> None:
        """Count one sighting of each key."""
        with self._lock:
            self._decay()
            for key in keys:
                self._counts[self._rows, self._cells(key)] += 1.0

    def count(self, key: ChunkKey) -> float:
        """Decayed sightings of ``key`` (an upper bound, as count-min sketches give)."""
        with self._lock:
            self._decay()
            return float(self._counts[self._rows, self._cells(key)].min())

    def predict(self, keys: Sequence[ChunkKey], hint: float | None = None) -> float:
        """Probability that this request's chunks are read again (0..1)."""
        if hint is not None:
            return min(max(float(hint), 0.0), 1.0)
        if not keys:
            return 0.0
        return sum(1.0 - math.exp(-self.count(k)) for k in keys) / len(keys)
