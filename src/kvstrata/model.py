"""The model as kvstrata sees it: its KV geometry and the identity of its weights."""

from __future__ import annotations

from dataclasses import dataclass

from kvstrata.compression.base import Geometry
from kvstrata.keys import Namespace

PAGES = "pages"  # the codec that stores engine pages (kvstrata.compression.pages)


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
    #: how the engine pages KV (``cpu-vec``, ``flash-nhd``; ``canonical`` outside an engine)
    #: and its block size: what objects of the ``pages`` codec hold
    page_layout: str = "canonical"
    page_block: int = 0

    def namespace(self, tenant: str = "", codec: str = "none") -> Namespace:
        model = f"{self.identity or self.name}/L{self.n_layers}/H{self.kv_heads}/D{self.head_dim}"
        if codec == PAGES:  # engine pages: only an engine with the same layout shares them
            codec = f"{PAGES}/{self.page_layout}/bs{self.page_block}"
        return Namespace(model, self.dtype, codec, tenant)

    @property
    def page_params(self) -> dict[str, str | int]:
        """The ``pages`` codec's parameters for this engine."""
        return {"layout": self.page_layout, "block_size": self.page_block}

    def geometry(self, chunk_tokens: int) -> Geometry:
        return Geometry(chunk_tokens, self.kv_heads, self.head_dim, self.dtype)

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.geometry(chunk_tokens).nbytes * self.n_layers
