"""What the scheduler side tells the worker side each step: plain, picklable data.

vLLM pickles the connector metadata from the engine-core process to the
workers, so it holds only built-in types: bytes for keys, names for routes
(the worker resolves a rule name against its own copy of the policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:  # the base class only exists where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
except ImportError:  # pragma: no cover - kvstrata without vLLM
    KVConnectorMetadata = object  # type: ignore[assignment,misc]


@dataclass
class LoadSpec:
    """Load these chunks of one request into its blocks before its forward pass.

    ``chunks`` are ``(chunk index, tier, key bytes, codec)``; ``block_ids``
    are all of the request's blocks in token order; tokens below
    ``skip_tokens`` are the engine's own and are not overwritten. ``keys``
    (per codec, every chunk of the prompt) let the worker promote hits into
    faster tiers.
    """

    req_id: str
    rule: str
    tenant: str
    skip_tokens: int
    chunks: list[tuple[int, str, bytes, str]]
    block_ids: list[int]
    keys: dict[str, list[bytes]] = field(default_factory=dict)  # codec -> every prompt chunk's key
    context_tokens: int = (
        0  # the prompt's length: the loader estimates the engine's compute from it
    )
    budget_ms: float | None = (
        None  # the request's latency budget: a deadline for the bandwidth scheduler
    )


@dataclass
class SaveSpec:
    """Copy one full chunk of one request out of its blocks after this step and store it.

    ``keys`` maps codec -> key bytes of this chunk; ``tiers`` is the write set
    after admission (decided on the scheduler side, which holds the reuse
    sketch).
    """

    req_id: str
    rule: str
    tenant: str
    chunk_index: int
    keys: dict[str, bytes]
    tiers: tuple[str, ...]
    block_ids: list[int]


@dataclass
class StrataMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    documents: list = field(
        default_factory=list
    )  # kvstrata.documents.connector.DocLoadSpec (stitched prefixes)
    async_loads: list = field(default_factory=list)  # kvstrata.connectors.vllm_async.AsyncLoad
