"""The Codec interface and registry.

A codec turns one layer of one chunk -- canonical KV, a numpy array shaped
``[2, n_tokens, kv_heads, head_dim]`` (K then V) -- into the bytes of that
layer's section, and back. Each layer is encoded on its own, so layer-wise
reads decode each layer as it arrives.

Contract:

* ``encode`` is pure: same input, same bytes. ``decode`` validates the section
  length against the geometry and raises :class:`CodecError` on any mismatch
  (never returns wrongly shaped data).
* ``params`` are recorded in the object header; ``from_params`` rebuilds a
  codec from them, refusing parameters it does not understand.
* A codec declares ``lossless``; lossy codecs state their error bound in
  their docstring and tests hold them to it.
* ``encode(kv, layer=...)`` gets the layer index: codecs with per-layer state
  (learned ones) record it in the section, so ``decode`` needs nothing but
  the section and the geometry.
* ``encode(..., first_position=p)`` (keyword, default 0) is the absolute
  position of the chunk's first token (``chunk_index * chunk_tokens``).
  Codecs that use it (``linear-ae`` with derotated keys) record it in the
  section; the others ignore it. A writer that leaves it at 0 still gets
  sections that decode exactly as the codec specifies.
* A codec with ``native = True`` (only ``pages``, :mod:`kvstrata.compression.pages`)
  stores the engine's page bytes instead of canonical KV: ``encode`` also takes
  them flat, and ``decode`` returns them flat.

Names and kinds: a configuration names codecs (``codecs:`` in the YAML, e.g.
``int4-g32: {kind: int4, group_size: 32}``); the object header's codec id is
that *name* (it is also in the key namespace) and, when the name is not the
registry id itself, the header params carry ``kind`` as well.

The header is untrusted input (it comes from a shared store). A reader never
builds a codec from it: the reader's own configuration chooses the codec
(:func:`codec_from_config`) and the header may only *confirm* it
(:func:`confirm_header`: same name, exactly the parameters this codec would
write, which for a learned codec includes its checkpoint's sha256). Parameters
that name a local resource (a checkpoint's path: ``Codec.local_params``) are
never written to a header (:func:`header_params`), so no header field can lead
to opening a file. :func:`codec_from_header` without a configuration only
builds codecs that need no local resource, from their registry id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

# numpy has no bfloat16: bf16 KV travels as its raw 16-bit pattern.
NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "float8_e4m3fn": np.dtype("u1"),
    "float8_e5m2": np.dtype("u1"),
}


class CodecError(ValueError):
    """A section cannot be decoded with this codec and geometry."""


@dataclass(frozen=True)
class Geometry:
    n_tokens: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.n_tokens, self.kv_heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * NUMPY_DTYPES[self.dtype].itemsize


class Codec(Protocol):
    """What every codec class declares (its per-kind facts, read from nowhere else) and does.

    A codec with no ``local_params`` is also usable by its ``id`` alone: a route may
    name it without a ``codecs:`` entry (:func:`builtin_codecs`). The configuration
    resolves each ``local_params`` value against the file's directory and refuses
    anything that is not a regular file of at most 1 GiB.
    """

    id: ClassVar[str]
    lossless: ClassVar[bool]
    #: parameters that name a local resource (a file): configuration only, never in a header
    local_params: ClassVar[frozenset[str]]

    @property
    def params(self) -> Mapping[str, int | float | str | bool]: ...
    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes: ...
    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray: ...


class IdentityCodec:
    """Canonical bytes as they are: K then V, ``[token][kv_head][head_dim]``, the model's dtype."""

    id: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True
    local_params: ClassVar[frozenset[str]] = frozenset()

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> IdentityCodec:
        if params:
            raise CodecError(f"codec 'none' takes no parameters, got {sorted(params)}")
        return cls()

    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes:
        return np.ascontiguousarray(kv).tobytes()

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        if len(section) != geometry.nbytes:
            raise CodecError(f"section is {len(section)} bytes, geometry needs {geometry.nbytes}")
        return np.frombuffer(section, dtype=NUMPY_DTYPES[geometry.dtype]).reshape(geometry.shape)


_CODECS: dict[str, type] = {IdentityCodec.id: IdentityCodec}

#: The header parameter naming the registry id when the codec id is a configured name.
KIND_PARAM = "kind"


def register(cls: type) -> type:
    _CODECS[cls.id] = cls
    return cls


def _load_builtins() -> None:
    # the built-in codecs register themselves on import
    from kvstrata.compression import autoencoder, linear, pages, quant  # noqa: F401


def codec_kinds() -> dict[str, type]:
    """Registry id -> codec class, for every codec this build knows."""
    _load_builtins()
    return dict(_CODECS)


