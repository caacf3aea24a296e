"""The model as kvstrata sees it: its KV geometry and the identity of its weights."""

from __future__ import annotations

from dataclasses import dataclass

from kvstrata.compression.base import Geometry
from kvstrata.keys import Namespace


@dataclass(frozen=True)
class ModelSpec:
    """What KV of one model looks like, and which weights it belongs to.

    ``name`` is the label policies match (``match: model:``) and logs show;
    ``identity`` is what keys are derived from: the weights' fingerprint
    (:func:`kvstrata.fingerprint.model_identity`), or "" to key by ``name``
    (an operator's explicit ``model_id``, tests).
    """

    name: str
    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    identity: str = ""

    def namespace(self, tenant: str = "", codec: str = "none") -> Namespace:
        model = f"{self.identity or self.name}/L{self.n_layers}/H{self.kv_heads}/D{self.head_dim}"
        return Namespace(model, self.dtype, codec, tenant)

    def geometry(self, chunk_tokens: int) -> Geometry:
        return Geometry(chunk_tokens, self.kv_heads, self.head_dim, self.dtype)

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.geometry(chunk_tokens).nbytes * self.n_layers
