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
    kvs, keys, namespace = _random_kv(n_chunks, seed)
    return _encode(kvs, keys, namespace), kvs


def _random_kv(n_chunks: int, seed: int):
    rng = np.random.default_rng(seed)
    namespace = Namespace("smollm2-135m-demo", "float32")
    tokens = rng.integers(0, 49152, size=n_chunks * CHUNK)
    shape = Geometry(CHUNK, KV_HEADS, HEAD_DIM, "float32").shape
    keys = chunk_keys(tokens, namespace, CHUNK)
    kvs = [[rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)] for _ in keys]
    return kvs, keys, namespace


def _encode(kvs, keys, namespace) -> list[tuple]:
    codec = IdentityCodec()
    objects = []
    for key, layers in zip(keys, kvs, strict=True):
        meta = fmt.ObjectMeta(
            codec.id, "float32", CHUNK, KV_HEADS, HEAD_DIM, namespace.fingerprint, key.digest
        )
        objects.append((key, fmt.encode(meta, [codec.encode(kv) for kv in layers])))
    return objects


def _decode(fetched, layers: range) -> list[dict[int, np.ndarray] | None]:
    codec, geometry = IdentityCodec(), Geometry(CHUNK, KV_HEADS, HEAD_DIM, "float32")
    return [
        {layer: codec.decode(got.obj.layers[layer], geometry) for layer in layers}
        if isinstance(got, Hit)
        else None
        for got in fetched
    ]


async def round_trip(
    n_chunks: int, directory: Path, progress: Callable[..., Iterable] = lambda it, **_: it
) -> list[RoundTrip]:
    """Per tier: save (encode + put) and load (get + decode, whole objects and a layer range) rates.

    Rates count the KV bytes moved through the whole path, encoding and
    decoding included: a memory put alone only keeps a reference to the bytes
    and would show a rate that means nothing.
    """
    kvs, keys, namespace = _random_kv(n_chunks, 0)
    total = sum(kv.nbytes for layers in kvs for kv in layers)
    tiers: list[Tier] = [
        MemoryTier("memory", capacity_bytes=4 * total),
        DiskTier("disk", directory),
    ]
    rows = []
    for tier in progress(tiers, description="round trip"):
        t0 = time.perf_counter()
        await tier.put(_encode(kvs, keys, namespace))
        t1 = time.perf_counter()
        whole = _decode(await tier.get(keys), range(LAYERS))
        half = _decode(
            await tier.get(keys, layers=range(LAYERS // 2, LAYERS)), range(LAYERS // 2, LAYERS)
        )
        t2 = time.perf_counter()
        exact = all(
            got is not None
            and part is not None
            and all(np.array_equal(got[layer], kv) for layer, kv in enumerate(layers))
            and all(np.array_equal(part[layer], layers[layer]) for layer in part)
            for got, part, layers in zip(whole, half, kvs, strict=True)
        )
        await tier.close()
        rows.append(
            RoundTrip(tier.name, total / (t1 - t0) / 1e6, 1.5 * total / (t2 - t1) / 1e6, exact)
        )
    return rows
