"""One DRAM pool per engine, seen by both of vLLM's roles.

In vLLM's default multiprocess mode the scheduler (engine core) and the
worker are two processes, each with its own orchestrator. A ``memory`` tier
lives in one process only: the worker's, which loads and saves. The
scheduler must still know what that pool holds to plan a DRAM hit, so:

* the worker wraps each tier in a :class:`Journal`, which notes every key the
  tier gains or loses (puts, evictions, deletes, promotions, demotions) and
  hands the net changes to vLLM each step as worker metadata
  (``build_connector_worker_meta``, :class:`PoolChanges`); the memory tiers'
  changes feed the index below, every tier's feed the KV cache events
  (:mod:`kvstrata.connectors.vllm_events`);
* the scheduler replaces each memory tier with a :class:`PoolIndex`: a set of
  the keys the worker holds, updated from that metadata
  (``update_connector_output``), which answers ``contains`` and nothing else.

No extra server, no shared memory. Staleness: an index entry may outlive the
chunk by up to one step (the worker evicted it after reporting); the worker's
``get`` then misses, its blocks are reported as load errors and vLLM
recomputes them -- a stale entry is a miss, never a wrong load. Saves the
scheduler has ordered but the worker has not confirmed yet are *pending*:
a lookup that finds one waits for the confirmation (up to ``pending_s``)
instead of missing it, like the in-flight wait of a single-process
orchestrator. That wait happens on the background loop while the scheduler
is answered ``None`` ("ask again"), so it never stalls vLLM's scheduler.

When both roles share one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) they
share one orchestrator and its real pool: the scheduler reads the pool
(through its journal) and keeps no index.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstrata.keys import ChunkKey
from kvstrata.tiers.base import Fetch, Miss, PutResult, Tier

try:  # the base class only exists where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - kvstrata without vLLM
    KVConnectorWorkerMetadata = object  # type: ignore[assignment,misc]

#: how often a lookup waiting for pending saves looks again
POLL_S = 0.005


@dataclass
class PoolChanges(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: ``{tier: {key digest: held now?}}`` (the net change)."""

    pools: dict[str, dict[bytes, bool]] = field(default_factory=dict)

    def aggregate(self, other: PoolChanges) -> PoolChanges:
        for tier, changes in other.pools.items():
            self.pools.setdefault(tier, {}).update(changes)
        return self


class Journal(Tier):
    """A worker's tier, noting which keys it gains and loses. Everything else is the tier's own."""

    def __init__(self, pool: Tier):
        super().__init__(pool.name)
        self.pool = pool
        self.kind = getattr(pool, "kind", "memory")
        self._changes: dict[bytes, bool] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name):  # capacity_bytes, used_bytes, ...: the pool's
        return getattr(self.pool, name)

    def __len__(self) -> int:
        return len(self.pool)

    def _note(self, keys: Sequence[ChunkKey], held: Sequence[bool]) -> None:
        with self._lock:  # drained every engine step (build_connector_worker_meta)
            for key, present in zip(keys, held, strict=True):
                self._changes[key.digest] = present

    def drain(self) -> dict[bytes, bool]:
        with self._lock:
            changes, self._changes = self._changes, {}
        return changes

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return await self.pool.contains(keys)

    async def get(self, keys: Sequence[ChunkKey], layers: range | None = None) -> list[Fetch]:
        return await self.pool.get(keys, layers)

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]], **options) -> PutResult:
        result = await self.pool.put(items, **options)  # options: ttl_s, for tiers that take one
        evicted = [e.key for e in result.evicted]
        self._note(evicted, [False] * len(evicted))
        keys = [k for k, _ in items]
        if result.stored == len(keys):
            self._note(keys, [True] * len(keys))
        else:  # some were not admitted (larger than the pool): ask what the put really left
            self._note(keys, await self.pool.contains(keys))
        return result

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        await self.pool.delete(keys)
        self._note(keys, [False] * len(keys))

    async def close(self) -> None:
        await self.pool.close()


class PoolIndex(Tier):
    """The scheduler's view of the worker's memory tier: which keys it holds. It holds no bytes."""

    def __init__(self, pool: Tier, pending_s: float = 2.0):
        super().__init__(pool.name)
        self.pool = (
            pool  # this process's own (empty, unused) pool: given back if a worker turns up here
        )
        self.pending_s = pending_s
        self._held: set[bytes] = set()
        self._pending: dict[
            bytes, float
        ] = {}  # saves ordered, not confirmed: digest -> give-up time
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def apply(self, changes: dict[bytes, bool]) -> None:
        """The worker's report (from the scheduler thread)."""
        with self._lock:
            for digest, held in changes.items():
                (self._held.add if held else self._held.discard)(digest)
                self._pending.pop(digest, None)

    def expect(self, digests: Sequence[bytes]) -> None:
        """The scheduler ordered these chunks saved into
        the pool: a lookup waits for them, briefly."""
        until = time.monotonic() + self.pending_s
        with self._lock:
            for d in digests:
                if d not in self._held:
                    self._pending[d] = until

    def _answer(self, keys: Sequence[ChunkKey]) -> tuple[list[bool], bool]:
        now = time.monotonic()
        with self._lock:
            for d in [d for d, until in self._pending.items() if until <= now]:
                del self._pending[d]
            held = [k.digest in self._held for k in keys]
            waiting = any(k.digest in self._pending for k in keys)
        return held, waiting

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        held, waiting = self._answer(keys)
        while waiting:
            await asyncio.sleep(POLL_S)
            held, waiting = self._answer(keys)
        return held

    async def get(self, keys: Sequence[ChunkKey], layers: range | None = None) -> list[Fetch]:
        return [Miss(k) for k in keys]  # the bytes are the worker's; the scheduler never loads

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        return PutResult(0)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for k in keys:
                self._held.discard(k.digest)

    async def close(self) -> None:
        await self.pool.close()


def attach(orch, worker: bool) -> None:
    """Set up ``orch``'s tiers for one role (call once per role, after construction).

    Worker: every tier gets a :class:`Journal`. Scheduler: each memory tier is
    replaced by a :class:`PoolIndex`, unless a worker in this process already
    journals it (one process, one shared pool).
    """
    for name, spec in orch.config.tiers.items():
        tier = orch.tiers[name]
        if worker:
            if isinstance(
                tier, PoolIndex
            ):  # the scheduler came first in this process: the pool is shared
                orch.tiers[name] = Journal(tier.pool)
            elif not isinstance(tier, Journal):
                orch.tiers[name] = Journal(tier)
        elif spec.tier_class.process_local and not isinstance(tier, (Journal, PoolIndex)):
            orch.tiers[name] = PoolIndex(tier, orch.inflight_wait_s)


def changes(orch) -> PoolChanges | None:
    """What the worker's tiers gained and lost since the last call (None if nothing)."""
    pools = {
        name: c for name, t in orch.tiers.items() if isinstance(t, Journal) and (c := t.drain())
    }
    return PoolChanges(pools) if pools else None


def apply(orch, meta) -> dict[str, dict[bytes, bool]]:
    """Apply a worker's :class:`PoolChanges` to this scheduler's indexes; returns the changes."""
    if not isinstance(meta, PoolChanges):
        return {}
    for name, c in meta.pools.items():
        tier = orch.tiers.get(name)
        if isinstance(tier, PoolIndex):
            tier.apply(c)
    return meta.pools


def indexes(orch) -> dict[str, PoolIndex]:
    return {name: t for name, t in orch.tiers.items() if isinstance(t, PoolIndex)}
