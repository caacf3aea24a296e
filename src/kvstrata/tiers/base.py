"""The Tier interface, its result values, its settings base and the registry.

Contract (every tier, every method):

* Callers: only the orchestrator, from its one background event loop. Methods
  are coroutines; a tier may be used by many tasks at once and must be safe
  for that (in-process tiers also take a lock, so a second loop or thread is
  safe too).
* Batch-first: every method takes a sequence of keys and answers in the same
  order. One call should cost the backend one round trip where it can
  (pipelines, gathered requests).
* Buffers: ``put`` takes ownership of nothing -- it may keep a reference to the
  ``bytes`` it is given (they are immutable) but never mutates them. ``get``
  returns :class:`Hit` values whose sections are read-only views that stay
  valid as long as the caller holds them, even after a delete or eviction.
* Failure: a backend that cannot answer (connection refused, timeout, server
  error) raises :class:`TierError`. A missing object is a :class:`Miss` with
  reason ``"absent"``; a stored object that fails verification is a ``Miss``
  with reason ``"corrupt"`` (structure, truncation), ``"unauthenticated"`` (a
  MAC or tag that does not verify under this tier's keyring -- forged, written
  with another secret, or damaged -- or a v1 object where those are not
  allowed), ``"foreign"`` (another key's object under this key) or
  ``"unsupported"`` (a format version this reader does not know). One bad
  object is a miss for that object only, never an error for its batch: a
  backend answer about one object (a truncated object's ranged read past its
  end, say) is that object's ``Miss``, not a :class:`TierError`. Deciding what
  to do about a bad object (count it, drop it) is the orchestrator's job.
* Keys: a tier verifies with its :attr:`Tier.keyring` (default: no secret,
  see :mod:`kvstrata.auth`); the orchestrator sets it with :meth:`Tier.use_keyring`
  before the first call.
* Tiers store opaque object bytes (see :mod:`kvstrata.format`); they parse
  headers only to serve layer ranges and to verify what they return (before
  returning it, or once per object where the stored bytes cannot change).
"""

from __future__ import annotations

import abc
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvstrata import auth
from kvstrata import format as fmt
from kvstrata.keys import ChunkKey


class TierError(Exception):
    """A tier's backend failed to answer. The orchestrator maps it to a miss (load) or a drop
    (save)."""

    def __init__(self, tier: str, op: str, cause: BaseException | str):
        self.tier, self.op, self.cause = tier, op, cause
        super().__init__(f"tier {tier!r} {op} failed: {cause}")


MissReason = Literal["absent", "corrupt", "unauthenticated", "foreign", "unsupported"]


@dataclass(frozen=True)
class Hit:
    key: ChunkKey
    obj: fmt.ChunkObject


@dataclass(frozen=True)
class Miss:
    key: ChunkKey
    reason: MissReason = "absent"
    detail: str = ""


Fetch = Hit | Miss


@dataclass(frozen=True)
class Evicted:
    """A chunk a capacity-bound tier pushed out; ``data`` is there when the tier still had it
    in memory."""

    key: ChunkKey
    data: bytes | None


@dataclass(frozen=True)
class PutResult:
    stored: int
    evicted: tuple[Evicted, ...] = ()


