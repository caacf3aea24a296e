"""Local-directory tier: one file per chunk, survives restarts.

Layout: ``<path>/<first two hex digits>/<key hex>.kvs``. Writes go to a
temporary file in the same directory and are renamed into place, so a reader
(or a crash) never sees half an object under a real name. At start the tier
re-indexes what is already on disk (oldest modification first in the LRU
order), so a restarted engine finds its previous KV. Eviction is LRU by bytes.

File I/O runs in worker threads so the event loop never blocks on the disk.
Gets also verify in the worker thread, right after the read: the checksums
hold the GIL either way, and measured, the tier keeps more reads in flight
when the event loop is not the one doing them (see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvstrata.keys import ChunkKey
from kvstrata.sizes import MAX_BYTES, ByteCount
from kvstrata.tiers.base import (
    Evicted,
    Fetch,
    PutResult,
    RangedTier,
    ReadRequest,
    TierError,
    TierSettings,
    _layer_requests,
    register,
)
from kvstrata.tiers.eviction import LRU

SUFFIX = ".kvs"


class DiskSettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_DISK_", frozen=True, extra="forbid")

    path: Path = Path("~/.cache/kvstrata/kv")
    capacity_bytes: ByteCount = Field(default=64 << 30, gt=0, le=MAX_BYTES)


@register
class DiskTier(RangedTier):
    kind = "disk"
    settings_class = DiskSettings

    def __init__(self, name: str = "disk", path: str | Path = DiskSettings().path, capacity_bytes: int = 64 << 30):
        super().__init__(name)
        self.root = Path(path).expanduser()
        self._root = str(self.root)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._sizes: dict[ChunkKey, int] = {}
        self._lru = LRU(capacity_bytes)
        self._used = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._reindex()

    @classmethod
    def from_settings(cls, name: str, settings: DiskSettings) -> DiskTier:
        return cls(name, settings.path, settings.capacity_bytes)

    def _path(self, key: ChunkKey) -> Path:
        return Path(self._file(key))

    def _file(self, key: ChunkKey) -> str:
        """The object's file name, as a string (cheaper than a Path on the read path)."""
        text = str(key)
        return f"{self._root}/{text[:2]}/{text}{SUFFIX}"

    def _reindex(self) -> None:
        found = []
        for file in self.root.glob(f"??/*{SUFFIX}"):
            try:
                key = ChunkKey.from_hex(file.stem)
                stat = file.stat()
            except (ValueError, OSError):
                continue  # not ours, or gone meanwhile
            found.append((stat.st_mtime, key, stat.st_size))
        for _, key, size in sorted(found, key=lambda t: t[0]):
            self._account(key, size)

    def _account(self, key: ChunkKey, size: int) -> None:
        self._sizes[key] = size
        self._used += size
        self._lru.insert(key, size)

    @property
    def used_bytes(self) -> int:
        return self._used

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            unknown = [k for k in keys if k not in self._sizes]
        if unknown:  # another process sharing the directory may have written them
            await asyncio.to_thread(self._adopt, unknown)
        with self._lock:
            return [k in self._sizes for k in keys]

    def _adopt(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            try:
                size = self._path(key).stat().st_size
            except OSError:
                continue
            with self._lock:
                if key not in self._sizes:
                    self._account(key, size)

    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | None]:
        return await asyncio.to_thread(lambda: [self._read_one(r) for r in requests])

    # Gets read and verify in the same worker thread, off the event loop (see the
    # module docstring); _verify_whole/_verify_layers are thread-safe.

    async def _get_whole(self, keys: Sequence[ChunkKey]) -> list[Fetch]:
        def run() -> list[Fetch]:
            return self._verify_whole(keys, [self._read_one(ReadRequest(k)) for k in keys])

        return await asyncio.to_thread(run)

    async def _get_layers(self, keys: Sequence[ChunkKey], layers: range) -> list[Fetch]:
        headers = await self._headers_for(keys)  # usually all cached: no I/O

        def run() -> list[Fetch]:
            requests = _layer_requests(headers, layers)
            blobs = [self._read_one(r) for r in requests]
            return self._verify_layers(keys, headers, layers, requests, blobs)

        return await asyncio.to_thread(run)

    def _read_one(self, r: ReadRequest) -> bytes | None:
        """Bytes [start, end) of one file (to its end if ``end`` is None); None if absent."""
        try:
            fd = os.open(self._file(r.key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TierError(self.name, "get", exc) from exc
        try:
            # Files are replaced by rename, never changed in place: the size of the
            # open file is the size of the object it holds.
            size = os.fstat(fd).st_size
            end = size if r.end is None else min(r.end, size)
            return _pread(fd, r.start, max(0, end - r.start))
        except OSError as exc:
            raise TierError(self.name, "get", exc) from exc
        finally:
            os.close(fd)

    def _on_hits(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._lru.touch(key)

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        return await asyncio.to_thread(self._put_sync, items)

    def _put_sync(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        evicted: list[Evicted] = []
        stored = 0
        for key, data in items:
            if len(data) > self.capacity_bytes:
                continue
            path = self._path(key)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                path.parent.mkdir(exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise TierError(self.name, "put", exc) from exc
            self._forget(key)
            with self._lock:
                self._unaccount(key)
                self._account(key, len(data))
                while self._used > self.capacity_bytes:
                    victim = self._lru.victim()
                    self._used -= self._sizes.pop(victim)  # type: ignore[arg-type]
                    self._unlink(victim)  # type: ignore[arg-type]
                    evicted.append(Evicted(victim, None))  # type: ignore[arg-type]
            stored += 1
        return PutResult(stored, tuple(evicted))

    def _unaccount(self, key: ChunkKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
            self._lru.remove(key)

    def _unlink(self, key: ChunkKey) -> None:
        self._forget(key)
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise TierError(self.name, "delete", exc) from exc

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        def run() -> None:
            for key in keys:
                with self._lock:
                    self._unaccount(key)
                self._unlink(key)

        await asyncio.to_thread(run)


def _pread(fd: int, offset: int, n: int) -> bytes:
    """``n`` bytes from ``offset``, fewer only at end of file."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]  # a short read before the end: rare (signals), but allowed
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
