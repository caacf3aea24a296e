"""Local-directory tier: one file per chunk, survives restarts.

Layout: ``<path>/<first two hex digits>/<key hex>.kvs``. Writes go to a
temporary file in the same directory and are renamed into place, so a reader
(or a crash) never sees half an object under a real name. At start the tier
re-indexes what is already on disk (oldest modification first in the LRU
order), so a restarted engine finds its previous KV. Eviction is LRU by bytes.

File I/O runs in the tier's own bounded pool of daemon threads
(:class:`kvstrata.workers.Workers`, ``threads``/``max_queued``), never on the
event loop and never in a pool another tier shares: a call stuck in the kernel
(a hung mount) holds one of this tier's threads, not the process's. Gets also
verify in the worker thread, right after the read: the checksums hold the GIL
either way, and measured, the tier keeps more reads in flight when the event
loop is not the one doing them (see docs/benchmarks.md).

The directory is not trusted to hold only what this tier wrote. Only regular
files are read: a name is ``lstat``-ed first, opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` (so a FIFO swapped in meanwhile cannot block the open) and
``fstat``-ed after. A FIFO, directory, symlink or device under a chunk's name
is a ``Miss("corrupt")`` for that chunk alone, never indexed, and the
orchestrator's delete of it unlinks the name (a directory is left alone). A
file larger than the tier's capacity cannot be one of its objects: a miss,
never read. A put whose name is taken by a directory (or whose fan-out
directory is a file) skips that object; the rest of its batch is stored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvstrata import format as fmt
from kvstrata.keys import ChunkKey
from kvstrata.sizes import MAX_BYTES, ByteCount
from kvstrata.tiers.base import (
    Evicted,
    Fetch,
    Miss,
    PutResult,
    RangedTier,
    ReadRequest,
    TierError,
    TierSettings,
    _layer_requests,
    _miss_for,
    register,
)
from kvstrata.tiers.eviction import LRU
from kvstrata.workers import Workers, WorkersBusy

SUFFIX = ".kvs"

# Errors that concern one object's name (a directory or file in its way), not the tier:
# that object is skipped, the rest of the batch goes on.
_NAME_ERRORS = {errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ELOOP, errno.ENOTEMPTY}


class DiskSettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_DISK_", frozen=True, extra="forbid")

    path: Path = Path("~/.cache/kvstrata/kv")
    capacity_bytes: ByteCount = Field(default=64 << 30, gt=0, le=MAX_BYTES)
    threads: int = Field(
        default=8, ge=1, le=1024, description="this tier's I/O threads (its own pool)"
    )
    max_queued: int = Field(
        default=256,
        ge=0,
        le=1_000_000,
        description="calls waiting for a thread before one fails fast",
    )


#: The directory of a DiskTier built without one: the settings' default, read once at import.
_DEFAULT_PATH = DiskSettings().path


class _NotAnObject(Exception):
    """The name holds something this tier cannot have written (not a regular file, too large)."""


@register
class DiskTier(RangedTier):
    kind = "disk"
    settings_class = DiskSettings
    prior_latency_ms = 0.3
    prior_bandwidth_mbps = 1500
    default_timeout_ms = 2000
    hit_source = "DISK"

    def __init__(
        self,
        name: str = "disk",
        path: str | Path = _DEFAULT_PATH,
        capacity_bytes: int = 64 << 30,
        threads: int = 8,
        max_queued: int = 256,
    ):
        super().__init__(name)
        self.root = Path(path).expanduser()
        self._root = str(self.root)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._sizes: dict[ChunkKey, int] = {}
        self._lru = LRU(capacity_bytes)
        self._used = 0
        self._io = Workers(f"disk-{name}", threads, max_queued)
        self.root.mkdir(parents=True, exist_ok=True)
        self._reindex()

    @classmethod
    def from_settings(cls, name: str, settings: DiskSettings) -> DiskTier:
        return cls(
            name, settings.path, settings.capacity_bytes, settings.threads, settings.max_queued
        )

    async def _run(self, op: str, fn, *args):
        """``fn(*args)`` in this tier's pool; a full pool is a TierError (the tier is stuck)."""
        try:
            return await self._io.run(fn, *args)
        except WorkersBusy as exc:
            raise TierError(self.name, op, exc) from exc

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
                st = file.lstat()
            except (ValueError, OSError):
                continue  # not ours, or gone meanwhile
            if stat.S_ISREG(st.st_mode):  # a FIFO, link or directory is no object
                found.append((st.st_mtime, key, st.st_size))
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
            await self._run("contains", self._adopt, unknown)
        with self._lock:
            return [k in self._sizes for k in keys]

    def _adopt(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            try:
                st = os.lstat(self._file(key))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            with self._lock:
                if key not in self._sizes:
                    self._account(key, st.st_size)

    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | None]:
        # Only RangedTier's generic paths call this; this tier's gets read in _get_whole and
        # _get_layers, where a name that holds no object is a corrupt miss. Here it is absent.
        def run() -> list[bytes | None]:
            return [self._read_or_none(r) for r in requests]

        return await self._run("get", run)

    def _read_or_none(self, r: ReadRequest) -> bytes | None:
        try:
            return self._read_one(r)
        except _NotAnObject:
            return None

    # Gets read and verify in the same worker thread, off the event loop (see the
    # module docstring); _verify_whole/_verify_layers are thread-safe.

    async def _get_whole(self, keys: Sequence[ChunkKey]) -> list[Fetch]:
        return await self._run("get", self._get_whole_sync, keys)

    def _get_whole_sync(self, keys: Sequence[ChunkKey]) -> list[Fetch]:
        results: dict[ChunkKey, Fetch] = {}
        good, blobs = [], []
        for key in keys:
            try:
                blobs.append(self._read_one(ReadRequest(key)))
                good.append(key)
            except _NotAnObject as exc:
                results[key] = Miss(key, "corrupt", str(exc))
        results.update(zip(good, self._verify_whole(good, blobs), strict=True))
        return [results[k] for k in keys]

    async def _get_layers(self, keys: Sequence[ChunkKey], layers: range) -> list[Fetch]:
        return await self._run("get", self._get_layers_sync, keys, layers)

    def _get_layers_sync(self, keys: Sequence[ChunkKey], layers: range) -> list[Fetch]:
        headers: dict[ChunkKey, fmt.Header | Miss] = dict(self._cached_headers(keys))
        for key in keys:
            if key not in headers:
                headers[key] = self._read_header(key)
        requests = _layer_requests(headers, layers)
        blobs = []
        for r in requests:
            try:
                blobs.append(self._read_one(r))
            except _NotAnObject:  # replaced since its header was read: gone, as far as we know
                blobs.append(None)
        return self._verify_layers(keys, headers, layers, requests, blobs)

    def _read_header(self, key: ChunkKey) -> fmt.Header | Miss:
        """The verified header of ``key``'s file (a probe
        read, a longer one if needed), or a Miss."""
        try:
            blob = self._read_one(ReadRequest(key, 0, fmt.HEADER_PROBE_BYTES))
            if blob is None:
                return Miss(key)
            if fmt.header_length(blob) > len(blob):
                blob = self._read_one(ReadRequest(key, 0, fmt.MAX_HEADER_BYTES))
                if blob is None:
                    return Miss(key)
        except _NotAnObject as exc:
            return Miss(key, "corrupt", str(exc))
        except fmt.FormatError as exc:
            return _miss_for(key, exc)
        return self._parse_header(key, blob)

    def _read_one(self, r: ReadRequest) -> bytes | None:
        """Bytes [start, end) of one regular file (to its end if ``end`` is None); None if absent.

        Raises _NotAnObject for a name that holds anything else (never opened if lstat says so;
        O_NONBLOCK, O_NOFOLLOW and fstat cover a swap between lstat and open), TierError when the
        file system fails.
        """
        path = self._file(r.key)
        try:
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                raise _NotAnObject(f"{_kind(mode)} under the object's name")
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # swapped for a symlink after the lstat
                raise _NotAnObject("symlink under the object's name") from exc
            raise TierError(self.name, "get", exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotAnObject(f"{_kind(st.st_mode)} under the object's name")
            if st.st_size > self.capacity_bytes:  # puts larger than the tier are never stored
                raise _NotAnObject(
                    f"file of {st.st_size} bytes, larger than the tier ({self.capacity_bytes})"
                )
            # Files are replaced by rename, never changed in place: the size of the
            # open file is the size of the object it holds.
            end = st.st_size if r.end is None else min(r.end, st.st_size)
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
        return await self._run("put", self._put_sync, items)

    def _put_sync(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        evicted: list[Evicted] = []
        stored = 0
        for key, data in items:
            if len(data) > self.capacity_bytes or not self._write_file(key, data):
                continue
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

    def _write_file(self, key: ChunkKey, data: bytes) -> bool:
        """Write ``data`` under ``key``'s name by rename; False if that name cannot take a file
        (a directory in the way). Raises TierError when the file system fails (full, read-only).

        The temporary name is random and created with O_EXCL|O_NOFOLLOW: nothing planted in the
        directory (a FIFO, a symlink) can be opened or followed by the write.
        """
        path = self._file(key)
        parent, name = os.path.split(path)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            os.makedirs(parent, exist_ok=True)
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            if exc.errno in _NAME_ERRORS:
                return False
            raise TierError(self.name, "put", exc) from exc
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in _NAME_ERRORS:
                return False
            raise TierError(self.name, "put", exc) from exc
        return True

    def _unaccount(self, key: ChunkKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
            self._lru.remove(key)

    def _unlink(self, key: ChunkKey) -> None:
        """Remove ``key``'s name: a file, FIFO, symlink
        or device node; a directory is left alone."""
        self._forget(key)
        try:
            os.unlink(self._file(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.EPERM) and os.path.isdir(self._file(key)):
                return  # not ours to remove recursively; it is a miss on every read
            raise TierError(self.name, "delete", exc) from exc

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        def run() -> None:
            for key in keys:
                with self._lock:
                    self._unaccount(key)
                self._unlink(key)

        await self._run("delete", run)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
