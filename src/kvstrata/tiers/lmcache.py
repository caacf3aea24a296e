"""LMCache tier: kvstrata's encoded objects kept in LMCache's local CPU backend.

For operators who already run LMCache: the DRAM pool is LMCache's own
``LocalCPUBackend`` (its allocator, its eviction policy, its memory objects),
under kvstrata's keys, object format and checksums, so a route names it like
``memory``.

How it is wired, and why (measured on a CPU-only machine, see docs/lmcache-nixl.md):

* LMCache is the store, not the namer. Each chunk is one LMCache memory object
  under ``CacheEngineKey("kvstrata", 1, 0, <our 32-byte chunk key as an int>,
  uint8)``; the bytes are kvstrata's object format (``kvstrata.format``),
  verified by us on every read. LMCache's token engine (``store``/``retrieve``
  with its own chunk hashing and its GPU copy connectors) is not used: it
  hashes tokens itself, its copy connectors need CUDA, and it would duplicate
  the orchestrator's job. The storage backend alone is the part that is a store.
* Reads copy the requested byte range out of LMCache's memory (one memcpy),
  under the tier's lock, and hand back bytes we own. LMCache recycles a memory
  object's buffer once it is evicted or deleted, so handing out views of it
  would break the Tier contract (views stay valid after eviction). Because
  the buffer is mutable memory we do not own, every get verifies checksums
  (:class:`~kvstrata.tiers.base.RangedTier`), unlike ``memory``, which keeps
  immutable ``bytes`` and verifies once.
* Eviction is LMCache's policy (``lru``, ``lfu``, ``fifo``, ``mru``) choosing
  the victim; the tier asks for the victim, copies its bytes out and removes
  it, so ``put`` can hand evicted data back for demotion like ``memory`` does.
  An allocation never waits (LMCache's own allocate busy-waits when it cannot
  evict; this tier reports "not admitted" instead).
* The whole pool (``capacity_bytes``) is allocated, and made resident, when
  the tier starts: size it like a pinned pool, not like a lazy dict.
* LMCache is imported when the tier is built, never at ``import kvstrata``:
  without the ``kvstrata[lmcache]`` extra (or where LMCache cannot load), the
  tier's constructor raises one :class:`TierError` ("start") saying why, and
  every other tier works.

Threading: every backend call happens under one lock; LMCache's own locks
make it safe for its other users in the process.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvstrata.keys import KEY_BYTES, ChunkKey
from kvstrata.sizes import ByteCount
from kvstrata.tiers.base import (
    Evicted,
    PutResult,
    RangedTier,
    ReadRequest,
    TierError,
    TierSettings,
    register,
)

MODEL_NAME = "kvstrata"  # the CacheEngineKey model name; our keys already carry the namespace


class LMCacheSettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_LMCACHE_", frozen=True, extra="forbid")

    capacity_bytes: ByteCount = Field(
        default=1 << 30,
        ge=1 << 20,
        le=1 << 46,
        description="LMCache CPU pool size, allocated at start",
    )
    eviction: Literal["lru", "lfu", "fifo", "mru"] = Field(
        default="lru", description="LMCache's cache policy"
    )


class _Lib:
    """The few LMCache names the tier uses, imported once."""

    def __init__(self) -> None:
        import torch
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.memory_allocators.mixed_memory_allocator import MixedMemoryAllocator
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        self.torch, self.CacheEngineKey, self.Config = torch, CacheEngineKey, LMCacheEngineConfig
        self.Allocator, self.Backend = MixedMemoryAllocator, LocalCPUBackend
        self.fmt = MemoryFormat.KV_2LTD
        _quiet_full_pool_warnings()
        _keep_vllm_engine_start_working()


def _keep_vllm_engine_start_working() -> None:
    """Let a vLLM engine start in this process after LMCache was imported.

    LMCache imports numba, hence ``llvmlite.binding.ffi``, whose ``lib`` object
    (``__slots__``, a ``__getattr__`` that wraps any name as a C function)
    answers ``lib.__dict__`` with a function wrapper. vLLM 0.32's worker start
    (``register_triton_kernel_overrides``) scans every module and calls
    ``vars(x).get(...)`` on each object that has a ``__dict__``; on that
    object it raises AttributeError and the engine does not start (measured:
    any vLLM engine started after an ``lmcache`` tier was built in the same
    process). Pre-seeding the wrapper's function table with a real, empty
    ``__dict__`` makes ``vars(lib)`` a dict; llvmlite never looks that name up.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    fntab = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(fntab, dict):
        fntab.setdefault("__dict__", {})


