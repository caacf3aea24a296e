"""Tier throughput and latency against each backend's raw ceiling, side by side.

Usage::

    .venv/bin/python benchmarks/tiers.py [--quick] [--out benchmarks/results/tiers.json]
    .venv/bin/python benchmarks/tiers.py --s3 rgw --rows s3-obstore,s3-aioboto3  # Ceph RGW

Starts its own Redis and SeaweedFS (or, with ``--s3 rgw``, a single-node Ceph RGW
from scripts/rgw.sh) (kvstrata.testing.services; stopped at the end, also on
error or SIGTERM), then for each object size (256 KiB, 1 MiB,
4 MiB; a real ``fmt.encode`` object of 32 equal layers) measures, for every row:

=========== ==============================================================
row         raw ceiling ("raw" side), measured in the same rounds
=========== ==============================================================
memory      a plain copy of the same bytes (``bytearray(obj)``)
lmcache     LMCache's LocalCPUBackend used directly: allocate, copy in,
            submit_put_task / get_blocking, one copy out (same pool size)
disk        ``open().write()`` / ``open().read()`` in a thread (``asyncio.to_thread``)
redis       redis-py asyncio SET / GET / GETRANGE, same BlockingConnectionPool settings
s3-obstore  obstore put_async / get_async / get_range_async, same S3Store settings
s3-aioboto3 aioboto3 put_object / get_object (+ Range), same botocore Config
s3-nixl     NIXL's OBJ plugin used directly: one agent, a registered buffer per
            op in flight, one OBJ registration per key, lengths known
=========== ==============================================================

Objects are format v2: keyed BLAKE3 MACs (a deployment secret, per-namespace
keys), verified on every get (once per object in ``memory``). Rows with a
``-v1`` suffix (``memory-v1``, ``redis-v1``, ``s3-obstore-v1``, ...; not in the
default set) store the same sections as format v1 objects (xxh3 checksums, no
MAC) in the same rounds: the MAC's cost on the hit path is the difference.

Operations, each with ``--concurrency`` (8) tasks in flight and one object per call:

* ``put``: ``tier.put([(key, obj)])`` vs the raw write of the same bytes;
* ``get``: ``tier.get([key])`` (whole object, verified) vs the raw read;
* ``get_layers``: ``tier.get([key], layers=range(0, L//2))`` vs a raw ranged read of
  exactly those bytes; MB/s counts the bytes of the layers delivered. The tier's
  header cache is warm (the warm-up round fills it), which is the steady state of
  a cache that serves the same chunks repeatedly.

Gets read a fixed set of keys stored before timing; puts write a separate set, so a
put never invalidates what the gets read. Every round runs every (row, op) as a
tier phase and a raw phase back to back, alternating which goes first, so machine
noise (2 shared cores: client, Redis and SeaweedFS) hits both sides alike. The
operations per phase are calibrated (the same count for a tier and its ceiling,
from their mean speed in the previous round) so that each phase lasts about
``phase_seconds``: a fixed byte count would make in-memory phases last
milliseconds and S3 phases seconds. Throughput is pooled over rounds (bytes /
seconds); latency percentiles pool every operation; ``ratio`` is tier / raw pooled
throughput (the JSON also has the per-round paired ratios, their median and range).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.tiers
    import _common as common
except ImportError:  # pragma: no cover
    from benchmarks import _common as common

from kvstrata import format as fmt
from kvstrata.auth import Keyring
from kvstrata.keys import ChunkKey, Namespace, chunk_keys
from kvstrata.testing import services
from kvstrata.tiers.base import Hit, Tier, create_tier

SIZES = (256 << 10, 1 << 20, 4 << 20)
N_LAYERS = 32
OPS = ("put", "get", "get_layers")
ROWS = ("memory", "lmcache", "disk", "redis", "s3-obstore", "s3-aioboto3", "s3-nixl")
V1 = "-v1"  # a row's suffix: the same tier, format v1 objects (checksums, no MAC)
ACCEPT_SIZE = 1 << 20
ACCEPT_RATIO = 0.8
NAMESPACE = Namespace("bench-tiers", "float16")
# A deployment secret, as with ``KVSTRATA_SECRET`` set; v1 objects readable for --format 1.
KEYRING = Keyring(b"kvstrata-benchmark-secret-not-for-production", allow_unauthenticated=True)
PACKAGES = (
    "numpy",
    "obstore",
    "redis",
    "hiredis",
    "aioboto3",
    "aiobotocore",
    "botocore",
    "xxhash",
    "rich",
    "lmcache",
    "nixl-cu12",
    "torch",
)
# One set of backend settings, given to the tier AND to its raw ceiling.
MEMORY_CAPACITY = 4 << 30
LMCACHE_CAPACITY = 256 << 20  # LMCache allocates its pool at start; holds a size's two key sets
DISK_CAPACITY = 64 << 30
TIMEOUT_S = 10.0
S3_MAX_RETRIES = 2
S3_MAX_CONCURRENCY = 32
REDIS_MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class Profile:
    rounds: int  # measured rounds (plus one unmeasured warm-up round that calibrates)
    phase_seconds: float  # target duration of one (row, op, side) phase
    min_ops: int  # per phase, however slow the backend
    max_ops: int  # per phase, however fast
    warmup_ops: int


PROFILES = {
    "full": Profile(rounds=7, phase_seconds=0.35, min_ops=24, max_ops=20_000, warmup_ops=32),
    "quick": Profile(rounds=3, phase_seconds=0.1, min_ops=16, max_ops=5_000, warmup_ops=16),
}


# -- the objects ------------------------------------------------------------


@dataclass
class Workload:
    """The objects of one size: a get set (stored before timing) and a put set."""

    target: int
    get_keys: list[ChunkKey]
    put_keys: list[ChunkKey]
    objects: dict[ChunkKey, bytes]
    sections: list[bytes]
    objects_v1: dict[ChunkKey, bytes]
    object_len: int
    layers: range
    layer_lo: int
    layer_hi: int

    @property
    def layer_bytes(self) -> int:
        return self.layer_hi - self.layer_lo

    @property
    def all_keys(self) -> list[ChunkKey]:
        return self.get_keys + self.put_keys


def build_workload(target: int, n_keys: int, seed: int) -> Workload:
    """``2 * n_keys`` encoded objects of about ``target`` bytes, each naming its own key.

    Meta is a realistic fp16 geometry (8 KV heads x 128 dims: 4 KiB per token per
    layer); the sections are random bytes (KV does not compress well either).
    ``objects`` are format v2 (keyed BLAKE3 MACs, :data:`KEYRING`), ``objects_v1`` the same
    sections as format v1 (xxh3 checksums), for the ``-v1`` rows.
    """
    rng = np.random.default_rng(seed)
    keys = chunk_keys(rng.integers(0, 50_000, size=16 * 2 * n_keys), NAMESPACE, 16)
    probe = fmt.ObjectMeta("none", "float16", 1, 8, 128, NAMESPACE.fingerprint, keys[0].digest)
    header_len = fmt.decode_header(
        fmt.encode(probe, [b"x"] * N_LAYERS, KEYRING), KEYRING
    ).header_len
    section = (target - header_len) // N_LAYERS
    sections = [rng.bytes(section) for _ in range(N_LAYERS)]
    objects, objects_v1 = {}, {}
    for key in keys:
        meta = fmt.ObjectMeta(
            "none", "float16", max(1, section // 4096), 8, 128, NAMESPACE.fingerprint, key.digest
        )
        objects[key] = fmt.encode(meta, sections, KEYRING)
        objects_v1[key] = fmt.encode(meta, sections, version=1)
    header = fmt.decode_header(objects[keys[0]], KEYRING)
    layers = range(0, N_LAYERS // 2)
    lo, hi = header.byte_range(layers)
    return Workload(
        target,
        keys[:n_keys],
        keys[n_keys:],
        objects,
        sections,
        objects_v1,
        header.object_len,
        layers,
        lo,
        hi,
    )


# -- the two sides of a row -------------------------------------------------


class Side:
    """One way of storing objects. ``put``/``get``/``get_layers`` return the bytes they moved."""

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        raise NotImplementedError

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        raise NotImplementedError

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        raise NotImplementedError

    async def delete(self, keys: list[ChunkKey]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class TierSide(Side):
    def __init__(self, tier: Tier, version: int = fmt.VERSION):
        self.tier, self.version = tier, version
        tier.use_keyring(KEYRING)

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = (wl.objects if self.version == fmt.VERSION else wl.objects_v1)[key]
        result = await self.tier.put([(key, data)])
        if result.stored != 1:
            raise RuntimeError(f"{self.tier.name}: put stored {result.stored}")
        return len(data)

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        (fetch,) = await self.tier.get([key])
        if not isinstance(fetch, Hit):
            raise RuntimeError(f"{self.tier.name}: get {key} -> {fetch}")
        return wl.object_len

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        (fetch,) = await self.tier.get([key], layers=wl.layers)
        if not isinstance(fetch, Hit) or len(fetch.obj.layers) != len(wl.layers):
            raise RuntimeError(f"{self.tier.name}: get layers {key} -> {fetch}")
        return wl.layer_bytes

    async def check(self, wl: Workload, key: ChunkKey) -> None:
        """Fail unless a whole get and a layer get return exactly the sections that were put."""
        (whole,) = await self.tier.get([key])
        (part,) = await self.tier.get([key], layers=wl.layers)
        for fetch, layers in ((whole, range(N_LAYERS)), (part, wl.layers)):
            if not isinstance(fetch, Hit) or sorted(fetch.obj.layers) != list(layers):
                raise RuntimeError(f"{self.tier.name}: check {key} -> {fetch}")
            if any(bytes(fetch.obj.layers[i]) != wl.sections[i] for i in layers):
                raise RuntimeError(f"{self.tier.name}: check {key}: wrong section bytes")

    async def delete(self, keys: list[ChunkKey]) -> None:
        await self.tier.delete(keys)

    async def close(self) -> None:
        await self.tier.close()


class RawMemory(Side):
    """The ceiling for an in-process pool: one plain copy of the bytes."""

    def __init__(self) -> None:
        self._store: dict[ChunkKey, bytearray] = {}

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        self._store[key] = buf = bytearray(wl.objects[key])
        return len(buf)

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        return len(bytearray(self._store[key]))

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        return len(bytearray(memoryview(self._store[key])[wl.layer_lo : wl.layer_hi]))

    async def delete(self, keys: list[ChunkKey]) -> None:
        for key in keys:
            self._store.pop(key, None)


class RawDisk(Side):
    """Plain open()/write() and open()/read() of one file per key, in a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: ChunkKey) -> Path:
        return self.root / f"{key}.bin"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    @staticmethod
    def _read(path: Path, start: int = 0, end: int | None = None) -> bytes:
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - start)

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = wl.objects[key]
        await asyncio.to_thread(self._write, self._path(key), data)
        return len(data)

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        return len(await asyncio.to_thread(self._read, self._path(key)))

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        path = self._path(key)
        return len(await asyncio.to_thread(self._read, path, wl.layer_lo, wl.layer_hi))

    async def delete(self, keys: list[ChunkKey]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


class RawRedis(Side):
    """redis-py asyncio SET/GET/GETRANGE with the tier's pool settings (blocking pool, timeouts)."""

    def __init__(self, url: str, prefix: str, ttl_s: int | None):
        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=TIMEOUT_S,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self.prefix, self.ttl = prefix, ttl_s

    def _name(self, key: ChunkKey) -> str:
        return self.prefix + str(key)

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = wl.objects[key]
        await self._client.set(self._name(key), data, ex=self.ttl)
        return len(data)

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        return len(await self._client.get(self._name(key)))

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        name = self._name(key)
        return len(await self._client.getrange(name, wl.layer_lo, wl.layer_hi - 1))

    async def delete(self, keys: list[ChunkKey]) -> None:
        if keys:
            await self._client.delete(*(self._name(k) for k in keys))

    async def close(self) -> None:
        await self._client.aclose()


def s3_store(server):
    """An obstore S3Store configured like kvstrata's ObstoreTransport with this run's settings."""
    from obstore.store import S3Store

    return S3Store(
        server.bucket,
        config={
            "region": services.REGION,
            "virtual_hosted_style_request": False,
            "endpoint": server.endpoint,
            "access_key_id": server.access_key,
            "secret_access_key": server.secret_key,
        },
        client_options={
            "allow_http": True,
            "timeout": timedelta(seconds=TIMEOUT_S),
            "connect_timeout": timedelta(seconds=min(TIMEOUT_S, 5.0)),
        },
        retry_config={
            "max_retries": S3_MAX_RETRIES,
            "retry_timeout": timedelta(seconds=TIMEOUT_S),
            "backoff": {
                "init_backoff": timedelta(milliseconds=50),
                "max_backoff": timedelta(seconds=1),
            },
        },
    )


class RawObstore(Side):
    def __init__(self, store, prefix: str) -> None:
        import obstore

        self._ob, self._store, self.prefix = obstore, store, prefix

    def _path(self, key: ChunkKey) -> str:
        return self.prefix + str(key)

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = wl.objects[key]
        await self._ob.put_async(self._store, self._path(key), data, use_multipart=False)
        return len(data)

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        result = await self._ob.get_async(self._store, self._path(key))
        return memoryview(await result.bytes_async()).nbytes

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        data = await self._ob.get_range_async(
            self._store, self._path(key), start=wl.layer_lo, end=wl.layer_hi
        )
        return memoryview(data).nbytes

    async def delete(self, keys: list[ChunkKey]) -> None:
        if keys:
            await self._ob.delete_async(self._store, [self._path(k) for k in keys])


class RawAioboto3(Side):
    """aioboto3 put_object/get_object with the botocore Config kvstrata's Aioboto3Transport uses."""

    def __init__(self, server, prefix: str):
        self.server, self.bucket, self.prefix = server, server.bucket, prefix
        self._stack = contextlib.AsyncExitStack()
        self._client = None

    async def open(self) -> RawAioboto3:
        import aioboto3
        from botocore.config import Config

        self._client = await self._stack.enter_async_context(
            aioboto3.Session().client(
                "s3",
                endpoint_url=self.server.endpoint,
                region_name=services.REGION,
                aws_access_key_id=self.server.access_key,
                aws_secret_access_key=self.server.secret_key,
                config=Config(
                    s3={"addressing_style": "path"},
                    connect_timeout=min(TIMEOUT_S, 5.0),
                    read_timeout=TIMEOUT_S,
                    retries={"max_attempts": S3_MAX_RETRIES + 1, "mode": "standard"},
                    max_pool_connections=S3_MAX_CONCURRENCY,
                ),
            )
        )
        return self

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = wl.objects[key]
        await self._client.put_object(Bucket=self.bucket, Key=self.prefix + str(key), Body=data)
        return len(data)

    async def _get(self, key: ChunkKey, **kwargs) -> int:
        response = await self._client.get_object(
            Bucket=self.bucket, Key=self.prefix + str(key), **kwargs
        )
        async with response["Body"] as body:
            return len(await body.read())

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        return await self._get(key)

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        return await self._get(key, Range=f"bytes={wl.layer_lo}-{wl.layer_hi - 1}")

    async def delete(self, keys: list[ChunkKey]) -> None:
        if keys:
            objects = [{"Key": self.prefix + str(k)} for k in keys]
            await self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})

    async def close(self) -> None:
        await self._stack.aclose()


