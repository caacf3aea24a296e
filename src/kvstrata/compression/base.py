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
    id: ClassVar[str]
    lossless: ClassVar[bool]

    @property
    def params(self) -> Mapping[str, int | float | str | bool]: ...
    def encode(self, kv: np.ndarray) -> bytes: ...
    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray: ...


class IdentityCodec:
    """Canonical bytes as they are: K then V, ``[token][kv_head][head_dim]``, the model's dtype."""

    id: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> IdentityCodec:
        if params:
            raise CodecError(f"codec 'none' takes no parameters, got {sorted(params)}")
        return cls()

    def encode(self, kv: np.ndarray) -> bytes:
        return np.ascontiguousarray(kv).tobytes()

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        if len(section) != geometry.nbytes:
            raise CodecError(f"section is {len(section)} bytes, geometry needs {geometry.nbytes}")
        return np.frombuffer(section, dtype=NUMPY_DTYPES[geometry.dtype]).reshape(geometry.shape)


_CODECS: dict[str, type] = {IdentityCodec.id: IdentityCodec}


def register(cls: type) -> type:
    _CODECS[cls.id] = cls
    return cls


def codec_from_header(codec_id: str, params: Mapping[str, object]) -> Codec:
    """The codec that can decode an object, or CodecError if this build has none."""
    if codec_id not in _CODECS:
        raise CodecError(f"unknown codec {codec_id!r}")
    return _CODECS[codec_id].from_params(params)
