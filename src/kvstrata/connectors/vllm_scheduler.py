"""The scheduler side of StrataConnector: plans loads and picks chunks to save.

Runs in vLLM's engine-core process. Per request it keeps the lookup's plan,
the request's blocks, and how far saving has got; each step it tells the
worker which chunks to load into which blocks and which newly completed
prompt chunks to copy out and store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kvstrata.connectors.vllm_meta import LoadSpec, SaveSpec, StrataMetadata
from kvstrata.connectors.vllm_setup import request_context
from kvstrata.orchestrator import Orchestrator
from kvstrata.plan import Plan

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request: Any  # vllm.v1.request.Request
    plan: Plan
    num_computed: int  # the engine's own hit when the plan was made
    block_ids: list[int] = field(default_factory=list)
    load_pending: bool = False
    next_save: int = 0  # chunks before this index are stored, loaded or engine-held


class SchedulerSide:
    def __init__(self, orchestrator: Orchestrator, block_size: int, model_id: str):
        self.orch = orchestrator
        self.chunk = orchestrator.chunk_tokens
        self.block_size = block_size
        self.model_id = model_id
        self._requests: dict[str, _Request] = {}
        self.documents = None  # a DocumentScheduler (kvstrata.documents.connector), set by the facade

    # -- admission --------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if self.documents is not None:  # documents branch: a stitched prefix, no chunk lookup, no saves
            stitched = self.documents.match(request, num_computed_tokens)
            if stitched is not None:
                return stitched, False
        state = self._requests.get(request.request_id)
        if state is None or state.num_computed != num_computed_tokens:
            tokens = list(request.prompt_token_ids or ())
            plan = self.orch.lookup(
                tokens,
                request_context(request, self.model_id),
                skip_tokens=num_computed_tokens,
                limit_tokens=len(tokens) - 1,  # vLLM computes at least the last prompt token
            )
            state = _Request(request, plan, num_computed_tokens)
            self._requests[request.request_id] = state
        return max(state.plan.end_token - num_computed_tokens, 0) if state.plan.chunks else 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if self.documents is not None and self.documents.after_alloc(request, blocks, num_external_tokens):
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.block_ids = list(blocks.get_block_ids()[0])
        state.load_pending = num_external_tokens > 0
        granted = state.num_computed + num_external_tokens
        if state.load_pending and granted != state.plan.end_token:
            log.warning("kvstrata: vLLM granted %d tokens, plan had %d; not loading",
                        granted, state.plan.end_token)
            state.load_pending = False

    # -- per step ---------------------------------------------------------------

    def build_connector_meta(self, out) -> StrataMetadata:
        meta = StrataMetadata()
        if self.documents is not None:
            meta.documents = self.documents.loads(out)
        progress: list[tuple[_Request, int]] = []
        for new in out.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._take_load(state, meta)
            progress.append((state, new.num_computed_tokens + out.num_scheduled_tokens[new.req_id]))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                resumed = req_id in cached.resumed_req_ids
                state.block_ids = list(new_blocks[0]) if resumed else state.block_ids + list(new_blocks[0])
            self._take_load(state, meta)
            progress.append((state, cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id]))
        for state, computed in progress:
            meta.saves.extend(self._saves(state, computed))
        return meta

    def _take_load(self, state: _Request, meta: StrataMetadata) -> None:
        if not state.load_pending:
            return
        state.load_pending = False
        plan = state.plan
        meta.loads.append(LoadSpec(
            req_id=state.request.request_id,
            rule=plan.decision.rule,
            tenant=plan.ctx.tenant,
            skip_tokens=plan.skip_tokens,
            chunks=[(c.index, c.tier, c.key.digest, c.codec) for c in plan.chunks],
            block_ids=list(state.block_ids),
            keys={codec: [k.digest for k in keys] for codec, keys in plan.keys.items()},
            context_tokens=plan.ctx.context_tokens,
            budget_ms=plan.ctx.budget_ms,
        ))
        state.next_save = max(state.next_save, plan.first_chunk + len(plan.chunks))

    def _saves(self, state: _Request, computed_tokens: int) -> list[SaveSpec]:
        """Prompt chunks that are complete in the engine after this step and not stored yet."""
        plan = state.plan
        n_prompt_chunks = len(plan.logical_keys())
        done = min(computed_tokens // self.chunk, n_prompt_chunks)
        first = max(state.next_save, state.num_computed // self.chunk)  # skip what the engine held
        per_chunk = self.chunk // self.block_size
        specs = []
        for index in range(first, done):
            tiers = self.orch.admitted(plan, index)
            blocks = state.block_ids[index * per_chunk:(index + 1) * per_chunk]
            if tiers and len(blocks) == per_chunk:
                specs.append(SaveSpec(
                    req_id=state.request.request_id,
                    rule=plan.decision.rule,
                    tenant=plan.ctx.tenant,
                    chunk_index=index,
                    keys={codec: keys[index].digest for codec, keys in plan.keys.items()},
                    tiers=tiers,
                    block_ids=blocks,
                ))
        state.next_save = max(state.next_save, done)
        return specs

    # -- end of a request -------------------------------------------------------

    def request_finished(self, request) -> dict[str, Any] | None:
        """Forget the request; what kvstrata did for it goes back in ``kv_transfer_params``."""
        if self.documents is not None and self.documents.handles(request.request_id):
            return self.documents.finished(request)
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return None
        plan = state.plan
        return {"kvstrata": {
            "rule": plan.decision.rule,
            "engine_tokens": plan.skip_tokens,
            "loaded_tokens": plan.tokens_by_tier(),
            "reason": plan.reason,
        }}

    def observe(self, reads) -> None:
        """Reads the worker measured: they teach this process's cost model."""
        for tier, seconds, nbytes in reads:
            self.orch.cost.observe_read(tier, seconds, nbytes)