class RawLMCache(Side):
    """LMCache's own CPU backend, used the way its storage manager does, with no kvstrata code:
    allocate (LMCache's eviction), copy in, ``submit_put_task``; ``get_blocking``, one copy out."""

    def __init__(self, capacity: int) -> None:
        import torch
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.memory_allocators.mixed_memory_allocator import MixedMemoryAllocator
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        config = LMCacheEngineConfig.from_defaults(
            chunk_size=256, local_cpu=True, max_local_cpu_size=capacity / (1 << 30)
        )
        self._allocator = MixedMemoryAllocator(capacity)
        self._backend = LocalCPUBackend(config, metadata=None, memory_allocator=self._allocator)
        self._torch, self._fmt, self._Key = torch, MemoryFormat.KV_2LTD, CacheEngineKey

    def _key(self, key: ChunkKey):
        return self._Key("raw", 1, 0, int.from_bytes(key.digest, "big"), self._torch.uint8)

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = wl.objects[key]
        self._backend.remove(self._key(key))
        obj = self._backend.allocate(
            self._torch.Size([1, 1, len(data), 1]),
            self._torch.uint8,
            fmt=self._fmt,
            busy_loop=False,
        )
        obj.byte_array.cast("B")[:] = data
        self._backend.submit_put_task(self._key(key), obj)
        obj.ref_count_down()
        return len(data)

    async def _read(self, key: ChunkKey, lo: int, hi: int | None) -> int:
        obj = self._backend.get_blocking(self._key(key))
        try:
            return len(bytes(obj.byte_array[lo:hi]))
        finally:
            obj.ref_count_down()

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        return await self._read(key, 0, None)

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        return await self._read(key, wl.layer_lo, wl.layer_hi)

    async def delete(self, keys: list[ChunkKey]) -> None:
        for key in keys:
            self._backend.remove(self._key(key))

    async def close(self) -> None:
        for key in self._backend.get_keys():
            self._backend.remove(key)
        self._allocator.close()


