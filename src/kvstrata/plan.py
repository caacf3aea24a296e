"""Values the orchestrator hands out and takes: a lookup's plan, a load's handle, a chunk write."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from kvstrata.keys import ChunkKey
from kvstrata.policy.cost import Choice
from kvstrata.policy.route import Decision, RequestContext, Route


@dataclass(frozen=True)
class PlannedChunk:
    index: int
    tier: str
    key: ChunkKey
    codec: str


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk to store: what every save becomes before it is queued.

    ``keys`` maps codec -> this chunk's key ("none", the logical key, must be
    present); ``tiers`` is the final write set (admission already applied);
    ``first_position`` is the position of the chunk's first token in the
    prompt (codecs that undo RoPE need it).
    """

    route: Route
    tenant: str
    keys: Mapping[str, ChunkKey]
    tiers: tuple[str, ...]
    first_position: int = 0

    @property
    def logical_key(self) -> ChunkKey:
        return self.keys["none"]

    def key_for(self, tier: str) -> ChunkKey:
        return self.keys[self.route.codec_for(tier)]


@dataclass(frozen=True)
class Plan:
    """A lookup's answer: which chunks to load from which tier, and why.

    ``chunks`` are contiguous from ``first_chunk`` (the first chunk the engine
    does not fully hold). ``keys`` holds, per codec, the keys of every full
    chunk of the prompt (saves reuse them).
    """

    ctx: RequestContext
    decision: Decision
    chunk_tokens: int
    skip_tokens: int
    keys: Mapping[str, tuple[ChunkKey, ...]]
    first_chunk: int = 0
    chunks: tuple[PlannedChunk, ...] = ()
    choice: Choice | None = None
    reason: str = ""

    @property
    def load_tokens(self) -> int:
        """Tokens beyond what the engine holds that the load provides."""
        if not self.chunks:
            return 0
        return (self.first_chunk + len(self.chunks)) * self.chunk_tokens - self.skip_tokens

    @property
    def end_token(self) -> int:
        return self.skip_tokens + self.load_tokens

    def tokens_by_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.chunks:
            start = max(c.index * self.chunk_tokens, self.skip_tokens)
            out[c.tier] = out.get(c.tier, 0) + (c.index + 1) * self.chunk_tokens - start
        return out

    def logical_keys(self) -> tuple[ChunkKey, ...]:
        return self.keys.get("none", ())

    def chunk_write(self, index: int, tiers: tuple[str, ...]) -> ChunkWrite:
        """Chunk ``index`` of the prompt, to be written to ``tiers``."""
        keys = {codec: ks[index] for codec, ks in self.keys.items()}
        return ChunkWrite(
            self.decision.route, self.ctx.tenant, keys, tuple(tiers), index * self.chunk_tokens
        )


@dataclass
class LoadHandle:
    """Per-layer results of one load, filled on the background loop, read by the engine.

    ``wait_layer(l)`` blocks until layer ``l`` of every planned chunk has
    arrived or failed, then returns ``{chunk index: kv}`` with ``kv`` shaped
    ``[2, chunk_tokens, kv_heads, head_dim]`` (read-only). A chunk missing from
    the mapping failed: its tokens must be recomputed (``failed`` lists them).
    """

    plan: Plan
    n_layers: int
    failed: set[int] = field(default_factory=set)
    #: how the load went: ``groups`` (layer ranges read together), ``gets`` (reads issued,
    #: one per chunk per group), ``ready_at[l]`` / ``waited[l]`` (monotonic time layer l
    #: completed / the engine asked for it)
    groups: tuple[range, ...] = ()
    gets: int = 0
    started_at: float = field(default_factory=time.monotonic)
    ready_at: list[float | None] = field(init=False)
    waited: list[float | None] = field(init=False)
    _layers: list[dict[int, np.ndarray]] = field(init=False)
    _ready: list[threading.Event] = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._layers = [{} for _ in range(self.n_layers)]
        self._ready = [threading.Event() for _ in range(self.n_layers)]
        self.ready_at = [None] * self.n_layers
        self.waited = [None] * self.n_layers

    # -- filled by the orchestrator ------------------------------------------

    def deliver(self, layer: int, chunk: int, kv: np.ndarray) -> None:
        with self._lock:
            if chunk not in self.failed:
                self._layers[layer][chunk] = kv

    def fail(self, chunks) -> None:
        with self._lock:
            for c in chunks:
                self.failed.add(c)
                for layer in self._layers:
                    layer.pop(c, None)

    def complete(self, layers: range) -> None:
        now = time.monotonic()
        for layer in layers:
            if not self._ready[layer].is_set():
                self.ready_at[layer] = now
                self._ready[layer].set()

    def progress(self) -> tuple[int, int]:
        """(layers complete in order from 0, layers the engine has asked for): how far ahead
        the load is."""
        delivered = 0
        while delivered < self.n_layers and self._ready[delivered].is_set():
            delivered += 1
        consumed = 1 + max((n for n, t in enumerate(self.waited) if t is not None), default=-1)
        return delivered, consumed

    def abort(self, before_release=None) -> None:
        """Fail everything not yet delivered and release every waiter (after
        ``before_release(self)``)."""
        self.fail([c.index for c in self.plan.chunks if not self._has_all(c.index)])
        if before_release is not None:
            before_release(self)
        self.complete(range(self.n_layers))

    def _has_all(self, chunk: int) -> bool:
        with self._lock:
            return all(chunk in layer for layer in self._layers)

    # -- read by the engine -------------------------------------------------

    def wait_layer(self, layer: int, timeout: float | None = None) -> Mapping[int, np.ndarray]:
        if self.waited[layer] is None:
            self.waited[layer] = time.monotonic()
        if not self._ready[layer].wait(timeout):
            raise TimeoutError(f"layer {layer} not loaded within {timeout}s")
        with self._lock:
            return dict(self._layers[layer])

    def wait_all(self, timeout: float | None = None) -> bool:
        return all(event.wait(timeout) for event in self._ready)

    def chunk_kv(self, chunk: int) -> np.ndarray | None:
        """All layers of one delivered chunk, ``[n_layers, 2, T, H, D]``, or None if it failed."""
        with self._lock:
            if chunk in self.failed or not all(chunk in layer for layer in self._layers):
                return None
            return np.stack([layer[chunk] for layer in self._layers])

    @property
    def done(self) -> bool:
        return all(event.is_set() for event in self._ready)
