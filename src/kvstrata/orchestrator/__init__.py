"""The orchestrator: the one place that talks to tiers.

Everything cross-cutting happens here and only here: the policy decision, the
cost model, codecs, timeouts, the circuit breakers, error mapping and
metrics. Tiers stay dumb stores; the connector stays a thin adapter.

* ``lookup(tokens, ctx, skip_tokens)`` -> :class:`Plan`: route the request,
  find the longest prefix the read tiers hold, and keep the part that is
  cheaper to load than to recompute within the latency budget.
* ``load(plan)`` -> :class:`LoadHandle`: reads start at once on the
  background loop, layer group by layer group; the engine waits per layer.
* ``save(plan, chunk_index, kv)``: queues a chunk for the route's write tiers
  and returns at once; a full queue drops the chunk (counted), never blocks.

Failure semantics: a tier error or timeout on lookup or load is a miss (the
engine recomputes); on save it is counted and dropped. A tier that keeps
failing is skipped by its breaker for a cooldown. Nothing here raises into
the engine for a tier's sake.

Threads: the public methods are called from engine threads; all tier I/O runs
on the process's background loop (:mod:`kvstrata.runtime`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstrata import format as fmt
from kvstrata import runtime
from kvstrata.auth import keyring_for
from kvstrata.breaker import Breaker
from kvstrata.compression.base import (
    Codec,
    CodecError,
    codec_from_config,
    confirm_header,
    header_params,
)
from kvstrata.keys import ChunkKey, chunk_keys
from kvstrata.model import ModelSpec
from kvstrata.plan import LoadHandle, Plan, PlannedChunk
from kvstrata.policy import pipeline
from kvstrata.policy.bandwidth import Flow, Link
from kvstrata.policy.cost import CostModel
from kvstrata.policy.engine import DEFAULT_RULE
from kvstrata.policy.reuse import ReuseEstimator
from kvstrata.policy.route import RequestContext, Route
from kvstrata.telemetry import exporter
from kvstrata.telemetry.metrics import ENGINE, RECOMPUTE, Telemetry
from kvstrata.tiers.base import Hit, Tier, TierError, tier_class

log = logging.getLogger(__name__)

KV = np.ndarray | Callable[[], np.ndarray]

_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


@dataclass(frozen=True)
class _SaveItem:
    route: Route
    tenant: str
    logical_key: ChunkKey
    keys: Mapping[str, ChunkKey]  # codec -> key of this chunk
    kv: KV  # [n_layers, 2, chunk_tokens, kv_heads, head_dim], or a callable producing it
    tiers: tuple[str, ...]
    first_position: int = 0  # the chunk's first token position (codecs that undo RoPE need it)


class Orchestrator:
    def __init__(
        self,
        config,
        model: ModelSpec,
        tiers: Mapping[str, Tier] | None = None,
        telemetry: Telemetry | None = None,
        save_workers: int = 2,
    ):
        self.config = config
        self.model = model
        self.chunk_tokens: int = config.chunk_tokens
        self.policy = config.policy
        self.telemetry = telemetry or Telemetry()
        self.cost = CostModel.from_config(config, n_layers=model.n_layers)
        r = config.reuse
        self.reuse = ReuseEstimator(r.sketch_width, r.sketch_depth, r.half_life_s)
        b = config.orchestrator.breaker
        self.tiers: dict[str, Tier] = (
            dict(tiers)
            if tiers is not None
            else {
                name: tier_class(spec.kind).from_settings(name, spec.settings)
                for name, spec in config.tiers.items()
            }
        )
        self.keyring = keyring_for(config)
        for tier in self.tiers.values():
            tier.use_keyring(self.keyring)
        self.breakers = {name: Breaker(b.failures, b.cooldown_s) for name in self.tiers}
        self.timeouts = {name: spec.timeout_ms / 1e3 for name, spec in config.tiers.items()}
        self.geometry = model.geometry(self.chunk_tokens)
        self._codecs: dict[str, Codec] = {}
        self._queue_max = config.orchestrator.save_queue_chunks
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._queue: asyncio.Queue[_SaveItem] | None = None
        self._workers: list[asyncio.Task] = []
        self._idle = threading.Condition(self._pending_lock)
        # reads measured here, for a cost model in another process (vLLM's scheduler)
        self._observed: collections.deque[tuple[str, float, int]] = collections.deque(maxlen=1024)
        # chunks queued for writing: a lookup for them waits, within its budget, instead of missing
        self._inflight: dict[ChunkKey, asyncio.Future] = {}
        self.inflight_wait_s = 2.0  # the most a lookup waits for them, whatever its budget
        # bandwidth budgets of tiers' read paths, split among concurrent loads by a policy
        bw = config.bandwidth
        self.links = {
            tier: Link(
                self._measured(tier) if capacity == "auto" else capacity,
                bw.policy,
                sharing=bw.sharing,
            )
            for tier, capacity in bw.links.items()
        }
        self.read_window = bw.read_window
        runtime.run(self._start(save_workers), timeout=30)
        if exporter.requested_by_env():  # KVSTRATA_TELEMETRY_*: an exporter for any process
            exporter.serve(self.telemetry, config.telemetry, "")

    async def _start(self, n: int) -> None:
        self._queue = asyncio.Queue()
        self._workers = [asyncio.create_task(self._save_worker()) for _ in range(n)]

    @classmethod
    def shared(cls, config, model: ModelSpec) -> Orchestrator:
        """One orchestrator per (configuration, model) per process, shared by its users.

        vLLM without multiprocessing puts its scheduler and worker roles in one
        process: sharing the orchestrator gives them one DRAM pool, one reuse
        sketch and one cost model. Each user calls :meth:`close` once; the last
        close really closes.
        """
        # a file is known by its path; a configuration built in memory by its identity
        key = (str(Path(config.path).resolve()) if config.path else id(config), model)
        with _SHARED_LOCK:
            entry = _SHARED.get(key)
            if entry is None:
                entry = _SHARED[key] = [cls(config, model), 0]
                entry[0]._shared_key = key
            entry[1] += 1
            return entry[0]

    @property
    def users(self) -> int:
        """How many :meth:`shared` users hold this orchestrator (1 if not shared)."""
        entry = _SHARED.get(getattr(self, "_shared_key", None))
        return entry[1] if entry else 1

    def close(self, timeout: float = 30.0) -> None:
        """Drain the save queue (up to ``timeout``), then close every tier (the last user only)."""
        key = getattr(self, "_shared_key", None)
        if key is not None:
            with _SHARED_LOCK:
                entry = _SHARED.get(key)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] > 0:
                        return
                    del _SHARED[key]
        self.flush(timeout)

        async def stop() -> None:
            for w in self._workers:
                w.cancel()
            for tier in self.tiers.values():
                try:
                    await tier.close()
                except Exception:  # closing is best effort
                    log.debug("closing tier %s failed", tier.name, exc_info=True)

        runtime.run(stop(), timeout=timeout)

    # -- lookup ---------------------------------------------------------------

    def lookup(
        self,
        tokens: Sequence[int] | np.ndarray,
        ctx: RequestContext,
        skip_tokens: int = 0,
        limit_tokens: int | None = None,
    ) -> Plan:
        """Plan the load of the longest worthwhile prefix
        beyond ``skip_tokens`` (what the engine holds).

        Keys cover every full chunk of ``tokens`` (saves use them); loads stop
        at ``limit_tokens`` (an engine must compute at least the last token).
        """
        try:
            return runtime.run(
                self.alookup(tokens, ctx, skip_tokens, limit_tokens), timeout=self._lookup_timeout()
            )
        except Exception as exc:  # a lookup can always fall back to recompute
            log.warning("lookup failed, recomputing: %s", exc)
            decision = self.policy.decide(ctx)
            return Plan(
                ctx, decision, self.chunk_tokens, skip_tokens, {}, reason=f"lookup failed: {exc}"
            )

    def _lookup_timeout(self) -> float:
        return max(self.timeouts.values(), default=1.0) * 2 + 1.0

    async def alookup(
        self, tokens, ctx: RequestContext, skip_tokens: int = 0, limit_tokens: int | None = None
    ) -> Plan:
        logical = chunk_keys(tokens, self.model.namespace(ctx.tenant), self.chunk_tokens)
        hint = _as_float(ctx.hints.get("reuse"))
        ctx = dataclasses.replace(
            ctx, context_tokens=len(tokens), reuse=self.reuse.predict(logical, hint)
        )
        self.reuse.observe(logical)
        budget_s = (
            ctx.budget_ms
            if ctx.budget_ms is not None
            else self.config.orchestrator.default_budget_ms
        ) / 1e3
        budget_s -= await self._wait_inflight(logical, budget_s, len(tokens) - skip_tokens)
        decision = self.policy.decide(ctx)
        route = decision.route
        keys = {"none": tuple(logical)}
        for codec in {route.codec_for(t) for t in (*route.read, *route.write)} - {"none"}:
            keys[codec] = tuple(
                chunk_keys(tokens, self.model.namespace(ctx.tenant, codec), self.chunk_tokens)
            )
        first = skip_tokens // self.chunk_tokens
        last = (
            len(logical)
            if limit_tokens is None
            else min(len(logical), limit_tokens // self.chunk_tokens)
        )
        plan = Plan(ctx, decision, self.chunk_tokens, skip_tokens, keys, first_chunk=first)
        self.telemetry.served(ENGINE, skip_tokens)
        if route.load == "never" or not route.read or first >= last:
            return self._planned(
                plan,
                (),
                None,
                "route does not load" if route.load == "never" else "nothing to load",
            )
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
        pending = [self._inflight[k] for k in logical if k in self._inflight]
        limit = min(self.inflight_wait_s, budget_s / 2, self.cost.recompute_s(tokens))
        if not pending or limit <= 0:
            return 0.0
        started = time.monotonic()
        await asyncio.wait(pending, timeout=limit)
        return time.monotonic() - started

    def _planned(self, plan: Plan, chunks, choice, reason: str) -> Plan:
        plan = dataclasses.replace(plan, chunks=tuple(chunks), choice=choice, reason=reason)
        self.telemetry.lookup(plan.decision.rule, "load" if plan.chunks else "recompute")
        context = plan.ctx.context_tokens
        self.telemetry.served(
            RECOMPUTE,
            max(context - plan.end_token, 0) if plan.chunks else context - plan.skip_tokens,
        )
        if log.isEnabledFor(logging.DEBUG):
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
        return plan

    async def _locate(self, route: Route, keys, first: int, n: int) -> list[PlannedChunk]:
        """The contiguous run of chunks from ``first`` held by
        the read tiers, each from the first tier having it."""
        where: dict[int, PlannedChunk] = {}
        for tier in route.read:
            todo = [i for i in range(first, n) if i not in where]
            if not todo:
                break
            codec = route.codec_for(tier)
            answer = await self._call(
                tier, "contains", self.tiers[tier].contains([keys[codec][i] for i in todo])
            )
            for i, present in zip(todo, answer or (), strict=False):
                if present:
                    where[i] = PlannedChunk(i, tier, keys[codec][i], codec)
            if answer is not None:
                hits = sum(1 for present in answer if present)
                self.telemetry.located(tier, hits, len(todo) - hits)
        run: list[PlannedChunk] = []
        for i in range(first, n):
            if i not in where:
                break
            run.append(where[i])
        return run

    async def _call(self, tier: str, op: str, coro):
        """Await one tier operation under its breaker and
        timeout; None if it failed or was skipped."""
        breaker = self.breakers[tier]
        if not breaker.allow():
            coro.close()
            self.telemetry.op(tier, op, "skipped")
            return None
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(coro, self.timeouts[tier])
        except (TimeoutError, TierError) as exc:
            outcome = "timeout" if isinstance(exc, asyncio.TimeoutError) else "error"
            self.telemetry.op(tier, op, outcome, time.perf_counter() - started)
            self._record(tier, ok=False)
            log.warning("tier %s %s %s: %s", tier, op, outcome, exc)
            return None
        elapsed = time.perf_counter() - started
        self.telemetry.op(tier, op, "ok", elapsed)
        self._record(tier, ok=True)
        if op == "contains":  # a small round trip: it teaches the cost model the tier's latency
            self.cost.observe_read(tier, elapsed, 0)
        return result

    def _record(self, tier: str, ok: bool) -> None:
        if self.breakers[tier].record(ok):
            is_open = not ok
            self.telemetry.breaker(tier, is_open)
            log.warning("tier %s breaker %s", tier, "opened" if is_open else "closed")

    # -- load -----------------------------------------------------------------

    def load(
        self,
        plan: Plan,
        layers_per_read: int | None = None,
        compute_s_per_layer: float | None = None,
    ) -> LoadHandle:
        """Start reading the plan's chunks; returns at once.

        Layer-wise routes read in layer groups planned by :func:`pipeline.plan_groups`
        (``layers_per_read`` forces uniform groups); whole-object routes in one
        group. ``compute_s_per_layer`` is the engine's compute time per layer
        for this request if the caller knows it (else the cost model's estimate).
        """
        handle = LoadHandle(plan, self.model.n_layers)
        if not plan.chunks:
            handle.complete(range(self.model.n_layers))
            return handle
        compute_s = (
            compute_s_per_layer
            if compute_s_per_layer is not None
            else self._compute_s_per_layer(plan)
        )
        handle.groups = self._groups(plan, layers_per_read, compute_s)
        runtime.submit(self._load(handle, compute_s))
        return handle

    def _compute_s_per_layer(self, plan: Plan) -> float:
        rest = max(plan.ctx.context_tokens - plan.end_token, 1)
        return self.cost.recompute_s(rest) / self.model.n_layers

    def _groups(
        self, plan: Plan, layers_per_read: int | None, compute_s: float
    ) -> tuple[range, ...]:
        n = self.model.n_layers
        if layers_per_read is not None:
            return pipeline.uniform(n, layers_per_read)
        if plan.decision.route.retrieval != "layerwise":
            return (range(n),)
        transfer_s, overhead_s = 0.0, 0.0
        for tier, chunks in _by_tier(plan.chunks).items():
            _, bandwidth = self.cost.tier(tier)
            link = self.links.get(tier)
            if link is not None:  # the share this load can expect
                bandwidth = min(bandwidth, link.capacity / (link.open_flows + 1))
            transfer_s = max(transfer_s, self._layer_bytes(chunks) / bandwidth)  # per layer
            overhead_s = max(overhead_s, self._group_overhead_s(tier, len(chunks)))
        return pipeline.plan_groups(
            [transfer_s] * n,
            [compute_s] * n,
            overhead_s,
            self.read_window,
            self.config.bandwidth.group_tolerance,
        )

    def _measured(self, tier: str) -> Callable[[], float]:
        """A link capacity that follows the tier's read bandwidth as the cost model learns it."""
        return lambda: self.cost.tier(tier)[1]

    async def _load(self, handle: LoadHandle, compute_s: float) -> None:
        plan, groups = handle.plan, handle.groups
        by_tier = _by_tier(plan.chunks)
        flows = {
            tier: self._open_flow(tier, handle, chunks, compute_s)
            for tier, chunks in by_tier.items()
            if tier in self.links
        }
        # within a flow, groups are paced in layer order: group i waits for group i-1's turn
        turns = {tier: [asyncio.Event() for _ in groups] for tier in flows}
        window = asyncio.Semaphore(self.read_window)
        released = [asyncio.Event() for _ in groups]  # layers are released in order

        async def read(i: int, layers: range) -> None:
            try:
                async with window:
                    await asyncio.gather(
                        *(
                            self._read_group(
                                tier,
                                chunks,
                                layers,
                                handle,
                                self._pacer(self.links[tier], flows[tier], turns[tier], i)
                                if tier in flows
                                else None,
                            )
                            for tier, chunks in by_tier.items()
                        )
                    )
                    if i:
                        await released[i - 1].wait()
                    if i < len(groups) - 1:  # the last is released with the accounting, below
                        handle.complete(layers)
            finally:
                released[i].set()

        try:
            await asyncio.gather(*(read(i, layers) for i, layers in enumerate(groups)))
        except Exception:  # never leave the engine waiting
            log.exception("load failed")
        finally:
            for tier, flow in flows.items():
                self.links[tier].close(flow)
            handle.abort(before_release=self._account_load)
        seconds = time.monotonic() - handle.started_at
        self.telemetry.loaded(seconds)
        log.debug(
            "load: rule=%s tokens=%s groups=%d gets=%d failed_chunks=%s seconds=%.4f",
            plan.decision.rule,
            plan.tokens_by_tier(),
            len(groups),
            handle.gets,
            sorted(handle.failed),
            seconds,
        )
        self._promote(handle)

    def _open_flow(
        self, tier: str, handle: LoadHandle, chunks: list[PlannedChunk], compute_s: float
    ) -> Flow:
        budget = handle.plan.ctx.budget_ms
        layer_bytes = self._layer_bytes(chunks)
        return self.links[tier].open(
            size_bytes=layer_bytes * self.model.n_layers,
            layer_bytes=layer_bytes,
            compute_s_per_layer=compute_s,
            progress=handle.progress,
            deadline=None if budget is None else handle.started_at + budget / 1e3,
            overhead_s=self._group_overhead_s(tier, len(chunks)),
            group_layers=[len(g) for g in handle.groups],
        )

    def _layer_bytes(self, chunks: list[PlannedChunk]) -> float:
        """What one layer of ``chunks`` moves: each codec's stored size as reads found it
        (the uncompressed size until one was read)."""
        return sum(self.geometry.nbytes * self.cost.stored_fraction(c.codec) for c in chunks)

    def _group_overhead_s(self, tier: str, n_chunks: int) -> float:
        """What reading one layer group costs besides its bytes: the tier's latency and one GET
        per chunk at the store's learned per-GET time (its IOPS)."""
        return self.cost.tier(tier)[0] + n_chunks * self.cost.per_get_s(tier)

    @staticmethod
    def _pacer(link: Link, flow: Flow, turns: list[asyncio.Event], i: int):
        """Pace group ``i``'s bytes through ``link``, after group i-1's."""

        async def pace(nbytes: int) -> None:
            try:
                if i:
                    await turns[i - 1].wait()
                done = link.submit(flow, nbytes)
            finally:
                turns[i].set()  # also when this group failed: the next may go
            await done

        return pace

    async def _read_group(
        self, tier: str, chunks: list[PlannedChunk], layers: range, handle: LoadHandle, pace=None
    ) -> None:
        """Read ``layers`` of ``chunks`` from one tier (one GET per chunk) once the tier's link
        (if it has one) admits their bytes, and deliver them."""
        chunks = [c for c in chunks if c.index not in handle.failed]
        if (
            pace is not None
        ):  # the link admits the group's (expected) bytes, then the GETs move them
            await pace(len(layers) * self._layer_bytes(chunks))
        if not chunks:
            return
        started = time.perf_counter()
        fetched = await self._call(
            tier, "get", self.tiers[tier].get([c.key for c in chunks], layers)
        )
        handle.gets += len(chunks)
        self.telemetry.op(tier, "read_range", "issued", n=len(chunks))
        decoded: list[tuple[PlannedChunk, dict[int, np.ndarray]]] = []
        nbytes = 0
        for chunk, result in zip(chunks, fetched or (), strict=False):
            kv = self._decode(tier, handle.plan.ctx.tenant, chunk, result, layers)
            if kv is None:
                handle.fail([chunk.index])
                continue
            decoded.append((chunk, kv))
            stored = sum(len(result.obj.layers[i]) for i in layers)
            self.cost.observe_stored(chunk.codec, stored / (len(layers) * self.geometry.nbytes))
            nbytes += stored
        if fetched is None:
            handle.fail([c.index for c in chunks])
        seconds = time.perf_counter() - started
        for chunk, kv in decoded:
            for layer, array in kv.items():
                handle.deliver(layer, chunk.index, array)
        if fetched is not None:
            self.cost.observe_gets(tier, seconds, len(chunks))
        if nbytes:
            self.telemetry.moved_bytes(tier, "read", nbytes)
            self.cost.observe_read(tier, seconds, nbytes)
            self._observed.append((tier, seconds, nbytes))

    def _decode(
        self, tier: str, tenant: str, chunk: PlannedChunk, result, layers: range
    ) -> dict[int, np.ndarray] | None:
        """Verified, decoded layers of one fetched chunk, or None (counted) if it cannot be used."""
        if not isinstance(result, Hit):
            if result.reason != "absent":
                self._bad_object(tier, chunk.key, result.reason)
            self.telemetry.op(tier, "read_chunk", "miss")
            return None
        meta, n = result.obj.meta, result.obj.header.n_layers
        expected = (
            self.model.kv_heads,
            self.model.head_dim,
            self.model.dtype,
            self.chunk_tokens,
            self.model.n_layers,
            chunk.codec,
            self.model.namespace(tenant, chunk.codec).fingerprint,
        )
        if (
            meta.kv_heads,
            meta.head_dim,
            meta.dtype,
            meta.n_tokens,
            n,
            meta.codec,
            meta.namespace,
        ) != expected:
            self._bad_object(tier, chunk.key, "foreign")
            return None
        try:  # the reader's own codec; the header may only confirm it
            codec = self._codec(chunk.codec)
            confirm_header(chunk.codec, codec, meta.codec, meta.codec_params)
            out = {layer: codec.decode(result.obj.layers[layer], self.geometry) for layer in layers}
        except CodecError as exc:
            log.warning("tier %s chunk %s undecodable: %s", tier, chunk.key, exc)
            self._bad_object(tier, chunk.key, "codec")
            return None
        self.telemetry.op(tier, "read_chunk", "hit")
        return out

    def _bad_object(self, tier: str, key: ChunkKey, reason: str) -> None:
        """Count a bad object and drop it, so nobody trips on it again and a save can replace it
        (saves skip present keys). A newer format's object ("unsupported") is left to its owner."""
        self.telemetry.bad_object(tier, reason)
        log.warning("tier %s: %s object %s is a miss", tier, reason, key)
        if reason in DROPPED_REASONS:
            asyncio.ensure_future(self._call(tier, "delete", self.tiers[tier].delete([key])))

    def _codec(self, name: str) -> Codec:
        """The configuration's codec named ``name`` (``codecs:`` or a built-in), for writing and
        reading alike: an object's header never chooses a codec (see :func:`confirm_header`)."""
        codec = self._codecs.get(name)
        if codec is None:
            spec = self.config.codec(name)
            codec = self._codecs[name] = codec_from_config(name, spec.kind, spec.params)
        return codec

    def _account_load(self, handle: LoadHandle) -> None:
        plan = handle.plan
        for c in plan.chunks:
            tokens = (c.index + 1) * self.chunk_tokens - max(
                c.index * self.chunk_tokens, plan.skip_tokens
            )
            self.telemetry.served(RECOMPUTE if c.index in handle.failed else c.tier, tokens)

    def _promote(self, handle: LoadHandle) -> None:
        """Copy chunks hit in a slower tier into the faster read tiers the route writes to."""
        route = handle.plan.decision.route
        if not route.promote:
            return
        for c in handle.plan.chunks:
            faster = tuple(t for t in route.read[: route.read.index(c.tier)] if t in route.write)
            kv = handle.chunk_kv(c.index) if faster else None
            if kv is not None:
                keys = {codec: ks[c.index] for codec, ks in handle.plan.keys.items()}
                if "none" in keys and self.save_chunk(
                    route, handle.plan.ctx.tenant, keys, kv, faster, c.index * self.chunk_tokens
                ):
                    for dst in faster:  # a plan without keys (built by hand) cannot promote
                        self.telemetry.moved("promote", c.tier, dst)

    def drain_observations(self) -> list[tuple[str, float, int]]:
        """Reads measured since the last call: ``(tier, seconds, bytes)``."""
        out = []
        while self._observed:
            out.append(self._observed.popleft())
        return out

    # -- save -----------------------------------------------------------------

    def save(
        self, plan: Plan, chunk_index: int, kv: KV, tiers: Sequence[str] | None = None
    ) -> bool:
        """Queue one full chunk for writing. Never blocks; False if nothing was queued.

        ``kv`` is canonical ``[n_layers, 2, chunk_tokens, kv_heads, head_dim]``
        in the model's dtype, or a zero-argument callable returning it (run on
        a worker thread, so a page copy can be converted off the engine's
        critical path). The caller must not modify it afterwards. ``tiers``
        defaults to the route's write tiers that admit the chunk
        (:meth:`admitted`).
        """
        if chunk_index >= len(plan.logical_keys()):
            return False
        tiers = self.admitted(plan, chunk_index) if tiers is None else tuple(tiers)
        keys = {codec: ks[chunk_index] for codec, ks in plan.keys.items()}
        return self.save_chunk(
            plan.decision.route, plan.ctx.tenant, keys, kv, tiers, chunk_index * self.chunk_tokens
        )

    def save_chunk(
        self,
        route: Route,
        tenant: str,
        keys: Mapping[str, ChunkKey],
        kv: KV,
        tiers: Sequence[str],
        first_position: int = 0,
    ) -> bool:
        """:meth:`save` for callers that hold keys rather than a plan (a connector's worker side).

        ``keys`` maps codec -> this chunk's key ("none" must be present);
        ``tiers`` is the final write set (admission already applied);
        ``first_position`` is the position of the chunk's first token in the prompt.
        """
        if not tiers:
            return False
        return self._enqueue(
            _SaveItem(route, tenant, keys["none"], dict(keys), kv, tuple(tiers), first_position)
        )

    def admitted(self, plan: Plan, chunk_index: int) -> tuple[str, ...]:
        """The route's write tiers whose admission rule
        accepts this chunk now (rejections counted)."""
        route = plan.decision.route
        count = self.reuse.count(plan.logical_keys()[chunk_index])
        admitted = []
        for tier in route.write:
            if count < route.admission.get(tier, 0):
                self.telemetry.dropped("admission")
            else:
                admitted.append(tier)
        return tuple(admitted)

    def route(self, rule: str) -> Route:
        """The route of a rule by name ("default" included): how a worker rebuilds a plan."""
        return self.policy.default if rule == DEFAULT_RULE else self.policy.rule(rule).route

    def _enqueue(self, item: _SaveItem) -> bool:
        with self._pending_lock:
            if self._pending >= self._queue_max:
                self.telemetry.dropped("queue_full")
                return False
            self._pending += 1
            self.telemetry.queue_depth(self._pending)
        runtime.loop().call_soon_threadsafe(self._accept, item)
        return True

    def _accept(self, item: _SaveItem) -> None:
        """On the loop: queue the item and mark its chunk in flight (lookups wait for it)."""
        if item.logical_key not in self._inflight:
            self._inflight[item.logical_key] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save has been written or dropped (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    async def _save_worker(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._write(item)
            except Exception:  # a save never takes the worker down
                log.exception("save failed")
            finally:
                done = self._inflight.pop(item.logical_key, None)
                if done is not None and not done.done():
                    done.set_result(None)
                with self._idle:
                    self._pending -= 1
                    self.telemetry.queue_depth(self._pending)
                    self._idle.notify_all()

    async def _write(self, item: _SaveItem) -> None:
        route = item.route
        kv = item.kv
        if callable(kv):
            kv = await asyncio.to_thread(kv)
        encoded: dict[str, bytes] = {}
        for tier in item.tiers:
            codec_id = route.codec_for(tier)
            if codec_id not in encoded:
                encoded[codec_id] = await asyncio.to_thread(self._encode, item, kv, codec_id)
        await asyncio.gather(*(self._put(t, item, encoded[route.codec_for(t)]) for t in item.tiers))

    def _encode(self, item: _SaveItem, kv: np.ndarray, codec_id: str) -> bytes:
        codec = self._codec(codec_id)
        key = item.keys[codec_id]
        meta = fmt.ObjectMeta(
            codec_id,
            self.model.dtype,
            self.chunk_tokens,
            self.model.kv_heads,
            self.model.head_dim,
            self.model.namespace(item.tenant, codec_id).fingerprint,
            key.digest,
            header_params(codec_id, codec),
        )
        if kv.shape != (self.model.n_layers, *self.geometry.shape):
            raise ValueError(
                f"chunk KV shaped {kv.shape}, "
                f"expected {(self.model.n_layers, *self.geometry.shape)}"
            )
        return fmt.encode(
            meta,
            [
                codec.encode(kv[layer], layer, first_position=item.first_position)
                for layer in range(self.model.n_layers)
            ],
            self.keyring,
        )

    async def _put(self, tier: str, item: _SaveItem, blob: bytes) -> None:
        key = item.keys[item.route.codec_for(tier)]
        present = await self._call(tier, "contains", self.tiers[tier].contains([key]))
        if present is None:
            self.telemetry.dropped("tier_error")
            return
        if present[0]:
            self.telemetry.op(tier, "put", "present")
            return
        put = self.tiers[tier].put([(key, blob)], **_put_options(item.route, tier))
        result = await self._call(tier, "put", put)
        if result is None:
            self.telemetry.dropped("tier_error")
            return
        self.telemetry.moved_bytes(tier, "write", len(blob))
        self.telemetry.evicted(tier, len(result.evicted))
        dst = item.route.demote.get(tier)
        for ev in result.evicted:
            if (
                dst
                and ev.data is not None
                and item.route.codec_for(dst) == item.route.codec_for(tier)
            ):
                put = self.tiers[dst].put([(ev.key, ev.data)], **_put_options(item.route, dst))
                moved = await self._call(dst, "put", put)
                if moved is not None:
                    self.telemetry.moved("demote", tier, dst)
                    self.telemetry.moved_bytes(dst, "write", len(ev.data))


#: Miss reasons whose object is deleted: it can never be served here, and would block a rewrite.
DROPPED_REASONS = frozenset({"corrupt", "unauthenticated", "foreign", "codec"})


def _put_options(route: Route, tier: str) -> dict[str, int]:
    """Keyword arguments of a put to ``tier`` under ``route``: its ``ttl_s``, if the route sets
    one there (only for tiers whose kind ``supports_ttl``: the policy engine checks)."""
    ttl = route.ttl_s.get(tier)
    return {"ttl_s": ttl} if ttl else {}


def _by_tier(chunks: Sequence[PlannedChunk]) -> dict[str, list[PlannedChunk]]:
    out: dict[str, list[PlannedChunk]] = {}
    for c in chunks:
        out.setdefault(c.tier, []).append(c)
    return out


def _as_float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def flush_shared(timeout: float = 60.0) -> bool:
    """Wait until every shared orchestrator of this process has written its queued saves."""
    with _SHARED_LOCK:
        orchestrators = [entry[0] for entry in _SHARED.values()]
    return all(o.flush(timeout) for o in orchestrators)


def shared_orchestrators() -> list[Orchestrator]:
    """The process's shared orchestrators (what a vLLM engine in this process uses)."""
    with _SHARED_LOCK:
        return [entry[0] for entry in _SHARED.values()]