class RawNixl(Side):
    """NIXL's OBJ plugin with no kvstrata code: one agent, ``concurrency`` DRAM buffers
    registered up front, one OBJ registration per key, object lengths known (no HEAD).
    Deletes (not timed) go through obstore: the OBJ plugin has no DELETE."""

    def __init__(self, server, prefix: str, concurrency: int, max_bytes: int) -> None:
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        self.prefix = prefix
        self._agent = agent = nixl_agent(
            f"bench-raw-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=[])
        )
        agent.create_backend(
            "OBJ",
            {
                "bucket": server.bucket,
                "region": services.REGION,
                "use_virtual_addressing": "false",
                "endpoint_override": server.endpoint,
                "scheme": "http",
                "access_key": server.access_key,
                "secret_key": server.secret_key,
            },
        )
        self._bufs = [np.empty(max_bytes, dtype=np.uint8) for _ in range(concurrency)]
        self._reg = agent.register_memory(
            [(b.ctypes.data, b.nbytes, 0, "") for b in self._bufs], "DRAM", backends=["OBJ"]
        )
        self._dev: dict[str, int] = {}
        self._obj_regs: list = []
        self._meta = RawObstore(s3_store(server), prefix)

    def _dev_id(self, path: str) -> int:
        dev = self._dev.get(path)
        if dev is None:
            dev = self._dev[path] = len(self._dev) + 1
            self._obj_regs.append(
                self._agent.register_memory([(0, 0, dev, path)], "OBJ", backends=["OBJ"])
            )
        return dev

    async def _xfer(
        self, op: str, key: ChunkKey, offset: int, n: int, data: bytes | None = None
    ) -> int:
        agent, buf = self._agent, self._bufs.pop()
        try:
            if data is not None:
                buf[:n] = np.frombuffer(data, dtype=np.uint8)
            local = agent.get_xfer_descs([(buf.ctypes.data, n, 0)], "DRAM")
            remote = agent.get_xfer_descs(
                [(offset, n, self._dev_id(self.prefix + str(key)))], "OBJ"
            )
            handle = agent.initialize_xfer(op, local, remote, agent.name, backends=["OBJ"])
            state, delay = agent.transfer(handle), 0.0001
            while state == "PROC":
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.004)
                state = agent.check_xfer_state(handle)
            agent.release_xfer_handle(handle)
            if state != "DONE":
                raise RuntimeError(f"raw NIXL {op} {key}: {state}")
            return (
                len(buf[:n].tobytes()) if data is None else n
            )  # a read copies out, as the tier does
        finally:
            self._bufs.append(buf)

    async def put(self, wl: Workload, key: ChunkKey) -> int:
        data = wl.objects[key]
        return await self._xfer("WRITE", key, 0, len(data), data)

    async def get(self, wl: Workload, key: ChunkKey) -> int:
        return await self._xfer("READ", key, 0, wl.object_len)

    async def get_layers(self, wl: Workload, key: ChunkKey) -> int:
        return await self._xfer("READ", key, wl.layer_lo, wl.layer_bytes)

    async def delete(self, keys: list[ChunkKey]) -> None:
        await self._meta.delete(keys)

    async def close(self) -> None:
        for reg in self._obj_regs:
            self._agent.deregister_memory(reg, backends=["OBJ"])
        self._agent.deregister_memory(self._reg, backends=["OBJ"])


