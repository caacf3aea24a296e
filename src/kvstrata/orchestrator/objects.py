"""Chunk objects: the codecs that turn canonical KV into object bytes and back.

Writing: :meth:`ChunkObjects.encode` builds one object (header + one section
per layer) with the route's codec for a tier. Reading:
:meth:`ChunkObjects.decode` checks what a tier returned against what this
reader expects (geometry, codec, namespace) and decodes the layers asked for.
A tier has already verified the object's structure and checksums (MACs) when
it returns a :class:`~kvstrata.tiers.base.Hit`: verification happens there,
once, and is not repeated here; this is the *fit* check (is it an object for
this model, codec and tenant?), which a tier cannot know.
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
from kvstrata.model import ModelSpec
from kvstrata.plan import ChunkWrite, PlannedChunk
from kvstrata.tiers.base import Fetch, Hit

log = logging.getLogger(__name__)


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
            codec = self.codecs[name] = codec_from_config(name, spec.kind, spec.params)
        return codec

    def encode(self, write: ChunkWrite, kv: np.ndarray, codec_id: str) -> bytes:
        """One chunk's object under ``codec_id`` (runs on a worker thread)."""
        m = self.model
        if kv.shape != (m.n_layers, *self.geometry.shape):
            raise ValueError(
                f"chunk KV shaped {kv.shape}, expected {(m.n_layers, *self.geometry.shape)}"
            )
        codec = self.codec(codec_id)
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
        if not self._fits(result, tenant, chunk.codec):
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

    def _fits(self, hit: Hit, tenant: str, codec: str) -> bool:
        m, meta = self.model, hit.obj.meta
        found = (meta.kv_heads, meta.head_dim, meta.dtype, meta.n_tokens, hit.obj.header.n_layers)
        expected = (m.kv_heads, m.head_dim, m.dtype, self.chunk_tokens, m.n_layers)
        namespace = m.namespace(tenant, codec).fingerprint
        return found == expected and (meta.codec, meta.namespace) == (codec, namespace)