class TierSettings(BaseSettings):
    """Base of every tier's settings: frozen, and ``KVSTRATA_<KIND>_*`` variables beat the YAML
    file."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # An operator's environment (endpoints, credentials) overrides the file.
        return env_settings, init_settings, file_secret_settings


class Tier(abc.ABC):
    """A place KV objects live. See the module docstring for the contract."""

    kind: ClassVar[str]
    settings_class: ClassVar[type[TierSettings]]

    # Per-kind facts: everything outside the tier that depends on its kind reads one of
    # these (through ``tier_class(kind)``), never a table keyed by kind name.
    #: the cost model's prior until it has measured the tier (a tier's ``cost:`` overrides it)
    prior_latency_ms: ClassVar[float] = 5.0
    prior_bandwidth_mbps: ClassVar[float] = 200.0
    #: per-operation timeout when the tier's entry gives no ``timeout_ms``
    default_timeout_ms: ClassVar[float] = 5000.0
    #: the member of vLLM's ``CacheHitSource`` that tokens loaded from this tier count as
    hit_source: ClassVar[str] = "EXTERNAL_UNSPECIFIED"
    #: other hosts' writers reach it (a missing object secret is worth a warning)
    shared: ClassVar[bool] = False
    #: its objects live in one process's memory and die with it
    process_local: ClassVar[bool] = False
    #: where a document corpus goes when ``documents.tiers`` names none (the first such tier)
    corpus_home: ClassVar[bool] = False
    #: ``put`` takes ``ttl_s`` (a route's ``ttl_s`` may name the tier); see :meth:`put`
    supports_ttl: ClassVar[bool] = False

    #: what verifies (and what writers MAC with): see :mod:`kvstrata.auth`
    keyring: auth.Keyring = auth.NO_SECRET

    def __init__(self, name: str):
        self.name = name

    def use_keyring(self, keyring: auth.Keyring) -> None:
        """Verify with ``keyring`` from now on (called before the tier is used; tiers that
        remember verdicts forget them)."""
        self.keyring = keyring

    @classmethod
    def from_settings(cls, name: str, settings: TierSettings) -> Tier:
        """The uniform constructor the registry uses."""
        return cls(name, settings)  # type: ignore[call-arg]

    @abc.abstractmethod
    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is stored (a cheap check; a later get may still miss)."""

    @abc.abstractmethod
    async def get(self, keys: Sequence[ChunkKey], layers: range | None = None) -> list[Fetch]:
        """Fetch and verify each object, only ``layers`` of it if given (all layers if None)."""

    @abc.abstractmethod
    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        """Store encoded objects, replacing any object under the same key.

        A tier with :attr:`supports_ttl` also takes ``ttl_s`` (keyword, ``None``: the
        tier's own default): the objects expire that many seconds after this put. Callers
        pass it only to such tiers (the configuration refuses a route's ``ttl_s`` elsewhere).
        """

    @abc.abstractmethod
    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove objects; absent keys are ignored."""

    async def close(self) -> None:  # noqa: B027 -- optional: a tier with nothing to release
        """Release connections and files. The tier is unusable afterwards."""


# -- ranged reading, shared by every tier -----------------------------------


@dataclass(frozen=True)
class ReadRequest:
    """Bytes ``[start, end)`` of the object under ``key``; ``end=None`` means to its end."""

    key: ChunkKey
    start: int = 0
    end: int | None = None


class RangedTier(Tier):
    """A tier that can read byte ranges of stored objects.

    Subclasses implement :meth:`_read` (batched ranged reads, ``None`` for an
    absent object) and the write side; this class turns that into verified
    whole-object and layer-range gets.

    Verified headers are cached per key (bounded, LRU), together with their
    exact bytes. A layer-range get costs one ranged read when the header is
    cached, two otherwise: one to learn where the layers are, one for exactly
    those bytes. A whole-object get is always one read; when the object starts
    with the cached header's exact bytes, only its sections are checksummed
    (parsing the same bytes again could not give another answer). Subclasses
    call :meth:`_forget_all` for the keys they overwrite or delete.

    A tier whose reads run in worker threads may override :meth:`_get_whole`
    and :meth:`_get_layers` to read and verify in the same thread:
    :meth:`_verify_whole` and :meth:`_verify_layers` do all the checking, are
    thread-safe and do no I/O.
    """

    header_cache_entries: ClassVar[int] = 65536

    def __init__(self, name: str):
        super().__init__(name)
        self._headers: OrderedDict[ChunkKey, fmt.Header] = OrderedDict()
        self._headers_lock = threading.Lock()

    def use_keyring(self, keyring: auth.Keyring) -> None:
        super().use_keyring(keyring)
        with self._headers_lock:  # verified under another keyring
            self._headers.clear()

    @abc.abstractmethod
    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | memoryview | None]:
        """Read byte ranges; ``None`` for an absent object. Raise TierError on backend failure.

        A range may extend past the object's end; the result is then shorter.
        """

    def _on_hits(self, keys: Sequence[ChunkKey]) -> None:
        """Called once per get with the keys it served; capacity-owning tiers update recency."""

    async def get(self, keys: Sequence[ChunkKey], layers: range | None = None) -> list[Fetch]:
        if layers is None:
            results = await self._get_whole(keys)
        else:
            results = await self._get_layers(keys, layers)
        self._on_hits([r.key for r in results if isinstance(r, Hit)])
        return results

    # -- whole objects ----------------------------------------------------

    async def _get_whole(self, keys: Sequence[ChunkKey]) -> list[Fetch]:
        blobs = await self._read([ReadRequest(k) for k in keys])
        return self._verify_whole(keys, blobs)

    def _verify_whole(
        self, keys: Sequence[ChunkKey], blobs: Sequence[bytes | memoryview | None]
    ) -> list[Fetch]:
        """The results of a whole-object get, from each key's read. Thread-safe, no I/O."""
        known = self._cached_headers(keys)
        return [self._verify_one(k, b, known.get(k)) for k, b in zip(keys, blobs, strict=True)]

    def _verify_one(
        self, key: ChunkKey, blob: bytes | memoryview | None, known: fmt.Header | None
    ) -> Fetch:
        """Verify one whole object; a header parsed afresh is cached if it names ``key``."""
        if blob is None:
            return Miss(key)
        try:
            obj = fmt.decode(blob, known=known, keyring=self.keyring)
        except fmt.FormatError as exc:
            return _miss_for(key, exc)
        if obj.header is not known:  # parsed afresh: check it, then remember it
            if obj.meta.key != key.digest:
                return Miss(key, "foreign", "object names another chunk key")
            self._cache_header(key, obj.header)
        return Hit(key, obj)

    # -- layer ranges -----------------------------------------------------

    async def _get_layers(self, keys: Sequence[ChunkKey], layers: range) -> list[Fetch]:
        headers = await self._headers_for(keys)
        requests = _layer_requests(headers, layers)
        blobs = await self._read(requests)
        return self._verify_layers(keys, headers, layers, requests, blobs)

    def _verify_layers(
        self,
        keys: Sequence[ChunkKey],
        headers: Mapping[ChunkKey, fmt.Header | Miss],
        layers: range,
        requests: Sequence[ReadRequest],
        blobs: Sequence[bytes | memoryview | None],
    ) -> list[Fetch]:
        """The results of a layer get, from each key's header (or Miss) and the reads
        of :func:`_layer_requests`. Thread-safe, no I/O."""
        bodies = {r.key: (r.start, b) for r, b in zip(requests, blobs, strict=True)}
        results: list[Fetch] = []
        for key in keys:
            header = headers[key]
            if not isinstance(header, fmt.Header):
                results.append(header)
                continue
            start, blob = bodies[key]
            if blob is None:  # deleted between the two reads
                self._forget(key)
                results.append(Miss(key))
                continue
            try:
                results.append(Hit(key, fmt.read_layers(header, blob, start, layers)))
            except fmt.FormatError as exc:
                results.append(_miss_for(key, exc))
        return results

    async def _headers_for(self, keys: Sequence[ChunkKey]) -> dict[ChunkKey, fmt.Header | Miss]:
        found: dict[ChunkKey, fmt.Header | Miss] = dict(self._cached_headers(keys))
        missing = [k for k in keys if k not in found]
        if not missing:
            return found
        probes = await self._read([ReadRequest(k, 0, fmt.HEADER_PROBE_BYTES) for k in missing])
        long_headers: list[ChunkKey] = []
        for key, probe in zip(missing, probes, strict=True):
            if probe is None:
                found[key] = Miss(key)
                continue
            try:
                if fmt.header_length(probe, self.keyring) > len(probe):
                    long_headers.append(key)
                    continue
            except fmt.FormatError as exc:
                found[key] = _miss_for(key, exc)
                continue
            found[key] = self._parse_header(key, probe)
        if long_headers:
            blobs = await self._read(
                [ReadRequest(k, 0, fmt.MAX_HEADER_BYTES) for k in long_headers]
            )
            for key, blob in zip(long_headers, blobs, strict=True):
                found[key] = Miss(key) if blob is None else self._parse_header(key, blob)
        return found

    def _parse_header(self, key: ChunkKey, blob: bytes | memoryview) -> fmt.Header | Miss:
        try:
            header = fmt.decode_header(blob, self.keyring)
        except fmt.FormatError as exc:
            return _miss_for(key, exc)
        if header.meta.key != key.digest:
            return Miss(key, "foreign", "object names another chunk key")
        self._cache_header(key, header)
        return header

    # -- the header cache ---------------------------------------------------

    def _cached_headers(self, keys: Sequence[ChunkKey]) -> dict[ChunkKey, fmt.Header]:
        """The cached headers of ``keys`` (those that have one), marked recently used."""
        found: dict[ChunkKey, fmt.Header] = {}
        with self._headers_lock:
            for key in keys:
                header = self._headers.get(key)
                if header is not None:
                    self._headers.move_to_end(key)
                    found[key] = header
        return found

    def _cache_header(self, key: ChunkKey, header: fmt.Header) -> None:
        """Remember a verified header that names ``key``."""
        with self._headers_lock:
            self._headers[key] = header
            self._headers.move_to_end(key)
            while len(self._headers) > self.header_cache_entries:
                self._headers.popitem(last=False)

    def _forget(self, key: ChunkKey) -> None:
        with self._headers_lock:
            self._headers.pop(key, None)

    def _forget_all(self, keys: Sequence[ChunkKey]) -> None:
        with self._headers_lock:
            for key in keys:
                self._headers.pop(key, None)


