"""The routing hint: which tier holds how much of a prompt's prefix, and what loading it costs.

A prefix-aware router (llm-dynamo, llm-d's inference scheduler) picks an engine
from KV events and fixed per-medium weights. :func:`probe` gives it measured
numbers instead: for one prompt, per read tier of the request's route, how
many leading tokens that tier holds and the cost model's estimated load time
for them (from the latencies and bandwidths the orchestrator has observed),
plus the plan a request arriving now would get -- the same choice
:meth:`Orchestrator.alookup` makes (first tier holding each chunk, then the
cost model's best prefix), so ``plan_tokens`` is what the engine would load.

Contract:

* Read-only: a probe asks the tiers ``contains`` (under the orchestrator's
  breakers and timeouts, counted as ``contains`` operations) but observes
  nothing into the reuse sketch and serves no tokens in telemetry; probing a
  prompt never changes how the next request for it is routed.
* What the engine's own memory (vLLM's prefix cache) holds is not known here:
  ``skip_tokens`` (default 0) stands for it. Loads stop one token short of the
  prompt, as vLLM computes at least the last token.
* A tier that fails or is skipped by its breaker reports 0 tokens.
* Call from any thread but the orchestrator's background loop
  (:func:`lookup` blocks on it); :func:`probe` is the coroutine, for that loop.

Served over HTTP by :mod:`kvstrata.telemetry.lookup_http` (``/lookup`` on the exporter)
and printed by ``kvstrata lookup`` (:mod:`kvstrata.cli.lookup`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvstrata import runtime
from kvstrata.keys import chunk_keys
from kvstrata.orchestrator.calls import value_or
from kvstrata.policy.route import RequestContext


@dataclass(frozen=True)
class TierPrefix:
    """One read tier's share: ``tokens`` leading tokens
    held (whole chunks, from ``skip_tokens``)."""

    tier: str
    tokens: int
    chunks: int
    load_s: float  # the cost model's estimate to load those chunks from this tier alone
    recompute_s: float  # the engine's estimated prefill time for the same tokens

    @property
    def saved_s(self) -> float:
        return self.recompute_s - self.load_s


@dataclass(frozen=True)
class LookupReport:
    """The answer for one prompt. ``plan_tokens``: tier -> tokens a request now would load."""

    prompt_tokens: int
    chunk_tokens: int
    skip_tokens: int
    rule: str
    tiers: tuple[TierPrefix, ...]
    plan_tokens: Mapping[str, int]
    plan_load_s: float
    plan_ttft_s: float
    recompute_all_s: float
    reason: str

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "chunk_tokens": self.chunk_tokens,
            "skip_tokens": self.skip_tokens,
            "rule": self.rule,
            "tiers": [
                {
                    "tier": t.tier,
                    "tokens": t.tokens,
                    "chunks": t.chunks,
                    "load_s": t.load_s,
                    "recompute_s": t.recompute_s,
                    "saved_s": t.saved_s,
                }
                for t in self.tiers
            ],
            "plan": {
                "tokens": dict(self.plan_tokens),
                "load_s": self.plan_load_s,
                "ttft_s": self.plan_ttft_s,
                "recompute_all_s": self.recompute_all_s,
                "reason": self.reason,
            },
        }


async def probe(
    orch, tokens: Sequence[int], ctx: RequestContext, skip_tokens: int = 0
) -> LookupReport:
    """Per read tier, the prefix held and its load estimate; and the plan a request would get."""
    tokens = list(tokens)
    chunk = orch.chunk_tokens
    logical = chunk_keys(tokens, orch.model.namespace(ctx.tenant), chunk)
    hint = ctx.hints.get("reuse")
    ctx = dataclasses.replace(
        ctx, context_tokens=len(tokens), reuse=orch.reuse.predict(logical, _as_float(hint))
    )
    decision = orch.policy.decide(ctx)
    route = decision.route
    keys = {"none": tuple(logical)}
    for codec in {route.codec_for(t) for t in route.read} - {"none"}:
        keys[codec] = tuple(chunk_keys(tokens, orch.model.namespace(ctx.tenant, codec), chunk))
    first = skip_tokens // chunk
    last = min(len(logical), max(len(tokens) - 1, 0) // chunk)
    chunk_bytes = orch.model.chunk_bytes(chunk)
    rest = len(tokens) - skip_tokens
    recompute_all = orch.cost.recompute_s(rest)
    empty = LookupReport(
        len(tokens),
        chunk,
        skip_tokens,
        decision.rule,
        (),
        {},
        0.0,
        recompute_all,
        recompute_all,
        "nothing to load",
    )
    if route.load == "never" or not route.read or first >= last:
        return dataclasses.replace(
            empty, reason="route does not load" if route.load == "never" else "nothing to load"
        )

    held = await _held(orch, route, keys, first, last)
    prefixes = _prefixes(orch, route, held, chunk, chunk_bytes)
    run = _run(route, held, last - first)
    n, load_s, ttft_s, reason = _choose(orch, ctx, route, run, chunk, chunk_bytes, rest)
    plan: dict[str, int] = {}
    for i, tier in enumerate(run[:n], start=first):  # as Plan.tokens_by_tier counts them
        plan[tier] = plan.get(tier, 0) + (i + 1) * chunk - max(i * chunk, skip_tokens)
    return LookupReport(
        len(tokens),
        chunk,
        skip_tokens,
        decision.rule,
        tuple(prefixes),
        plan,
        load_s,
        ttft_s,
        recompute_all,
        reason,
    )


async def _held(orch, route, keys, first: int, last: int) -> dict[str, list[bool]]:
    """Per read tier, which of chunks ``[first, last)`` it holds (a failed call: none)."""
    held: dict[str, list[bool]] = {}
    for tier in route.read:
        codec = route.codec_for(tier)
        wanted = list(keys[codec][first:last])
        answer = await orch.calls.call(tier, "contains", lambda t, w=wanted: t.contains(w))
        held[tier] = list(value_or(answer, [False] * (last - first)))
    return held


def _run(route, held: dict[str, list[bool]], n: int) -> list[str]:
    """The tier each of the ``n`` chunks would come from (the first read tier holding it), up to
    the first chunk none holds."""
    run: list[str] = []
    for i in range(n):
        tier = next((t for t in route.read if held[t][i]), None)
        if tier is None:
            break
        run.append(tier)
    return run


def _prefixes(orch, route, held, chunk: int, chunk_bytes: int) -> list[TierPrefix]:
    """Each read tier's own leading run of chunks, with its load and recompute estimates."""
    prefixes = []
    for tier in route.read:
        n = next((i for i, present in enumerate(held[tier]) if not present), len(held[tier]))
        moved = n * chunk_bytes * orch.cost.stored_fraction(route.codec_for(tier))
        prefixes.append(
            TierPrefix(
                tier,
                n * chunk,
                n,
                orch.cost.read_s(tier, moved) if n else 0.0,
                orch.cost.recompute_s(n * chunk),
            )
        )
    return prefixes


