"""Promotion and demotion: chunks moving between tiers after a load or an eviction.

* Promotion: a chunk a load found in a slower tier is written to the faster
  tiers earlier in the route's ``read`` list that are also in its ``write``
  list (through the writer's one entry point).
* Demotion: ``demote: {dram: local}`` moves the chunks a tier evicts (their
  encoded bytes, handed back by the tier) to ``local`` when both tiers use
  the same codec. The route of the write that caused the eviction decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kvstrata.orchestrator.calls import Ok, TierCalls
from kvstrata.plan import ChunkWrite, LoadHandle
from kvstrata.policy.route import Route
from kvstrata.telemetry.metrics import Telemetry
from kvstrata.tiers.base import Evicted


class Movement:
    def __init__(
        self,
        calls: TierCalls,
        telemetry: Telemetry,
        submit: Callable[[ChunkWrite, np.ndarray], bool],
    ):
        self.calls, self.telemetry, self.submit = calls, telemetry, submit

    def promote(self, handle: LoadHandle) -> None:
        """Copy the load's chunks that came from a slower tier into the faster ones."""
        plan = handle.plan
        route = plan.decision.route
        if not route.promote or "none" not in plan.keys:
            return  # a plan without keys (built by hand) cannot promote
        for c in plan.chunks:
            faster = tuple(t for t in route.read[: route.read.index(c.tier)] if t in route.write)
            kv = handle.chunk_kv(c.index) if faster else None
            if kv is not None and self.submit(plan.chunk_write(c.index, faster), kv):
                for dst in faster:
                    self.telemetry.moved("promote", c.tier, dst)

    async def demote(self, route: Route, tier: str, evicted: Sequence[Evicted]) -> None:
        """Move what ``tier`` evicted to the route's demotion target for it, if any."""
        dst = route.demote.get(tier)
        if not dst or route.codec_for(dst) != route.codec_for(tier):
            return
        for ev in evicted:
            if ev.data is None:
                continue
            moved = await self.calls.put(dst, [(ev.key, ev.data)], route.ttl_s.get(dst))
            if isinstance(moved, Ok):
                self.telemetry.moved("demote", tier, dst)
                self.telemetry.moved_bytes(dst, "write", len(ev.data))
