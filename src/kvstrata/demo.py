"""A store/load round trip through the embedded tiers, with no servers.

What ``kvstrata demo`` runs: random KV in SmolLM2-135M's geometry is encoded
into chunk objects, put into each tier, read back whole and layer by layer,
and compared bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstrata import format as fmt
from kvstrata.compression.base import Geometry, IdentityCodec
from kvstrata.keys import Namespace, chunk_keys
from kvstrata.tiers.base import Hit, Tier
from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.memory import MemoryTier

# SmolLM2-135M: 30 layers, 3 KV heads, head dim 64.
LAYERS, KV_HEADS, HEAD_DIM, CHUNK = 30, 3, 64, 256


@dataclass(frozen=True)
class RoundTrip:
    tier: str
    put_mbps: float
    get_mbps: float
    exact: bool


def make_chunks(n_chunks: int, seed: int = 0) -> tuple[list[bytes], list[list[np.ndarray]]]:
    """``n_chunks`` encoded objects of random fp32 KV, and the KV they hold."""
    rng = np.random.default_rng(seed)
    namespace = Namespace("smollm2-135m-demo", "float32")
    tokens = rng.integers(0, 49152, size=n_chunks * CHUNK)
    codec, geometry = IdentityCodec(), Geometry(CHUNK, KV_HEADS, HEAD_DIM, "float32")
    objects, kvs = [], []
    for key in chunk_keys(tokens, namespace, CHUNK):
        layers = [rng.standard_normal(geometry.shape, dtype=np.float32) for _ in range(LAYERS)]
        meta = fmt.ObjectMeta(codec.id, "float32", CHUNK, KV_HEADS, HEAD_DIM, namespace.fingerprint, key.digest)
        objects.append((key, fmt.encode(meta, [codec.encode(kv) for kv in layers])))
        kvs.append(layers)
    return objects, kvs


async def round_trip(
    n_chunks: int, directory: Path, progress: Callable[..., Iterable] = lambda it, **_: it
) -> list[RoundTrip]:
    objects, kvs = make_chunks(n_chunks)
    total = sum(len(o) for _, o in objects)
    tiers: list[Tier] = [MemoryTier("memory", capacity_bytes=2 * total), DiskTier("disk", directory)]
    codec = IdentityCodec()
    rows = []
    for tier in progress(tiers, description="round trip"):
        t0 = time.perf_counter()
        await tier.put(objects)
        t1 = time.perf_counter()
        fetched = await tier.get([k for k, _ in objects])
        halves = await tier.get([k for k, _ in objects], layers=range(LAYERS // 2, LAYERS))
        t2 = time.perf_counter()
        exact = True
        for got, half, layers in zip(fetched, halves, kvs):
            if not (isinstance(got, Hit) and isinstance(half, Hit)):
                exact = False
                continue
            geometry = Geometry(CHUNK, KV_HEADS, HEAD_DIM, "float32")
            for layer, kv in enumerate(layers):
                exact &= np.array_equal(codec.decode(got.obj.layers[layer], geometry), kv)
                if layer >= LAYERS // 2:
                    exact &= np.array_equal(codec.decode(half.obj.layers[layer], geometry), kv)
        await tier.close()
        rows.append(RoundTrip(tier.name, total / (t1 - t0) / 1e6, 1.5 * total / (t2 - t1) / 1e6, exact))
    return rows
