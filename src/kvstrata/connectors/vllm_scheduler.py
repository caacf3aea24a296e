"""The scheduler side of StrataConnector: plans loads and picks chunks to save.

Runs in vLLM's engine-core process. Per request it keeps the lookup's plan,
the request's blocks, and how far saving has got; each step it tells the
worker which chunks to load into which blocks and which newly completed
prompt chunks to copy out and store.

The scheduler never waits on a tier: a lookup runs on the background loop
(:meth:`Orchestrator.alookup`); ``get_num_new_matched_tokens`` waits for it
at most :data:`INLINE_WAIT_S` (a DRAM-index and local-disk lookup finishes
within that), else answers ``None`` -- vLLM's "ask again" -- and picks the
plan up at a later step. A lookup not done by the request's latency budget
(``budget_ms``, else ``orchestrator.default_budget_ms``) is abandoned: a
miss, the prompt is recomputed (and still saved).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvstrata import runtime
from kvstrata.connectors import vllm_async, vllm_pool
from kvstrata.connectors.vllm_meta import LoadSpec, SaveSpec, StrataMetadata
from kvstrata.connectors.vllm_setup import request_context
from kvstrata.keys import chunk_keys
from kvstrata.orchestrator import Orchestrator
from kvstrata.plan import Plan
from kvstrata.policy.route import RequestContext
from kvstrata.telemetry.metrics import ENGINE, RECOMPUTE

log = logging.getLogger(__name__)

#: how long ``get_num_new_matched_tokens`` waits for a lookup before answering "ask again"
INLINE_WAIT_S = 0.005
#: ... and when no other request is known to kvstrata. Answering "ask again" at once makes an
#: otherwise idle engine spin through empty steps, whose Python work starves (GIL) the very saves
#: a lookup may be waiting for. Not the whole budget: a request vLLM has not shown kvstrata yet
#: may be waiting behind this one in the same scheduling pass.
ALONE_WAIT_S = 0.05


@dataclass
class _Lookup:
    """A lookup running on the background loop for one request."""

    future: concurrent.futures.Future
    ctx: RequestContext
    num_computed: int
    give_up_at: float


@dataclass
class _Request:
    request: Any  # vllm.v1.request.Request
    plan: Plan
    num_computed: int  # the engine's own hit when the plan was made
    block_ids: list[int] = field(default_factory=list)
    load_pending: bool = False
    loaded: bool = False  # a load of the plan was handed to the worker
    load_async: bool = False  # the load runs between steps (kvstrata.connectors.vllm_async)
    async_abandoned: bool = False  # ... and missed its deadline: the prompt was recomputed
    next_save: int = 0  # chunks before this index are stored, loaded or engine-held


class SchedulerSide:
    def __init__(
        self,
        orchestrator: Orchestrator,
        block_size: int,
        model_id: str,
        documents=None,
        async_settings: vllm_async.AsyncSettings | None = None,
    ):
        self.orch = orchestrator
        self.chunk = orchestrator.chunk_tokens
        self.block_size = block_size
        self.model_id = model_id
        self._requests: dict[str, _Request] = {}
        self._lookups: dict[str, _Lookup] = {}
        self.inline_wait_s = INLINE_WAIT_S
        self.alone_wait_s = ALONE_WAIT_S
        self.async_ = vllm_async.AsyncScheduler(
            async_settings or vllm_async.AsyncSettings(),
            orchestrator.config.orchestrator.default_budget_ms,
            {name: spec.kind for name, spec in orchestrator.config.tiers.items()},
        )
        self.events = None  # an EventLog (kvstrata.connectors.vllm_events), set by the facade
        self.documents = documents  # a DocumentScheduler (kvstrata.documents.connector) or None

    # -- admission --------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if (
            self.documents is not None
        ):  # documents branch: a stitched prefix, no chunk lookup, no saves
            stitched = self.documents.match(request, num_computed_tokens)
            if stitched is not None:
                return stitched, False
        state = self._requests.get(request.request_id)
        if state is None or state.num_computed != num_computed_tokens:
            plan = self._plan(request, num_computed_tokens)
            if plan is None:
                return None, False  # still looking: vLLM asks again at a later step
            state = _Request(request, plan, num_computed_tokens)
            self._requests[request.request_id] = state
        tokens = max(state.plan.end_token - num_computed_tokens, 0) if state.plan.chunks else 0
        return self.async_.answer(state, tokens, self._requests.values())

    def _plan(self, request, num_computed: int) -> Plan | None:
        """The lookup's plan for this request, None while it runs (started on the first call)."""
        req_id = request.request_id
        pending = self._lookups.get(req_id)
        if pending is None or pending.num_computed != num_computed:
            if (
                pending is not None
            ):  # the engine's own hit changed: that answer is for another question
                pending.future.cancel()
            tokens = list(request.prompt_token_ids or ())
            ctx = request_context(request, self.model_id)
            budget = (
                ctx.budget_ms
                if ctx.budget_ms is not None
                else self.orch.config.orchestrator.default_budget_ms
            )
            future = runtime.submit(
                self.orch.alookup(
                    tokens,
                    ctx,
                    skip_tokens=num_computed,
                    limit_tokens=len(tokens) - 1,  # vLLM computes at least the last prompt token
                )
            )
            pending = self._lookups[req_id] = _Lookup(
                future, ctx, num_computed, time.monotonic() + budget / 1e3
            )
        if not pending.future.done():  # not done yet, or failed: both handled below
            with contextlib.suppress(Exception):
                pending.future.result(self._inline_wait(req_id, pending))
        if not pending.future.done():
            if time.monotonic() < pending.give_up_at:
                return None
            pending.future.cancel()
            del self._lookups[req_id]
            log.warning("kvstrata: lookup for %s not done within its budget; recomputing", req_id)
            return self._miss(request, pending, "lookup over budget")
        del self._lookups[req_id]
        try:
            return pending.future.result()
        except Exception as exc:  # a lookup can always fall back to recompute
            log.warning("kvstrata: lookup for %s failed, recomputing: %s", req_id, exc)
            return self._miss(request, pending, f"lookup failed: {exc}")

    def _inline_wait(self, req_id: str, pending: _Lookup) -> float:
        others = any(rid != req_id for rid in (*self._requests, *self._lookups))
        wait = self.inline_wait_s if others else self.alone_wait_s  # why: ALONE_WAIT_S
        return max(0.0, min(wait, pending.give_up_at - time.monotonic()))

    def _miss(self, request, pending: _Lookup, reason: str) -> Plan:
        """A plan that loads nothing but keeps the prompt's keys, so its chunks are still saved."""
        tokens = list(request.prompt_token_ids or ())
        ctx = pending.ctx
        decision = self.orch.policy.decide(ctx)
        route = decision.route
        keys = {
            codec: tuple(
                chunk_keys(tokens, self.orch.model.namespace(ctx.tenant, codec), self.chunk)
            )
            for codec in {"none", *(route.codec_for(t) for t in (*route.read, *route.write))}
        }
        self.orch.telemetry.lookup(decision.rule, "recompute")
        self.orch.telemetry.served(RECOMPUTE, len(tokens) - pending.num_computed)
        return Plan(ctx, decision, self.chunk, pending.num_computed, keys, reason=reason)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if self.documents is not None and self.documents.after_alloc(
            request, blocks, num_external_tokens
        ):
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.block_ids = list(blocks.get_block_ids()[0])
        state.load_pending = num_external_tokens > 0
        granted = state.num_computed + num_external_tokens
        if state.load_pending and granted != state.plan.end_token:
            log.warning(
                "kvstrata: vLLM granted %d tokens, plan had %d; not loading",
                granted,
                state.plan.end_token,
            )
            state.load_pending = False
        self.async_.after_alloc(state)

    # -- per step ---------------------------------------------------------------

    def build_connector_meta(self, out) -> StrataMetadata:
        meta = StrataMetadata()
        if self.documents is not None:
            meta.documents = self.documents.loads(out)
        for state in self.async_.take():  # async loads: their requests wait, not scheduled
            self._take_load(state, meta)
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
                state.block_ids = (
                    list(new_blocks[0]) if resumed else state.block_ids + list(new_blocks[0])
                )
            self._take_load(state, meta)
            progress.append(
                (state, cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id])
            )
        for state, computed in progress:
            meta.saves.extend(self._saves(state, computed))
        return meta

    def _take_load(self, state: _Request, meta: StrataMetadata) -> None:
        if not state.load_pending:
            return
        state.load_pending = False
        state.loaded = True
        plan = state.plan
        spec = LoadSpec.of(state.request.request_id, plan, state.block_ids)
        if state.load_async:
            meta.async_loads.append(vllm_async.AsyncLoad(spec, self.async_.deadline_s(plan)))
        else:
            meta.loads.append(spec)
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
            blocks = state.block_ids[index * per_chunk : (index + 1) * per_chunk]
            if tiers and len(blocks) == per_chunk:
                specs.append(SaveSpec.of(state.request.request_id, plan, index, tiers, blocks))
        state.next_save = max(state.next_save, done)
        self._expect(plan, specs)
        if self.events is not None and self.events.enabled:
            route = plan.decision.route
            for spec in specs:
                self.events.remember(
                    {spec.keys[route.codec_for(t)] for t in spec.tiers},
                    state.request,
                    spec.chunk_index * per_chunk,
                    per_chunk,
                )
        return specs

    def _expect(self, plan: Plan, specs: list[SaveSpec]) -> None:
        """Tell the worker-pool indexes which chunks are on their way (a lookup waits for them)."""
        indexes = vllm_pool.indexes(self.orch) if specs else {}
        route = plan.decision.route
        for name, index in indexes.items():
            index.expect([spec.keys[route.codec_for(name)] for spec in specs if name in spec.tiers])

    # -- end of a request -------------------------------------------------------

    def request_finished(self, request) -> dict[str, Any] | None:
        """Forget the request; what kvstrata did for it goes back in ``kv_transfer_params``."""
        if self.documents is not None and self.documents.handles(request.request_id):
            return self.documents.finished(request)
        pending = self._lookups.pop(request.request_id, None)
        if pending is not None:
            pending.future.cancel()
        self.async_.forget(request.request_id)
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return None
        plan = state.plan
        loaded = plan.tokens_by_tier() if state.loaded else {}
        source = (
            max(loaded, key=loaded.get) if loaded else ENGINE if plan.skip_tokens else RECOMPUTE
        )
        self.orch.telemetry.request(source)
        return {
            "kvstrata": {
                "rule": plan.decision.rule,
                "engine_tokens": plan.skip_tokens,
                "loaded_tokens": plan.tokens_by_tier(),
                "load": ("async" if state.load_async else "sync") if state.loaded else None,
                "reason": plan.reason,
            }
        }

    def tokens_by_tier(self, req_id: str) -> dict[str, int]:
        """The tokens the request's plan loads from each tier ({} if it has no plan)."""
        state = self._requests.get(req_id)
        return state.plan.tokens_by_tier() if state else {}

    def observe(self, reads) -> None:
        """Reads the worker measured: they teach this process's cost model."""
        for tier, seconds, nbytes in reads:
            self.orch.cost.observe_read(tier, seconds, nbytes)
