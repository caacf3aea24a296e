"""Lookup: which prefix of a prompt to load, from which tiers.

Route the request, find the longest prefix the read tiers hold (each chunk
from the first tier having it), and keep the part that is cheaper to load
than to recompute within the latency budget (docs/orchestrator.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

from kvstrata.keys import ChunkKey, chunk_keys
from kvstrata.model import ModelSpec
from kvstrata.orchestrator.calls import Ok, TierCalls
from kvstrata.plan import Plan, PlannedChunk
from kvstrata.policy.cost import CostModel
from kvstrata.policy.reuse import ReuseEstimator
from kvstrata.policy.route import RequestContext, Route
from kvstrata.telemetry.metrics import ENGINE, RECOMPUTE, Telemetry

log = logging.getLogger(__name__)


class Lookup:
    def __init__(
        self,
        config,
        model: ModelSpec,
        calls: TierCalls,
        cost: CostModel,
        reuse: ReuseEstimator,
        telemetry: Telemetry,
        inflight: Mapping[ChunkKey, asyncio.Future],
    ):
        self.config, self.policy, self.model = config, config.policy, model
        self.chunk_tokens: int = config.chunk_tokens
        self.calls, self.cost, self.reuse, self.telemetry = calls, cost, reuse, telemetry
        self.inflight = inflight  # the writer's chunks in flight
        self.inflight_wait_s = 2.0  # the most a lookup waits for them, whatever its budget

    def failed(self, ctx: RequestContext, skip_tokens: int, exc: BaseException) -> Plan:
        """A plan that loads nothing: what a lookup that failed answers."""
        decision = self.policy.decide(ctx)
        return Plan(
            ctx, decision, self.chunk_tokens, skip_tokens, {}, reason=f"lookup failed: {exc}"
        )

    async def run(
        self, tokens, ctx: RequestContext, skip_tokens: int = 0, limit_tokens: int | None = None
    ) -> Plan:
        logical = chunk_keys(tokens, self.model.namespace(ctx.tenant), self.chunk_tokens)
        hint = _as_float(ctx.hints.get("reuse"))
        ctx = dataclasses.replace(
            ctx, context_tokens=len(tokens), reuse=self.reuse.predict(logical, hint)
        )
        self.reuse.observe(logical)
        budget_ms = ctx.budget_ms
        if budget_ms is None:
            budget_ms = self.config.orchestrator.default_budget_ms
        budget_s = budget_ms / 1e3
        budget_s -= await self._wait_inflight(logical, budget_s, len(tokens) - skip_tokens)
        decision = self.policy.decide(ctx)
        route = decision.route
        keys = {"none": tuple(logical)}
        for codec in {route.codec_for(t) for t in (*route.read, *route.write)} - {"none"}:
            namespace = self.model.namespace(ctx.tenant, codec)
            keys[codec] = tuple(chunk_keys(tokens, namespace, self.chunk_tokens))
        first = skip_tokens // self.chunk_tokens
        last = len(logical)
        if limit_tokens is not None:
            last = min(last, limit_tokens // self.chunk_tokens)
        plan = Plan(ctx, decision, self.chunk_tokens, skip_tokens, keys, first_chunk=first)
        self.telemetry.served(ENGINE, skip_tokens)
        if route.load == "never" or not route.read or first >= last:
            reason = "route does not load" if route.load == "never" else "nothing to load"
            return self._planned(plan, (), None, reason)
        found = await self._locate(route, keys, first, last)
        if route.load == "always":
            return self._planned(plan, found, None, "route always loads")
        choice = self.cost.choose(
            [c.tier for c in found],
            self.chunk_tokens,
            self.model.chunk_bytes(self.chunk_tokens),
            len(tokens) - skip_tokens,
            max(budget_s, 0.0),
            route.retrieval == "layerwise",
            codecs={t: route.codec_for(t) for t in route.read},
        )
        return self._planned(plan, found[: choice.chunks], choice, choice.reason)

    async def _wait_inflight(
        self, logical: Sequence[ChunkKey], budget_s: float, tokens: int
    ) -> float:
        """Wait for this prompt's chunks still queued for writing (the previous request's); the
        seconds waited, which the caller takes off the request's budget.

        Bounded by the smallest of ``inflight_wait_s``, half the budget and the time recomputing
        ``tokens`` would take (waiting longer than recomputing never pays). Half: the lookup
        itself needs the rest, and vLLM's scheduler gives up on a lookup at the whole budget,
        so a wait that took all of it made the request recompute what had just landed.
        """
        pending = [self.inflight[k] for k in logical if k in self.inflight]
        limit = min(self.inflight_wait_s, budget_s / 2, self.cost.recompute_s(tokens))
        if not pending or limit <= 0:
            return 0.0
        started = time.monotonic()
        await asyncio.wait(pending, timeout=limit)
        return time.monotonic() - started

    async def _locate(self, route: Route, keys, first: int, n: int) -> list[PlannedChunk]:
        """The contiguous run of chunks from ``first`` held by the read tiers, each from the
        first tier having it."""
        where: dict[int, PlannedChunk] = {}
        for tier in route.read:
            todo = [i for i in range(first, n) if i not in where]
            if not todo:
                break
            codec = route.codec_for(tier)
            wanted = [keys[codec][i] for i in todo]
            answer = await self.calls.call(tier, "contains", lambda t, w=wanted: t.contains(w))
            if not isinstance(answer, Ok):
                continue
            for i, present in zip(todo, answer.value, strict=False):
                if present:
                    where[i] = PlannedChunk(i, tier, keys[codec][i], codec)
            hits = sum(1 for present in answer.value if present)
            self.telemetry.located(tier, hits, len(todo) - hits)
        run: list[PlannedChunk] = []
        for i in range(first, n):
            if i not in where:
                break
            run.append(where[i])
        return run

    def _planned(self, plan: Plan, chunks, choice, reason: str) -> Plan:
        plan = dataclasses.replace(plan, chunks=tuple(chunks), choice=choice, reason=reason)
        self.telemetry.lookup(plan.decision.rule, "load" if plan.chunks else "recompute")
        context = plan.ctx.context_tokens
        recomputed = context - plan.end_token if plan.chunks else context - plan.skip_tokens
        self.telemetry.served(RECOMPUTE, max(recomputed, 0) if plan.chunks else recomputed)
        if log.isEnabledFor(logging.DEBUG):
            _log_plan(plan, choice, reason)
        return plan


def _log_plan(plan: Plan, choice, reason: str) -> None:
    context = plan.ctx.context_tokens
    log.debug(
        "lookup: rule=%s context=%d engine=%d load=%s recompute=%d decision=%s reason=%s%s",
        plan.decision.rule,
        context,
        plan.skip_tokens,
        plan.tokens_by_tier() or "{}",
        context - plan.end_token,
        "load" if plan.chunks else "recompute",
        reason,
        f" est_load_s={choice.load_s:.4f} est_ttft_s={choice.ttft_s:.4f}"
        f" est_recompute_all_s={choice.recompute_all_s:.4f}"
        if choice is not None
        else "",
    )


def _as_float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None