def _layer_requests(
    headers: Mapping[ChunkKey, fmt.Header | Miss], layers: range
) -> list[ReadRequest]:
    """The byte range of ``layers`` of every key with a header (keys with a Miss need no read)."""
    requests = []
    for key, header in headers.items():
        if isinstance(header, fmt.Header):
            lo, hi = header.byte_range(layers)
            requests.append(ReadRequest(key, lo, hi))
    return requests


def _miss_for(key: ChunkKey, exc: fmt.FormatError) -> Miss:
    return Miss(key, exc.reason, str(exc))  # type: ignore[arg-type]


# -- registry ---------------------------------------------------------------

_REGISTRY: dict[str, type[Tier]] = {}


def register(cls: type[Tier]) -> type[Tier]:
    """Class decorator: make a tier constructible by its ``kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def tier_class(kind: str) -> type[Tier]:
    if kind not in _REGISTRY:
        _import_builtin(kind)
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown tier kind {kind!r} (known: {sorted(_known_kinds())})") from None


def create_tier(kind: str, name: str | None = None, **settings: object) -> Tier:
    """Build a tier from its kind and settings (environment variables override ``settings``)."""
    cls = tier_class(kind)
    return cls.from_settings(name or kind, cls.settings_class(**settings))


BUILTIN_KINDS = {
    "memory": "memory",
    "disk": "disk",
    "redis": "redis",
    "s3": "s3.tier",
    "lmcache": "lmcache",
}


def _known_kinds() -> set[str]:
    return set(_REGISTRY) | set(BUILTIN_KINDS)


def _import_builtin(kind: str) -> None:
    # Built-in tiers import lazily, so a missing optional client library
    # (redis, obstore) only matters to whoever uses that tier.
    if kind in BUILTIN_KINDS:
        import importlib

        importlib.import_module(f"kvstrata.tiers.{BUILTIN_KINDS[kind]}")
