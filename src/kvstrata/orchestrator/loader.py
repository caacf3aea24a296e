"""Paced layer loading: a plan's chunks read in layer groups, in the order the model uses them.

``load(plan)`` returns a :class:`~kvstrata.plan.LoadHandle` at once; reads run
on the background loop, ``bandwidth.read_window`` groups at a time, each
tier's groups paced through its bandwidth link if it has one; layers are
released to the engine in order as their groups arrive (docs/layerwise.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence

from kvstrata import runtime
from kvstrata.model import ModelSpec
from kvstrata.orchestrator.calls import Ok, TierCalls
from kvstrata.orchestrator.objects import ChunkObjects, Decoded
from kvstrata.plan import LoadHandle, Plan, PlannedChunk
from kvstrata.policy import pipeline
from kvstrata.policy.bandwidth import Flow, Link
from kvstrata.policy.cost import CostModel
from kvstrata.telemetry.metrics import RECOMPUTE, Telemetry

log = logging.getLogger(__name__)


class Loader:
    def __init__(
        self,
        config,
        model: ModelSpec,
        calls: TierCalls,
        objects: ChunkObjects,
        cost: CostModel,
        telemetry: Telemetry,
    ):
        self.model, self.chunk_tokens = model, config.chunk_tokens
        self.calls, self.objects, self.cost, self.telemetry = calls, objects, cost, telemetry
        self.group_tolerance = config.bandwidth.group_tolerance
        self.after_load: Callable[[LoadHandle], None] | None = None  # promotion, set by the owner
        #: bandwidth budgets of tiers' read paths, split among concurrent loads by a policy
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
        #: reads measured here, for a cost model in another process (vLLM's scheduler)
        self.observed: collections.deque[tuple[str, float, int]] = collections.deque(maxlen=1024)

    def _measured(self, tier: str) -> Callable[[], float]:
        """A link capacity that follows the tier's read bandwidth as the cost model learns it."""
        return lambda: self.cost.tier(tier)[1]

    def load(
        self, plan: Plan, layers_per_read: int | None, compute_s_per_layer: float | None
    ) -> LoadHandle:
        handle = LoadHandle(plan, self.model.n_layers)
        if not plan.chunks:
            handle.complete(range(self.model.n_layers))
            return handle
        compute_s = compute_s_per_layer
        if compute_s is None:
            rest = max(plan.ctx.context_tokens - plan.end_token, 1)
            compute_s = self.cost.recompute_s(rest) / self.model.n_layers
        handle.groups = self._groups(plan, layers_per_read, compute_s)
        runtime.submit(self._load(handle, compute_s))
        return handle

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
            [transfer_s] * n, [compute_s] * n, overhead_s, self.read_window, self.group_tolerance
        )

    async def _load(self, handle: LoadHandle, compute_s: float) -> None:
        by_tier = _by_tier(handle.plan.chunks)
        flows = {
            tier: self._open_flow(tier, handle, chunks, compute_s)
            for tier, chunks in by_tier.items()
            if tier in self.links
        }
        try:
            await self._read_groups(handle, by_tier, flows)
        except Exception:  # never leave the engine waiting
            log.exception("load failed")
        finally:
            for tier, flow in flows.items():
                self.links[tier].close(flow)
            handle.abort(before_release=self._account)
        self._finished(handle)

    async def _read_groups(self, handle: LoadHandle, by_tier, flows: dict[str, Flow]) -> None:
        groups = handle.groups
        # within a flow, groups are paced in layer order: group i waits for group i-1's turn
        turns = {tier: [asyncio.Event() for _ in groups] for tier in flows}
        window = asyncio.Semaphore(self.read_window)
        released = [asyncio.Event() for _ in groups]  # layers are released in order

        def pacer(tier: str, i: int):
            return _pacer(self.links[tier], flows[tier], turns[tier], i) if tier in flows else None

        async def read(i: int, layers: range) -> None:
            try:
                async with window:
                    await asyncio.gather(
                        *(
                            self._read_group(tier, chunks, layers, handle, pacer(tier, i))
                            for tier, chunks in by_tier.items()
                        )
                    )
                    if i:
                        await released[i - 1].wait()
                    if i < len(groups) - 1:  # the last is released with the accounting
                        handle.complete(layers)
            finally:
                released[i].set()

        await asyncio.gather(*(read(i, layers) for i, layers in enumerate(groups)))

    def _finished(self, handle: LoadHandle) -> None:
        plan = handle.plan
        seconds = time.monotonic() - handle.started_at
        self.telemetry.loaded(seconds)
        log.debug(
            "load: rule=%s tokens=%s groups=%d gets=%d failed_chunks=%s seconds=%.4f",
            plan.decision.rule,
            plan.tokens_by_tier(),
            len(handle.groups),
            handle.gets,
            sorted(handle.failed),
            seconds,
        )
        if self.after_load is not None:
            self.after_load(handle)

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
        nbytes = self.objects.geometry.nbytes
        return sum(nbytes * self.cost.stored_fraction(c.codec) for c in chunks)

    def _group_overhead_s(self, tier: str, n_chunks: int) -> float:
        """What reading one layer group costs besides its bytes: the tier's latency and one GET
        per chunk at the store's learned per-GET time (its IOPS)."""
        return self.cost.tier(tier)[0] + n_chunks * self.cost.per_get_s(tier)

    async def _read_group(
        self, tier: str, chunks: list[PlannedChunk], layers: range, handle: LoadHandle, pace=None
    ) -> None:
        """Read ``layers`` of ``chunks`` from one tier (one GET per chunk) once the tier's link
        (if it has one) admits their bytes, and deliver them."""
        chunks = [c for c in chunks if c.index not in handle.failed]
        if pace is not None:  # the link admits the group's (expected) bytes, then GETs move them
            await pace(len(layers) * self._layer_bytes(chunks))
        if not chunks:
            return
        started = time.perf_counter()
        keys = [c.key for c in chunks]
        fetched = await self.calls.call(tier, "get", lambda t: t.get(keys, layers))
        handle.gets += len(chunks)
        self.telemetry.op(tier, "read_range", "issued", n=len(chunks))
        if not isinstance(fetched, Ok):
            handle.fail([c.index for c in chunks])
            return
        decoded = self._decode(tier, chunks, fetched.value, layers, handle)
        seconds = time.perf_counter() - started
        for chunk, got in decoded:
            for layer, array in got.layers.items():
                handle.deliver(layer, chunk.index, array)
        self.cost.observe_gets(tier, seconds, len(chunks))
        nbytes = sum(got.stored_bytes for _, got in decoded)
        if nbytes:
            self.telemetry.moved_bytes(tier, "read", nbytes)
            self.cost.observe_read(tier, seconds, nbytes)
            self.observed.append((tier, seconds, nbytes))

    def _decode(
        self, tier: str, chunks: list[PlannedChunk], fetched, layers: range, handle: LoadHandle
    ) -> list[tuple[PlannedChunk, Decoded]]:
        """The usable chunks of one tier's answer; the others failed (bad ones counted, dropped)."""
        out = []
        tenant = handle.plan.ctx.tenant
        for chunk, result in zip(chunks, fetched, strict=False):
            got = self.objects.decode(tier, tenant, chunk, result, layers)
            if not isinstance(got, Decoded):
                if got.reason != "absent":
                    self.calls.reject(tier, chunk.key, got.reason)
                if got.by_tier:
                    self.telemetry.op(tier, "read_chunk", "miss")
                handle.fail([chunk.index])
                continue
            self.telemetry.op(tier, "read_chunk", "hit")
            stored = got.stored_bytes / (len(layers) * self.objects.geometry.nbytes)
            self.cost.observe_stored(chunk.codec, stored)
            out.append((chunk, got))
        return out

    def _account(self, handle: LoadHandle) -> None:
        """Tokens served per source: each chunk's tier, or recompute where it failed."""
        plan = handle.plan
        for c in plan.chunks:
            start = max(c.index * self.chunk_tokens, plan.skip_tokens)
            tokens = (c.index + 1) * self.chunk_tokens - start
            self.telemetry.served(RECOMPUTE if c.index in handle.failed else c.tier, tokens)

    def drain_observations(self) -> list[tuple[str, float, int]]:
        """Reads measured since the last call: ``(tier, seconds, bytes)``."""
        out = []
        while self.observed:
            out.append(self.observed.popleft())
        return out


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


def _by_tier(chunks: Sequence[PlannedChunk]) -> dict[str, list[PlannedChunk]]:
    out: dict[str, list[PlannedChunk]] = {}
    for c in chunks:
        out.setdefault(c.tier, []).append(c)
    return out
