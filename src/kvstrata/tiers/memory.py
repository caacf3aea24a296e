"""DRAM tier: a byte-capacity pool of encoded objects in this process.

Objects are kept as the immutable ``bytes`` they were put with (a
``bytearray`` or view is copied once into ``bytes``), so nothing can change
them afterwards. That is why the pool verifies each object once
(:class:`kvstrata.format.Verified`), and not at every get: gets hand out
fresh zero-copy views of sections already checked, and a view stays valid
after eviction. Once, and soon after the put, on the tier's own thread: a put
returns after a dict insert, and the keyed hash (~1 ms per 6 MB object) is
off the hit path, where it used to be paid by the first read (a 4K-token hit
of 31 objects waited ~31 ms for it). A get that comes before that thread
verifies the object itself (the same answer). An object that fails
verification stays stored (a tier stores whatever it is given); every get of
it is the same :class:`Miss` (``corrupt``, ``foreign`` or ``unsupported``)
that verifying at get time gives, and a range that avoids a damaged section
is still served, as in the other tiers.

On a GPU build the connector copies pages into pinned staging buffers; this
pool holds the encoded objects behind them.

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

from kvstrata import format as fmt
from kvstrata.keys import ChunkKey
from kvstrata.sizes import ByteCount
from kvstrata.tiers.base import (
    Evicted,
    Fetch,
    Hit,
    Miss,
    PutResult,
    Tier,
    TierSettings,
    _miss_for,
    register,
)
from kvstrata.tiers.eviction import make_policy
from kvstrata.workers import Workers, WorkersBusy

#: objects waiting for the verifying thread; past this, puts leave them to their first read
VERIFY_QUEUE = 256


class _Entry:
    """A stored object: immutable bytes, verified the first time they are read."""

    __slots__ = ("data", "_verdict")

    def __init__(self, data: bytes):
        self.data = data
        # None until first read; then the Verified object, or the header's FormatError.
        self._verdict: fmt.Verified | fmt.FormatError | None = None

    def verdict(self, keyring) -> fmt.Verified | fmt.FormatError:
        verdict = self._verdict
        if verdict is None:  # two first verifications at once: same answer, no harm
            verdict = self._verdict = _verify(self.data, keyring)
        return verdict

    def fetch(self, key: ChunkKey, layers: range | None, keyring) -> Fetch:
        """What verifying ``data`` now would give, with the checks in the same order."""
        verdict = self.verdict(keyring)
        if isinstance(verdict, fmt.FormatError):
            return _miss_for(key, verdict)
        try:
            obj = verdict.read(layers)
        except fmt.FormatError as exc:
            return _miss_for(key, exc)
        if obj.meta.key != key.digest:
            return Miss(key, "foreign", "object names another chunk key")
        return Hit(key, obj)


def _verify(data: bytes, keyring) -> fmt.Verified | fmt.FormatError:
    try:
        return fmt.Verified(data, keyring)
    except fmt.FormatError as exc:
        return exc


class MemorySettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_MEMORY_", frozen=True, extra="forbid")

    capacity_bytes: ByteCount = Field(
        default=4 << 30, gt=0, le=1 << 46, description="bytes of encoded KV to hold"
    )
    eviction: Literal["lru", "s3fifo"] = "s3fifo"


@register
class MemoryTier(Tier):
    kind = "memory"
    settings_class = MemorySettings
    prior_latency_ms = 0.02
    prior_bandwidth_mbps = 20000
    default_timeout_ms = 1000
    hit_source = "HOST"
    process_local = True

    def __init__(
        self, name: str = "memory", capacity_bytes: int = 4 << 30, eviction: str = "s3fifo"
    ):
        super().__init__(name)
        self.capacity_bytes = capacity_bytes
        self._objects: dict[ChunkKey, _Entry] = {}
        self._used = 0
        self._policy = make_policy(eviction, capacity_bytes)
        self._lock = threading.Lock()
        self._verifier = Workers(f"memory-{name}-verify", 1, max_queued=VERIFY_QUEUE)

    @classmethod
    def from_settings(cls, name: str, settings: MemorySettings) -> MemoryTier:
        return cls(name, settings.capacity_bytes, settings.eviction)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._objects)

    def use_keyring(self, keyring) -> None:
        super().use_keyring(keyring)
        with self._lock:  # verdicts were reached under another keyring
            for entry in self._objects.values():
                entry._verdict = None

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._objects for k in keys]

    async def get(self, keys: Sequence[ChunkKey], layers: range | None = None) -> list[Fetch]:
        """Fresh views of sections verified once (on the first read of each object)."""
        with self._lock:
            entries = [self._objects.get(k) for k in keys]
        results = [
            Miss(k) if e is None else e.fetch(k, layers, self.keyring)
            for k, e in zip(keys, entries, strict=True)
        ]
        with self._lock:
            for r in results:
                if isinstance(r, Hit):
                    self._policy.touch(r.key)
        return results

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        entries = [
            (key, _Entry(bytes(data)))
            for key, data in items
            if len(data) <= self.capacity_bytes  # larger than the whole pool: not admitted
        ]
        evicted: list[Evicted] = []
        with self._lock:
            for key, entry in entries:
                size = len(entry.data)
                self._drop(key)
                while self._used + size > self.capacity_bytes:
                    victim = self._policy.victim()
                    data = self._objects.pop(victim).data  # type: ignore[call-overload]
                    self._used -= len(data)
                    evicted.append(Evicted(victim, data))  # type: ignore[arg-type]
                self._objects[key] = entry
                self._used += size
                self._policy.insert(key, size)
        for _, entry in entries:
            try:
                self._verifier.submit(entry.verdict, self.keyring)
            except WorkersBusy:  # a burst of puts: the first read verifies these
                break
        return PutResult(len(entries), tuple(evicted))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def _drop(self, key: ChunkKey) -> None:
        entry = self._objects.pop(key, None)
        if entry is not None:
            self._used -= len(entry.data)
            self._policy.remove(key)

    async def close(self) -> None:
        with self._lock:
            self._objects.clear()
            self._used = 0
