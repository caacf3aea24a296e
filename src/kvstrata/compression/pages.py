"""Codec ``pages``: KV stored in the engine's own page layout, so a hit is a plain copy.

A route that names ``codec: pages`` for a tier stores each chunk's layers as
the bytes of the engine's pages, exactly as vLLM holds them: saving is one
block copy, loading one contiguous copy per block, with no transpose either
way (vLLM's CPU build stores K dimension-major inside a page, so the portable
canonical order costs a transpose of every K on both paths; docs/vllm-ttft.md
measures it). It is lossless and compresses nothing.

The price is portability: only an engine with the same page layout and block
size can read these objects, so the layout is part of the key namespace
(:meth:`kvstrata.model.ModelSpec.namespace`) and of the header's parameters
(confirmed on read). Use it for tiers one engine build reads (its DRAM, its
local disk: the embedded default does); keep the canonical codec (``none``)
for tiers engines of different builds share.

Layouts (``layout`` parameter; one block = ``block_size`` tokens):

* ``cpu-vec`` -- vLLM's CPU ``vec`` backend: per block ``[kv_heads][2][...]``,
  K as ``[head_dim][block_size]``, V as ``[block_size][head_dim]``;
* ``flash-nhd`` -- GPU FlashAttention/FlashInfer NHD: a chunk's pages are
  ``[2][blocks][block_size][kv_heads][head_dim]``, the canonical order itself;
* ``canonical`` -- no engine (a process without vLLM: the CLI, benchmarks):
  canonical order, in a namespace of its own.

Contract beyond :class:`~kvstrata.compression.base.Codec`: ``native`` is True;
``encode`` takes canonical KV ``[2, T, H, D]`` (converted) or the page bytes
as a flat array (stored as they are); ``decode`` returns the page bytes as a
flat array (what the hit path copies into pages), and :meth:`to_canonical`
converts them for anything that needs canonical KV.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from kvstrata.compression.base import NUMPY_DTYPES, CodecError, Geometry, check_params, register

LAYOUTS = ("cpu-vec", "flash-nhd", "canonical")


@register
class PagesCodec:
    id: ClassVar[str] = "pages"
    lossless: ClassVar[bool] = True
    local_params: ClassVar[frozenset[str]] = frozenset()
    #: sections hold engine pages, not canonical KV (see the module's contract)
    native: ClassVar[bool] = True

    def __init__(self, layout: str = "canonical", block_size: int = 0):
        if layout not in LAYOUTS:
            raise CodecError(f"codec 'pages': unknown page layout {layout!r}")
        if layout != "canonical" and block_size <= 0:
            raise CodecError(f"codec 'pages': layout {layout!r} needs a block size")
        self.layout, self.block_size = layout, block_size

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {"layout": self.layout, "block_size": self.block_size}

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> PagesCodec:
        check_params(cls.id, params, {"layout": str, "block_size": int})
        return cls(str(params.get("layout", "canonical")), int(params.get("block_size", 0)))

    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes:
        if kv.ndim == 1:  # already the engine's page bytes
            return np.ascontiguousarray(kv).tobytes()
        return self.from_canonical(kv).tobytes()

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        if len(section) != geometry.nbytes:
            raise CodecError(f"section is {len(section)} bytes, geometry needs {geometry.nbytes}")
        return np.frombuffer(section, dtype=NUMPY_DTYPES[geometry.dtype])

    # -- conversions ----------------------------------------------------------------------

    def from_canonical(self, kv: np.ndarray) -> np.ndarray:
        """Canonical ``[2, T, H, D]`` as this layout's flat page bytes (a new array)."""
        _, t, h, d = kv.shape
        if self.layout != "cpu-vec":
            return np.ascontiguousarray(kv).reshape(-1)
        n, bs = self._blocks(t), self.block_size
        out = np.empty((n, h, 2, bs * d), dtype=kv.dtype)
        out[:, :, 0] = kv[0].reshape(n, bs, h, d).transpose(0, 2, 3, 1).reshape(n, h, d * bs)
        out[:, :, 1] = kv[1].reshape(n, bs, h, d).transpose(0, 2, 1, 3).reshape(n, h, bs * d)
        return out.reshape(-1)

    def to_canonical(self, pages: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Flat page bytes of one layer as canonical ``[2, T, H, D]`` (a new array)."""
        t, h, d = geometry.n_tokens, geometry.kv_heads, geometry.head_dim
        if pages.size != 2 * t * h * d:
            raise CodecError(f"{pages.size} page elements, geometry needs {2 * t * h * d}")
        if self.layout != "cpu-vec":
            return np.array(pages.reshape(2, t, h, d))
        n, bs = self._blocks(t), self.block_size
        p = pages.reshape(n, h, 2, bs * d)
        k = p[:, :, 0].reshape(n, h, d, bs).transpose(0, 3, 1, 2).reshape(t, h, d)
        v = p[:, :, 1].reshape(n, h, bs, d).transpose(0, 2, 1, 3).reshape(t, h, d)
        return np.stack((k, v))

    def _blocks(self, n_tokens: int) -> int:
        if n_tokens % self.block_size:
            raise CodecError(f"{n_tokens} tokens is not a whole number of {self.block_size}-blocks")
        return n_tokens // self.block_size


def is_native(codec: object) -> bool:
    """Whether ``codec``'s sections are engine pages rather than canonical KV."""
    return bool(getattr(type(codec), "native", False))