def builtin_codecs() -> tuple[str, ...]:
    """The codec ids a route may name without a ``codecs:`` entry: every registered codec that
    needs no local resource, built with its default parameters."""
    return tuple(sorted(id for id, cls in codec_kinds().items() if not cls.local_params))


def codec_from_header(
    codec_id: str, params: Mapping[str, object], configured: Mapping[str, Codec] | None = None
) -> Codec:
    """The reader's codec for an object whose header says ``(codec_id, params)``, or CodecError.

    With ``configured`` (the reader's codecs by name), the codec is
    ``configured[codec_id]`` and the header must confirm it (:func:`confirm_header`).
    Without, only a registry id whose kind needs no local resource is built, from
    the header's parameters (no ``kind`` other than the id itself). Never opens a
    file, whatever the header says; pure CPU work bounded by the parameters' size.
    """
    if configured is not None and codec_id in configured:
        codec = configured[codec_id]
        confirm_header(codec_id, codec, codec_id, params)
        return codec
    _load_builtins()
    params = dict(params)
    kind = params.pop(KIND_PARAM, codec_id)
    if kind != codec_id or codec_id not in _CODECS:
        raise CodecError(
            f"codec {codec_id!r} is not configured here (a reader decodes with its own "
            "configuration's codecs; a header cannot choose one)"
        )
    cls = _CODECS[codec_id]
    if getattr(cls, "local_params", None) != frozenset():  # undeclared: assume it needs some
        raise CodecError(f"codec {codec_id!r} needs a checkpoint from this reader's configuration")
    return _build(cls, codec_id, params)


def confirm_header(name: str, codec: Codec, codec_id: str, params: Mapping[str, object]) -> None:
    """CodecError unless a header's ``(codec_id, params)`` are exactly what ``codec``, configured
    as ``name``, writes (:func:`header_params`). A comparison only: no I/O, nothing built."""
    if codec_id != name:
        raise CodecError(f"object codec {codec_id!r}, this reader expects {name!r}")
    expected = header_params(name, codec)
    if dict(params) != expected or any(type(params[k]) is not type(v) for k, v in expected.items()):
        differ = sorted(
            k for k in {*params, *expected} if params.get(k) != expected.get(k)
        ) or sorted(expected)
        raise CodecError(
            f"codec {name!r}: the object's parameters differ from this reader's "
            f"({', '.join(differ)})"
        )


def header_params(name: str, codec: Codec) -> dict[str, int | float | str | bool]:
    """What the header of an object written by ``codec`` under ``name`` records: its parameters
    minus the local ones (paths), plus ``kind`` when the name is not the registry id."""
    local = getattr(type(codec), "local_params", frozenset())
    params = {k: v for k, v in codec.params.items() if k not in local}
    if name != codec.id:
        params[KIND_PARAM] = codec.id
    return params


def codec_from_config(name: str, kind: str, params: Mapping[str, object]) -> Codec:
    """A codec from trusted configuration: ``kind`` built from ``params`` (CodecError if it
    cannot be)."""
    _load_builtins()
    if not isinstance(kind, str) or kind not in _CODECS:
        raise CodecError(f"unknown codec kind {kind!r} (codec {name!r})")
    params = {k: v for k, v in params.items() if k != KIND_PARAM}
    return _build(_CODECS[kind], name, params)


def _build(cls: type, name: str, params: Mapping[str, object]) -> Codec:
    try:
        return cls.from_params(params)
    except CodecError:
        raise
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise CodecError(f"codec {name!r} ({cls.id}): bad parameters: {exc}") from None


# -- helpers shared by the lossy codecs ----------------------------------------------


def to_float32(kv: np.ndarray, dtype: str) -> np.ndarray:
    """Canonical KV of ``dtype`` (bf16 as its 16-bit pattern) as float32."""
    if dtype == "bfloat16":
        return (np.asarray(kv, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(kv, dtype=np.float32)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as canonical KV of ``dtype`` (bf16: round to nearest even, as its pattern)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    return np.ascontiguousarray(x, dtype=NUMPY_DTYPES[dtype])


def kv_dtype(kv: np.ndarray) -> str:
    """The canonical dtype name of an array handed to ``encode`` (uint16 means bf16's bit
    pattern)."""
    return {"<f4": "float32", "<f2": "float16", "<u2": "bfloat16"}.get(kv.dtype.str, "float32")


def check_params(codec_id: str, params: Mapping[str, object], allowed: Mapping[str, type]) -> None:
    """CodecError unless every parameter is known and of its type (bool is not an int here)."""
    for name, value in params.items():
        if name not in allowed:
            raise CodecError(
                f"codec {codec_id!r} does not understand parameter {name!r} "
                f"(known: {', '.join(sorted(allowed))})"
            )
        want = allowed[name]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise CodecError(
                f"codec {codec_id!r} parameter {name!r} must be {want.__name__} (got {value!r})"
            )
