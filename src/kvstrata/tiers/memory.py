"""DRAM tier: a byte-capacity pool of encoded objects in this process.

Objects are kept as the immutable ``bytes`` they were put with, so a get is a
zero-copy slice and a view handed out stays valid after eviction. On a GPU
build the connector copies pages into pinned staging buffers; this pool holds
the encoded objects behind them.

Eviction is by bytes, with the policy from settings (``lru`` or the
scan-resistant ``s3fifo``). ``put`` returns what it evicted, data included,
so the orchestrator can demote it to a lower tier.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvstrata.keys import ChunkKey
from kvstrata.tiers.base import (
    Evicted,
    PutResult,
    RangedTier,
    ReadRequest,
    TierSettings,
    register,
)
from kvstrata.tiers.eviction import make_policy


class MemorySettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_MEMORY_", frozen=True, extra="forbid")

    capacity_bytes: int = Field(default=4 << 30, gt=0, description="bytes of encoded KV to hold")
    eviction: Literal["lru", "s3fifo"] = "s3fifo"


@register
class MemoryTier(RangedTier):
    kind = "memory"
    settings_class = MemorySettings

    def __init__(self, name: str = "memory", capacity_bytes: int = 4 << 30, eviction: str = "s3fifo"):
        super().__init__(name)
        self.capacity_bytes = capacity_bytes
        self._objects: dict[ChunkKey, bytes] = {}
        self._used = 0
        self._policy = make_policy(eviction, capacity_bytes)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, name: str, settings: MemorySettings) -> MemoryTier:
        return cls(name, settings.capacity_bytes, settings.eviction)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._objects)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._objects for k in keys]

    async def _read(self, requests: Sequence[ReadRequest]) -> list[memoryview | None]:
        out: list[memoryview | None] = []
        with self._lock:
            for r in requests:
                data = self._objects.get(r.key)
                if data is None:
                    out.append(None)
                    continue
                out.append(memoryview(data)[r.start : r.end])
        return out

    def _on_hits(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.touch(key)

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        evicted: list[Evicted] = []
        stored = 0
        with self._lock:
            for key, data in items:
                if len(data) > self.capacity_bytes:
                    continue  # larger than the whole pool: not admitted
                self._drop(key)
                while self._used + len(data) > self.capacity_bytes:
                    victim = self._policy.victim()
                    evicted.append(Evicted(victim, self._objects.pop(victim)))  # type: ignore[arg-type]
                    self._used -= len(evicted[-1].data)  # type: ignore[arg-type]
                self._objects[key] = bytes(data)
                self._used += len(data)
                self._policy.insert(key, len(data))
                stored += 1
        self._forget_all([k for k, _ in items])
        return PutResult(stored, tuple(evicted))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)
        self._forget_all(keys)

    def _drop(self, key: ChunkKey) -> None:
        data = self._objects.pop(key, None)
        if data is not None:
            self._used -= len(data)
            self._policy.remove(key)

    async def close(self) -> None:
        with self._lock:
            self._objects.clear()
            self._used = 0
