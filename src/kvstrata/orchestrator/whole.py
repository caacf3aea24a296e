"""Whole objects by key: what a corpus stores (documents' KV, its manifest).

The same path as chunks: every tier call goes through the call wrapper
(:mod:`.calls`: breaker, timeout, per-tier metrics, error mapping), objects
are encoded with the orchestrator's keyring and codecs (:mod:`.objects`),
and what a tier returns is checked once against what the reader expects
(:class:`~kvstrata.orchestrator.objects.Expected`); a bad object is counted
and dropped like a bad chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from kvstrata import format as fmt
from kvstrata.compression.base import Geometry
from kvstrata.keys import ChunkKey
from kvstrata.orchestrator.calls import Failed, Ok, TierCalls
from kvstrata.orchestrator.objects import ChunkObjects, Expected
from kvstrata.telemetry.metrics import Telemetry
from kvstrata.tiers.base import Hit


class StoreFailed(OSError):
    """A tier did not take an object (skipped by its breaker, timed out, or failed)."""


class WholeObjects:
    def __init__(self, calls: TierCalls, objects: ChunkObjects, telemetry: Telemetry):
        self.calls, self.objects, self.telemetry = calls, objects, telemetry

    async def fetch(
        self, tiers: Sequence[str], keys: Sequence[ChunkKey], expected: Expected | None = None
    ) -> list[fmt.ChunkObject | None]:
        """Whole objects, each from the first of ``tiers`` holding one that fits; None where
        none does. A tier that fails is a miss for its keys; the next tier is asked."""
        out: list[fmt.ChunkObject | None] = [None] * len(keys)
        for tier in tiers:
            todo = [i for i, o in enumerate(out) if o is None]
            if not todo:
                break
            wanted = [keys[i] for i in todo]
            got = await self.calls.call(tier, "get", lambda t, w=wanted: t.get(w))
            if not isinstance(got, Ok):
                continue
            for i, result in zip(todo, got.value, strict=True):
                out[i] = self._usable(tier, keys[i], result, expected)
        return out

    def _usable(self, tier: str, key: ChunkKey, result, expected: Expected | None):
        if not isinstance(result, Hit):
            if result.reason != "absent":
                self.calls.reject(tier, key, result.reason)
            self.telemetry.op(tier, "read_object", "miss")
            return None
        if expected is not None and not expected.fits(result.obj):
            self.calls.reject(tier, key, "foreign")
            return None
        self.telemetry.op(tier, "read_object", "hit")
        self.telemetry.moved_bytes(tier, "read", result.obj.header.object_len)
        return result.obj

    async def holds(self, tiers: Sequence[str], key: ChunkKey) -> bool:
        """Whether any of ``tiers`` holds ``key`` (a tier that fails does not)."""
        for tier in tiers:
            answer = await self.calls.call(tier, "contains", lambda t: t.contains([key]))
            if isinstance(answer, Ok) and answer.value[0]:
                return True
        return False

    async def store(
        self, tier: str, key: ChunkKey, meta: fmt.ObjectMeta, sections: Sequence[bytes]
    ) -> None:
        """Write one object (encoded here, off the loop); raises :class:`StoreFailed`."""
        keyring = self.objects.keyring
        blob = await asyncio.to_thread(fmt.encode, meta, list(sections), keyring)
        done = await self.calls.put(tier, [(key, blob)])
        if isinstance(done, Failed):
            raise StoreFailed(f"tier {tier!r} did not store {key}: {done.outcome}")
        self.telemetry.moved_bytes(tier, "write", len(blob))

    async def store_kv(
        self, tier: str, key: ChunkKey, namespace: bytes, kv: np.ndarray, codec_id: str = "none"
    ) -> None:
        """Write KV ``[n_layers, 2, T, H, D]`` (any ``T``) under ``key`` with a codec."""
        m = self.objects.model
        if (
            kv.shape[0] != m.n_layers
            or kv.shape[1] != 2
            or kv.shape[3:] != (m.kv_heads, m.head_dim)
        ):
            raise ValueError(f"KV shaped {kv.shape} does not fit {m}")
        kv = np.ascontiguousarray(kv, dtype=m.dtype)
        codec = self.objects.codec(codec_id)
        meta = fmt.ObjectMeta(
            codec_id, m.dtype, kv.shape[2], m.kv_heads, m.head_dim, namespace, key.digest
        )
        sections = [codec.encode(kv[layer], layer) for layer in range(m.n_layers)]
        await self.store(tier, key, meta, sections)

    def layer(self, obj: fmt.ChunkObject, layer: int, codec_id: str = "none") -> np.ndarray:
        """One layer of a fetched KV object, ``[2, T, H, D]``, decoded with the reader's codec
        (``fetch`` with an :class:`Expected` checked that the header names it)."""
        m = self.objects.model
        geometry = Geometry(obj.meta.n_tokens, m.kv_heads, m.head_dim, m.dtype)
        return self.objects.codec(codec_id).decode(obj.layers[layer], geometry)
