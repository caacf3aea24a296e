"""Chunk objects: the codecs that turn canonical KV into object bytes and back.

Writing: :meth:`ChunkObjects.encode` builds one object (header + one section
per layer) with the route's codec for a tier. Reading:
:meth:`ChunkObjects.decode` checks what a tier returned against what this
reader expects (geometry, codec, namespace) and decodes the layers asked for.
Verification happens once per object and stage: a tier has already verified
the object's structure and checksums (MACs) when it returns a
:class:`~kvstrata.tiers.base.Hit` (the tier contract), and this is not
repeated here; :class:`Expected` is the one *fit* check (is it an object for
this model, codec and tenant?), which a tier cannot know, used for chunks
and for whole objects (:mod:`.whole`) alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kvstrata import auth
from kvstrata import format as fmt
from kvstrata.compression.base import (
    Codec,
    CodecError,
    Geometry,
    codec_from_config,
    confirm_header,
    header_params,
)
from kvstrata.compression.pages import is_native
from kvstrata.model import PAGES, ModelSpec
from kvstrata.plan import ChunkWrite, PlannedChunk
from kvstrata.tiers.base import Fetch, Hit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expected:
    """What a reader expects of an object's header; ``n_tokens=None`` accepts any length."""

    codec: str
    namespace: bytes
    dtype: str
    kv_heads: int
    head_dim: int
    n_layers: int
    n_tokens: int | None = None

    def fits(self, obj: fmt.ChunkObject) -> bool:
        meta = obj.meta
        found = (meta.codec, meta.namespace, meta.dtype, meta.kv_heads, meta.head_dim)
        if found != (self.codec, self.namespace, self.dtype, self.kv_heads, self.head_dim):
            return False
        if obj.header.n_layers != self.n_layers:
            return False
        return self.n_tokens is None or meta.n_tokens == self.n_tokens


@dataclass(frozen=True)
class Decoded:
    """A chunk's layers, decoded, and how many stored bytes they took."""

    layers: dict[int, np.ndarray]
    stored_bytes: int


@dataclass(frozen=True)
class Rejected:
    """A fetched chunk that cannot be used: absent, or a bad object (``reason``).

    ``by_tier``: the tier answered a miss (else the tier returned an object that
    does not fit this reader).
    """

    reason: Literal["absent", "corrupt", "unauthenticated", "foreign", "unsupported", "codec"]
    by_tier: bool = False


class ChunkObjects:
    """Encoding and decoding of one model's chunk objects, with the configuration's codecs."""

    def __init__(self, config, model: ModelSpec, chunk_tokens: int, keyring: auth.Keyring):
        self.config, self.model, self.chunk_tokens = config, model, chunk_tokens
        self.keyring = keyring
        self.geometry: Geometry = model.geometry(chunk_tokens)
        self.codecs: dict[str, Codec] = {}

    def codec(self, name: str) -> Codec:
        """The configuration's codec named ``name`` (``codecs:`` or a built-in), for writing and
        reading alike: an object's header never chooses a codec (see :func:`confirm_header`)."""
        codec = self.codecs.get(name)
        if codec is None:
            spec = self.config.codec(name)
            params = self.model.page_params if spec.kind == PAGES else spec.params
            codec = self.codecs[name] = codec_from_config(name, spec.kind, params)
        return codec

    def is_native(self, name: str) -> bool:
        """Whether codec ``name`` stores engine pages (:mod:`kvstrata.compression.pages`)."""
        return is_native(self.codec(name))

    def encode(self, write: ChunkWrite, kv: np.ndarray, codec_id: str) -> bytes:
        """One chunk's object under ``codec_id`` (runs on a worker thread).

        ``kv`` is canonical ``[n_layers, 2, T, H, D]`` or the engine's page bytes
        ``[n_layers, elements]`` (a save from vLLM), converted here for a codec that needs the
        other."""
        m = self.model
        pages = kv.ndim == 2
        if kv.size != m.n_layers * int(np.prod(self.geometry.shape)) or not (
            pages or kv.shape == (m.n_layers, *self.geometry.shape)
        ):
            raise ValueError(
                f"chunk KV shaped {kv.shape}, expected {(m.n_layers, *self.geometry.shape)}"
            )
        codec = self.codec(codec_id)
        if pages and not is_native(codec):
            engine = self.codec(PAGES)
            kv = np.stack([engine.to_canonical(layer, self.geometry) for layer in kv])
        meta = fmt.ObjectMeta(
            codec_id,
            m.dtype,
            self.chunk_tokens,
            m.kv_heads,
            m.head_dim,
            m.namespace(write.tenant, codec_id).fingerprint,
            write.keys[codec_id].digest,
            header_params(codec_id, codec),
        )
        sections = [
            codec.encode(kv[layer], layer, first_position=write.first_position)
            for layer in range(m.n_layers)
        ]
        return fmt.encode(meta, sections, self.keyring)

    def decode(
        self, tier: str, tenant: str, chunk: PlannedChunk, result: Fetch, layers: range
    ) -> Decoded | Rejected:
        """The layers of one fetched chunk, or why it cannot be used."""
        if not isinstance(result, Hit):
            return Rejected(result.reason, by_tier=True)
        if not self.expected(tenant, chunk.codec).fits(result.obj):
            return Rejected("foreign")
        meta = result.obj.meta
        try:  # the reader's own codec; the header may only confirm it
            codec = self.codec(chunk.codec)
            confirm_header(chunk.codec, codec, meta.codec, meta.codec_params)
            out = {n: codec.decode(result.obj.layers[n], self.geometry) for n in layers}
        except CodecError as exc:
            log.warning("tier %s chunk %s undecodable: %s", tier, chunk.key, exc)
            return Rejected("codec")
        return Decoded(out, sum(len(result.obj.layers[n]) for n in layers))

    def expected(self, tenant: str, codec: str) -> Expected:
        """What a chunk object of ``tenant`` stored with ``codec`` must say about itself."""
        m = self.model
        namespace = m.namespace(tenant, codec).fingerprint
        return Expected(
            codec, namespace, m.dtype, m.kv_heads, m.head_dim, m.n_layers, self.chunk_tokens
        )
