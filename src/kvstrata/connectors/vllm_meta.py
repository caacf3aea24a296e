"""What the scheduler side tells the worker side each step: plain, picklable data.

vLLM pickles the connector metadata from the engine-core process to the
workers, so it holds only built-in types: bytes for keys, names for routes
(the worker resolves a rule name against its own copy of the policy).

Every conversion across that boundary lives here, both directions side by
side: ``Plan -> LoadSpec -> Plan`` (:meth:`LoadSpec.of` / :meth:`LoadSpec.plan`),
a plan's chunk -> ``SaveSpec -> ChunkWrite`` (:meth:`SaveSpec.of` /
:meth:`SaveSpec.write`), ``StitchPlan -> DocLoadSpec -> segments``
(:meth:`DocLoadSpec.of` / :meth:`DocLoadSpec.stitch_segments`), and
``ChunkKey -> bytes -> ChunkKey`` inside each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstrata.documents.stitch import Segment, StitchPlan
from kvstrata.keys import ChunkKey
from kvstrata.plan import ChunkWrite, Plan, PlannedChunk
from kvstrata.policy.route import Decision, RequestContext, Route

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

    @classmethod
    def of(cls, req_id: str, plan: Plan, block_ids: list[int]) -> LoadSpec:
        """The load of ``plan`` into the request's blocks, as the worker receives it."""
        return cls(
            req_id=req_id,
            rule=plan.decision.rule,
            tenant=plan.ctx.tenant,
            skip_tokens=plan.skip_tokens,
            chunks=[(c.index, c.tier, c.key.digest, c.codec) for c in plan.chunks],
            block_ids=list(block_ids),
            keys={codec: [k.digest for k in keys] for codec, keys in plan.keys.items()},
            context_tokens=plan.ctx.context_tokens,
            budget_ms=plan.ctx.budget_ms,
        )

    def chunk_codec(self, chunk_index: int) -> str:
        """The codec chunk ``chunk_index`` was stored with (what its delivered layers hold)."""
        return next(codec for i, _, _, codec in self.chunks if i == chunk_index)

    def plan(self, route: Route, chunk_tokens: int) -> Plan:
        """The plan again, on the worker (``route``: the worker's route of :attr:`rule`)."""
        chunks = tuple(
            PlannedChunk(i, tier, ChunkKey(key), codec) for i, tier, key, codec in self.chunks
        )
        ctx = RequestContext(
            context_tokens=self.context_tokens, budget_ms=self.budget_ms, tenant=self.tenant
        )
        return Plan(
            ctx,
            Decision(self.rule, route),
            chunk_tokens,
            self.skip_tokens,
            keys={codec: tuple(ChunkKey(k) for k in ks) for codec, ks in self.keys.items()},
            first_chunk=chunks[0].index if chunks else 0,
            chunks=chunks,
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

    @classmethod
    def of(
        cls, req_id: str, plan: Plan, index: int, tiers: tuple[str, ...], block_ids: list[int]
    ) -> SaveSpec:
        """Chunk ``index`` of ``plan``'s prompt, to be copied out of ``block_ids``."""
        keys = {codec: keys[index].digest for codec, keys in plan.keys.items()}
        return cls(req_id, plan.decision.rule, plan.ctx.tenant, index, keys, tiers, block_ids)

    def write(self, route: Route, chunk_tokens: int) -> ChunkWrite:
        """What the worker hands the orchestrator (``route``: its route of :attr:`rule`)."""
        keys = {codec: ChunkKey(key) for codec, key in self.keys.items()}
        first = self.chunk_index * chunk_tokens
        return ChunkWrite(route, self.tenant, keys, tuple(self.tiers), first)


@dataclass
class DocLoadSpec:
    """Write the stitched KV of prompt tokens ``[skip_tokens, end)`` into the request's blocks."""

    req_id: str
    block_ids: list[int]
    skip_tokens: int
    end: int
    segments: list[tuple[bytes, int, int, int]]  # (key, start, n_tokens, shift)
    doc_names: list[str]

    @classmethod
    def of(cls, req_id: str, block_ids, skip_tokens: int, plan: StitchPlan) -> DocLoadSpec:
        segments = [(s.key, s.start, s.n_tokens, s.shift) for s in plan.segments]
        return cls(req_id, list(block_ids), skip_tokens, plan.end, segments, plan.documents)

    def stitch_segments(self) -> list[Segment]:
        return [Segment("", key, start, n, shift) for key, start, n, shift in self.segments]

    def keys(self) -> list[ChunkKey]:
        """The documents' object keys, each once, in order."""
        return [ChunkKey(k) for k in dict.fromkeys(s[0] for s in self.segments)]


@dataclass
class StrataMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    documents: list[DocLoadSpec] = field(default_factory=list)  # stitched prefixes
    async_loads: list = field(default_factory=list)  # kvstrata.connectors.vllm_async.AsyncLoad