def _quiet_full_pool_warnings() -> None:
    # A full pool is the normal case for a cache: the tier then evicts. LMCache logs a
    # warning for every allocation that does not fit; keep its other warnings.
    class _DropFullPool(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to allocate memory block")

    log = logging.getLogger("lmcache.v1.memory_management")
    if not any(type(f).__name__ == "_DropFullPool" for f in log.filters):
        log.addFilter(_DropFullPool())


def _load(name: str) -> _Lib:
    try:
        return _Lib()
    except Exception as exc:  # ImportError, or a native module that does not load here
        raise TierError(
            name,
            "start",
            f"LMCache cannot load ({type(exc).__name__}: {exc}); "
            "install it with `pip install 'kvstrata[lmcache]'`",
        ) from exc


@register
class LMCacheTier(RangedTier):
    kind = "lmcache"
    settings_class = LMCacheSettings
    prior_latency_ms = 0.05  # a copy and a checksum per get
    prior_bandwidth_mbps = 5000
    default_timeout_ms = 1000

    def __init__(self, name: str = "lmcache", settings: LMCacheSettings | None = None):
        super().__init__(name)
        self.settings = settings = settings or LMCacheSettings()
        self._lib = lib = _load(name)
        try:
            config = lib.Config.from_defaults(
                chunk_size=256,  # unused: no token engine
                local_cpu=True,
                max_local_cpu_size=settings.capacity_bytes / (1 << 30),
                cache_policy=settings.eviction.upper(),
            )
            self._allocator = lib.Allocator(settings.capacity_bytes)
            self._backend: Any = lib.Backend(
                config, metadata=None, memory_allocator=self._allocator
            )
        except Exception as exc:
            detail = f"LMCache CPU backend: {type(exc).__name__}: {exc}"
            raise TierError(name, "start", detail) from exc
        self._lock = threading.Lock()
        self._used = 0
        self._closed = False

    # -- keys ---------------------------------------------------------------

    def _lmc_key(self, key: ChunkKey) -> Any:
        return self._lib.CacheEngineKey(
            MODEL_NAME, 1, 0, int.from_bytes(key.digest, "big"), self._lib.torch.uint8
        )

    @staticmethod
    def _our_key(lmc_key: Any) -> ChunkKey:
        return ChunkKey(int(lmc_key.chunk_hash).to_bytes(KEY_BYTES, "big"))

    @property
    def used_bytes(self) -> int:
        """Bytes of objects stored (LMCache rounds each allocation up to its alignment)."""
        return self._used

    # -- the Tier interface -------------------------------------------------

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [self._backend.contains(self._lmc_key(k)) for k in keys]

    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | memoryview | None]:
        with self._lock:
            return [self._copy_out(r) for r in requests]

    def _copy_out(self, r: ReadRequest) -> bytes | None:
        obj = self._backend.get_blocking(self._lmc_key(r.key))  # takes a reference
        if obj is None:
            return None
        try:
            return bytes(obj.byte_array[r.start : r.end])
        finally:
            obj.ref_count_down()

    def _on_hits(self, keys: Sequence[ChunkKey]) -> None:
        backend = self._backend
        with self._lock, backend.cpu_lock:
            for key in keys:
                lmc_key = self._lmc_key(key)
                if lmc_key in backend.hot_cache:
                    backend.cache_policy.update_on_hit(lmc_key, backend.hot_cache)

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        stored = 0
        evicted: list[Evicted] = []
        with self._lock:
            for key, data in items:
                self._remove(key)  # replace: LMCache keeps the first object under a key
                if self._store(key, data, evicted):
                    stored += 1
        self._forget_all([k for k, _ in items])
        return PutResult(stored, tuple(evicted))

    def _store(self, key: ChunkKey, data: bytes, evicted: list[Evicted]) -> bool:
        """Copy ``data`` into a new LMCache memory object, evicting by LMCache's policy to fit."""
        size = len(data)
        if size == 0 or size > self.settings.capacity_bytes:
            return False  # never a valid object / larger than the whole pool: not admitted
        shape = self._lib.torch.Size([1, 1, size, 1])  # [kv, layer, "tokens" = bytes, dim]
        while True:
            obj = self._backend.allocate(
                shape, self._lib.torch.uint8, fmt=self._lib.fmt, eviction=False
            )
            if obj is not None:
                break
            victim = self._evict_one()
            if victim is None:  # every object is in use by another LMCache user
                return False
            evicted.append(victim)
        try:
            obj.byte_array.cast("B")[:] = data
            self._backend.submit_put_task(self._lmc_key(key), obj)  # the backend takes a reference
        finally:
            obj.ref_count_down()  # ours, from allocate
        self._used += size
        return True

    def _evict_one(self) -> Evicted | None:
        backend = self._backend
        with backend.cpu_lock:
            candidates = backend.cache_policy.get_evict_candidates(
                backend.hot_cache, num_candidates=1
            )
        if not candidates:
            return None
        key = self._our_key(candidates[0])
        data = self._copy_out(ReadRequest(key))
        self._remove(key)
        self._forget(key)
        return Evicted(key, data)

    def _remove(self, key: ChunkKey) -> None:
        lmc_key = self._lmc_key(key)
        obj = self._backend.get_blocking(lmc_key)
        if obj is None:
            return
        size = obj.get_size()
        obj.ref_count_down()
        if self._backend.remove(lmc_key):
            self._used -= size

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._remove(key)
        self._forget_all(keys)

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for lmc_key in self._backend.get_keys():
                self._backend.remove(lmc_key)
            self._used = 0
            if self._backend.batched_msg_sender is not None:
                self._backend.batched_msg_sender.close()
            self._allocator.close()