# -- measuring --------------------------------------------------------------


@dataclass
class Samples:
    """Everything measured for one (size, row, op, side), pooled over rounds."""

    nbytes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    round_mbps: list[float] = field(default_factory=list)

    def add(self, nbytes: int, seconds: float, latencies: list[float]) -> None:
        self.nbytes += nbytes
        self.seconds += seconds
        self.latencies += latencies
        self.round_mbps.append(common.mb_per_s(nbytes, seconds))

    @property
    def mbps(self) -> float:
        return common.mb_per_s(self.nbytes, self.seconds)

    def summary(self) -> dict:
        ms = [x * 1e3 for x in self.latencies]
        return {
            "mb_per_s": self.mbps,
            "p50_ms": common.percentile(ms, 50),
            "p99_ms": common.percentile(ms, 99),
            "mean_ms": sum(ms) / len(ms) if ms else math.nan,
            "ops": len(ms),
            "bytes": self.nbytes,
            "seconds": self.seconds,
            "round_mb_per_s": self.round_mbps,
        }


async def run_phase(
    op: Callable[[Workload, ChunkKey], Awaitable[int]],
    wl: Workload,
    keys: list[ChunkKey],
    n_ops: int,
    concurrency: int,
    offset: int,
) -> tuple[int, float, list[float]]:
    """``n_ops`` calls of ``op``, ``concurrency`` in flight: (bytes, wall seconds, latencies)."""
    latencies: list[float] = []
    moved = 0
    next_op = 0

    async def worker() -> None:
        nonlocal moved, next_op
        while next_op < n_ops:
            i = next_op
            next_op += 1
            key = keys[(offset + i) % len(keys)]
            t0 = time.perf_counter()
            n = await op(wl, key)  # not `moved += await ...`: that reads `moved` before the await
            latencies.append(time.perf_counter() - t0)
            moved += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return moved, time.perf_counter() - t0, latencies