def _choose(orch, ctx, route, run, chunk: int, chunk_bytes: int, rest: int):
    """``(chunks, load_s, ttft_s, reason)``: how much of ``run`` the route's load rule takes."""
    if route.load == "always":
        return len(run), float("nan"), float("nan"), "route always loads"
    budget = (
        ctx.budget_ms if ctx.budget_ms is not None else orch.config.orchestrator.default_budget_ms
    )
    choice = orch.cost.choose(
        run,
        chunk,
        chunk_bytes,
        rest,
        budget / 1e3,
        route.retrieval == "layerwise",
        codecs={t: route.codec_for(t) for t in route.read},
    )
    return choice.chunks, choice.load_s, choice.ttft_s, choice.reason


def lookup(
    orch,
    tokens: Sequence[int],
    ctx: RequestContext | None = None,
    skip_tokens: int = 0,
    timeout: float | None = None,
) -> LookupReport:
    """:func:`probe` from a thread other than the background loop (blocks until answered)."""
    ctx = ctx or RequestContext()
    return runtime.run(
        probe(orch, tokens, ctx, skip_tokens), timeout=timeout or orch.lookup_timeout_s()
    )


def context(
    cache_salt: str | None = None, params: Mapping | None = None, model: str = ""
) -> RequestContext:
    """The request context vLLM would build from a
    request's ``cache_salt`` and ``kv_transfer_params``."""
    params = dict(params or {})
    budget = _as_float(params.pop("budget_ms", None))
    tags = params.pop("tags", None) or ()
    hints = {str(k): str(v) for k, v in params.items() if isinstance(v, (str, int, float, bool))}
    return RequestContext(
        budget_ms=budget,
        tenant=cache_salt or "",
        model=model,
        tags=frozenset(str(t) for t in (tags if isinstance(tags, (list, tuple)) else [tags])),
        hints=hints,
    )


def _as_float(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