def ops_for(profile: Profile, seconds_per_op: float) -> int:
    """Operations that make a phase last about ``profile.phase_seconds`` (wall, all tasks)."""
    wanted = profile.phase_seconds / seconds_per_op if seconds_per_op > 0 else profile.max_ops
    return max(profile.min_ops, min(profile.max_ops, round(wanted)))


def n_keys_for(size: int, concurrency: int) -> int:
    """Keys per set: >= 2x concurrency (no two in-flight ops on one key), ~64 MiB at most."""
    return max(2 * concurrency, min(64, (64 << 20) // size))


# -- the run ----------------------------------------------------------------


async def build_rows(args, redis_server, s3_server, workdir: Path) -> dict[str, tuple[Side, Side]]:
    run_id = uuid.uuid4().hex[:8]
    rows: dict[str, tuple[Side, Side]] = {}
    for row in args.rows:
        kind, version = row.removesuffix(V1), 1 if row.endswith(V1) else fmt.VERSION
        tag = f"{run_id}-{row}"  # each row stores under its own names
        if kind == "memory":
            tier = create_tier("memory", capacity_bytes=MEMORY_CAPACITY)
            rows[row] = (TierSide(tier, version), RawMemory())
        elif kind == "lmcache":
            tier = create_tier("lmcache", capacity_bytes=LMCACHE_CAPACITY)
            rows[row] = (TierSide(tier, version), RawLMCache(LMCACHE_CAPACITY))
        elif kind == "disk":
            tier = create_tier(
                "disk", path=workdir / f"disk-tier-{row}", capacity_bytes=DISK_CAPACITY
            )
            rows[row] = (TierSide(tier, version), RawDisk(workdir / f"disk-raw-{row}"))
        elif kind == "redis":
            tier = create_tier(
                "redis",
                url=redis_server.url,
                key_prefix=f"bench-{tag}:",
                max_connections=REDIS_MAX_CONNECTIONS,
                timeout_s=TIMEOUT_S,
            )
            ttl = tier.settings.ttl_s  # type: ignore[attr-defined]
            rows[row] = (TierSide(tier, version), RawRedis(redis_server.url, f"raw-{tag}:", ttl))
        elif kind.startswith("s3-"):
            transport = kind[3:]
            tier = create_tier(
                "s3",
                name=row,
                endpoint=s3_server.endpoint,
                bucket=s3_server.bucket,
                access_key_id=s3_server.access_key,
                secret_access_key=s3_server.secret_key,
                region=services.REGION,
                transport=transport,
                prefix=f"bench-{tag}/",
                timeout_s=TIMEOUT_S,
                max_retries=S3_MAX_RETRIES,
                max_concurrency=S3_MAX_CONCURRENCY,
            )
            raw_prefix = f"raw-{tag}/"
            if transport == "obstore":
                raw: Side = RawObstore(s3_store(s3_server), raw_prefix)
            elif transport == "nixl":
                max_bytes = max(args.sizes) + (64 << 10)  # the largest object and its header
                raw = RawNixl(s3_server, raw_prefix, args.concurrency, max_bytes)
            else:
                raw = await RawAioboto3(s3_server, raw_prefix).open()
            rows[row] = (TierSide(tier, version), raw)
        else:
            raise ValueError(row)
    return rows


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def measure(args, profile: Profile, rows: dict[str, tuple[Side, Side]]) -> dict:
    """results[size][row][op][side] = Samples, plus per-size ``_ops_per_phase`` and load."""
    results: dict = {}
    rng = random.Random(0)
    for size in args.sizes:
        n_keys = n_keys_for(size, args.concurrency)
        wl = build_workload(size, n_keys, seed=size)
        log(
            f"size {common.human_bytes(size)}: object {wl.object_len} B, "
            f"{n_keys}+{n_keys} keys, {profile.rounds} rounds"
        )
        # Store the get set on every side; check what comes back before timing anything.
        for row, sides in rows.items():
            for side in sides:
                for key in wl.get_keys:
                    await side.put(wl, key)
                if await side.get(wl, wl.get_keys[0]) != wl.object_len:
                    raise RuntimeError(f"{row}: setup read-back has the wrong length")
            await sides[0].check(wl, wl.get_keys[-1])  # type: ignore[attr-defined]
        per_size = results[size] = {
            r: {op: {"tier": Samples(), "raw": Samples()} for op in OPS} for r in rows
        }
        n_ops: dict[tuple[str, str], int] = {}
        ops_log: dict[str, list[int]] = {}
        loads: list[list[float] | None] = []
        offset = 0
        # Round -1 warms up (connections, header caches). Every round sets the next
        # round's ops per phase: the same count for the tier and its raw ceiling, from
        # their mean speed, so phases keep their length when other load comes and goes.
        for rnd in range(-1, profile.rounds):
            t_round = time.perf_counter()
            for op in OPS:
                keys = wl.put_keys if op == "put" else wl.get_keys
                for j, (row, sides) in enumerate(rows.items()):
                    order = ("tier", "raw") if (rnd + j) % 2 == 0 else ("raw", "tier")
                    ops = profile.warmup_ops if rnd < 0 else n_ops[(row, op)]
                    per_op = []
                    for which in order:
                        side = sides[0] if which == "tier" else sides[1]
                        gc.collect()
                        moved, seconds, lat = await run_phase(
                            getattr(side, op), wl, keys, ops, args.concurrency, offset
                        )
                        per_op.append(seconds / ops)
                        if rnd >= 0:
                            per_size[row][op][which].add(moved, seconds, lat)
                    if rnd >= 0:
                        ops_log.setdefault(f"{row}.{op}", []).append(ops)
                    n_ops[(row, op)] = ops_for(profile, sum(per_op) / len(per_op))
                    offset += rng.randrange(len(keys))  # vary which keys are in flight together
            loads.append(common.load_average())
            label = "warm-up" if rnd < 0 else f"round {rnd + 1}/{profile.rounds}"
            log(f"  {label} {time.perf_counter() - t_round:.1f}s, load average {loads[-1]}")
        per_size["_ops_per_phase"] = ops_log
        per_size["_load_average_per_round"] = loads[1:]
        for sides in rows.values():
            for side in sides:
                await side.delete(wl.all_keys)
        del wl
        gc.collect()
    return results


def summarise(results: dict, rows: list[str]) -> list[dict]:
    out = []
    for size, per_row in results.items():
        for row in rows:
            entry: dict = {
                "tier": row,
                "size": size,
                "size_label": common.human_bytes(size),
                "load_average_per_round": per_row["_load_average_per_round"],
            }
            for op in OPS:
                t, r = per_row[row][op]["tier"], per_row[row][op]["raw"]
                round_ratios = [
                    a / b for a, b in zip(t.round_mbps, r.round_mbps, strict=False) if b > 0
                ]
                entry[op] = {
                    "tier": t.summary(),
                    "raw": r.summary(),
                    "ratio": t.mbps / r.mbps if r.mbps > 0 else math.nan,
                    "round_ratios": round_ratios,
                    "ratio_median": common.median(round_ratios),
                    "ratio_min": min(round_ratios, default=math.nan),
                    "ratio_max": max(round_ratios, default=math.nan),
                    "ops_per_phase": per_row["_ops_per_phase"].get(f"{row}.{op}"),
                }
            out.append(entry)
    return out


def transport_comparison(rows: list[dict]) -> list[dict]:
    """Each other S3 transport's throughput / obstore's,
    through the tier and raw, per size and op."""
    by = {(r["tier"], r["size"]): r for r in rows}
    out = []
    for transport in ("aioboto3", "nixl"):
        for size in sorted({r["size"] for r in rows}):
            a, o = by.get((f"s3-{transport}", size)), by.get(("s3-obstore", size))
            if not (a and o):
                continue
            item: dict = {
                "transport": transport,
                "size": size,
                "size_label": common.human_bytes(size),
            }
            for op in OPS:
                item[op] = {
                    side: a[op][side]["mb_per_s"] / o[op][side]["mb_per_s"]
                    for side in ("tier", "raw")
                }
            out.append(item)
    return out


def acceptance(rows: list[dict]) -> dict:
    verdict = {}
    for r in rows:
        if r["size"] == ACCEPT_SIZE:
            g = r["get"]
            verdict[r["tier"]] = {
                "get_ratio": g["ratio"],
                "get_ratio_median_of_rounds": g["ratio_median"],
                "get_ratio_rounds_min_max": [g["ratio_min"], g["ratio_max"]],
                "pass": bool(g["ratio"] >= ACCEPT_RATIO),
            }
    size = common.human_bytes(ACCEPT_SIZE)
    return {
        "criterion": f"tier get MB/s >= {ACCEPT_RATIO}x its raw ceiling at {size}",
        "rows": verdict,
        "all_pass": all(v["pass"] for v in verdict.values()) if verdict else None,
    }


def print_report(rows: list[dict], comparison: list[dict], accept: dict, concurrency: int) -> None:
    def f0(v):
        return common.fmt_num(v)

    def f2(v):
        return common.fmt_num(v, 2)

    n_rows = len({r["tier"] for r in rows})
    tput = []
    for r in rows:
        cells = [r["size_label"], r["tier"]]
        for op in OPS:
            cells += [f0(r[op]["tier"]["mb_per_s"]), f0(r[op]["raw"]["mb_per_s"])]
            cells.append(f2(r[op]["ratio"]))
        tput.append(cells)
    common.print_table(
        f"Tier vs raw ceiling: throughput, MB/s (10^6 B/s), {concurrency} ops in flight",
        [
            "size",
            "tier",
            "put",
            "put raw",
            "put x",
            "get",
            "get raw",
            "get x",
            "layers",
            "layers raw",
            "layers x",
        ],
        tput,
        caption="x = tier/raw. layers = get of layers [0, L/2): MB/s of the layer bytes "
        "delivered, warm header cache",
        section_every=n_rows,
    )
    lat = []
    for r in rows:
        cells = [r["size_label"], r["tier"]]
        for op in OPS:
            for p in ("p50_ms", "p99_ms"):
                cells.append(f"{f2(r[op]['tier'][p])} / {f2(r[op]['raw'][p])}")
        lat.append(cells)
    common.print_table(
        "Latency per operation, ms (tier / raw)",
        ["size", "tier", "put p50", "put p99", "get p50", "get p99", "layers p50", "layers p99"],
        lat,
        section_every=n_rows,
    )
    if comparison:
        common.print_table(
            "S3 transports: throughput / obstore throughput",
            [
                "transport",
                "size",
                "put (tier)",
                "put (raw)",
                "get (tier)",
                "get (raw)",
                "layers (tier)",
                "layers (raw)",
            ],
            [
                [
                    c["transport"],
                    c["size_label"],
                    *(f2(c[op][side]) for op in OPS for side in ("tier", "raw")),
                ]
                for c in comparison
            ],
        )
    table = []
    for tier, v in accept["rows"].items():
        lo, hi = v["get_ratio_rounds_min_max"]
        verdict = "PASS" if v["pass"] else "FAIL"
        table.append(
            [
                tier,
                f2(v["get_ratio"]),
                f2(v["get_ratio_median_of_rounds"]),
                f"{f2(lo)}-{f2(hi)}",
                verdict,
            ]
        )
    common.print_table(
        "Acceptance: " + accept["criterion"],
        ["tier", "get x (pooled)", "median of rounds", "rounds min-max", "verdict"],
        table,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter phases (~2 min)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/tiers.json, tiers-quick.json with --quick)",
    )
    ap.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"subset of {','.join(ROWS)}, each also with a {V1} suffix (format v1 objects)",
    )
    ap.add_argument("--sizes", default=None, help="object sizes in KiB (default 256,1024,4096)")
    ap.add_argument("--concurrency", type=int, default=8, help="operations in flight")
    ap.add_argument("--rounds", type=int, default=None, help="override the measured rounds")
    ap.add_argument(
        "--s3",
        choices=["seaweedfs", "rgw"],
        default="seaweedfs",
        help="the S3 server the s3-* rows run against (rgw: scripts/rgw.sh, Ceph memstore)",
    )
    args = ap.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := {r.removesuffix(V1) for r in args.rows} - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}")
    args.sizes = [int(s) << 10 for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    if args.out is None:
        args.out = common.RESULTS_DIR / ("tiers-quick.json" if args.quick else "tiers.json")
    return args


def _sigterm(signum, frame):  # run the finally blocks (stop the servers) on SIGTERM too
    raise SystemExit(128 + signum)


async def amain(args, profile: Profile, redis_server, s3_server, workdir: Path) -> dict:
    rows = await build_rows(args, redis_server, s3_server, workdir)
    try:
        return await measure(args, profile, rows)
    finally:
        for sides in rows.values():
            for side in sides:
                with contextlib.suppress(Exception):
                    await side.close()


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    if args.rounds:
        profile = dataclasses.replace(profile, rounds=args.rounds)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.perf_counter()
    date = common.utc_now()
    machine = common.machine_info(PACKAGES)
    needs_redis = any(r.removesuffix(V1) == "redis" for r in args.rows)
    needs_s3 = any(r.startswith("s3-") for r in args.rows)
    redis_server = s3_server = None
    ready: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kvstrata-bench-") as tmp:
        workdir = Path(tmp)
        try:
            if needs_redis:
                redis_server = services.start_redis(workdir / "redis")
                ready["redis"] = redis_server.ready_seconds
            if needs_s3 and args.s3 == "rgw":
                s3_server = services.start_rgw(workdir / "rgw")
                ready["rgw"] = s3_server.ready_seconds
            elif needs_s3:
                s3_server = services.start_seaweedfs(workdir / "s3")
                ready["seaweedfs"] = s3_server.ready_seconds
            log(f"servers ready {ready} after {time.perf_counter() - started:.1f}s")
            t_measure = time.perf_counter()
            results = asyncio.run(amain(args, profile, redis_server, s3_server, workdir))
            measure_s = time.perf_counter() - t_measure
        finally:
            for server in (s3_server, redis_server):
                if server is not None:
                    server.stop()
    rows = summarise(results, args.rows)
    comparison = transport_comparison(rows)
    accept = acceptance(rows)
    total_s = time.perf_counter() - started
    print_report(rows, comparison, accept, args.concurrency)
    payload = {
        "benchmark": "tiers",
        "date": date,
        "command": common.command_line(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "profile": "quick" if args.quick else "full",
        "parameters": {
            "sizes": args.sizes,
            "n_layers": N_LAYERS,
            "layers_range": [0, N_LAYERS // 2],
            "concurrency": args.concurrency,
            "objects_per_call": 1,
            **dataclasses.asdict(profile),
            "warmup_rounds": 1,
            "keys_per_set": {str(s): n_keys_for(s, args.concurrency) for s in args.sizes},
            "rows": args.rows,
            "integrity": "format v2: keyed BLAKE3 MACs per namespace "
            "(header MAC + a 16-byte tag per "
            f"layer); rows ending {V1}: format v1 (xxh3_64 checksums, no MAC)",
            "settings": {
                "memory": {"capacity_bytes": MEMORY_CAPACITY, "eviction": "s3fifo (default)"},
                "lmcache": {"capacity_bytes": LMCACHE_CAPACITY, "eviction": "lru (default)"},
                "disk": {"capacity_bytes": DISK_CAPACITY, "path": "temp dir, same fs as raw"},
                "redis": {
                    "pool": "BlockingConnectionPool",
                    "max_connections": REDIS_MAX_CONNECTIONS,
                    "timeout_s": TIMEOUT_S,
                },
                "s3": {
                    "timeout_s": TIMEOUT_S,
                    "max_retries": S3_MAX_RETRIES,
                    "max_concurrency": S3_MAX_CONCURRENCY,
                    "addressing": "path",
                    "nixl": "OBJ plugin, S3 client (no CRT), sizes cached from the tier's own puts",
                },
            },
            "units": "MB/s = 1e6 bytes/s; latencies in ms; ratio = tier / raw",
            "method": "per size: 1 warm-up round + N rounds; each round runs every (row, op) "
            "as a tier phase and a raw phase back to back, order alternating; ops per phase "
            "calibrated from the previous round (same count for tier and raw); gets read keys "
            "stored before timing, puts write a separate key set; header cache warm for layer "
            "gets; ratio = pooled tier MB/s / pooled raw MB/s",
        },
        "servers": {
            "ready_seconds": ready,
            "redis_server": _version(["redis-server", "--version"]) if needs_redis else None,
            "s3_server": args.s3 if needs_s3 else None,
            "weed": _version([services._find_binary("weed"), "version"])
            if needs_s3 and args.s3 == "seaweedfs"
            else None,
            "radosgw": _version(["radosgw", "--version"])
            if needs_s3 and args.s3 == "rgw"
            else None,
        },
        "machine": machine,
        "load_average_end": common.load_average(),
        "measure_seconds": measure_s,
        "total_seconds": total_s,
        "acceptance": accept,
        "s3_transport_comparison": comparison,
        "rows": rows,
    }
    path = common.write_json(args.out, common.round_floats(payload))
    print(f"\nwrote {path}  (measure {measure_s:.0f}s, total {total_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
