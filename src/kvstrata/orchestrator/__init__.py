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

:class:`Orchestrator` is a facade over one object per job, each in its own
module: :mod:`.registry` (the process-wide share registry), :mod:`.calls`
(the call wrapper: breaker, timeout, per-tier metrics, error mapping, as
:class:`Ok` / :class:`Failed` values), :mod:`.objects` (codecs: chunk objects
encoded and decoded), :mod:`.lookup`, :mod:`.loader` (paced layer loading),
:mod:`.writer` (the save queue, one entry point), :mod:`.movement`
(promotion, demotion) and :mod:`.whole` (whole objects by key, for corpora:
``orch.whole.fetch`` / ``store`` / ``holds``).

Failure semantics: a tier error or timeout on lookup or load is a miss (the
engine recomputes); on save it is counted and dropped. A tier that keeps
failing is skipped by its breaker for a cooldown. Nothing here raises into
the engine for a tier's sake.

Threads: the public methods are called from engine threads; all tier I/O runs
on the process's background loop (:mod:`kvstrata.runtime`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from kvstrata import runtime
from kvstrata.auth import keyring_for
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import registry
from kvstrata.orchestrator.calls import DROPPED_REASONS, Failed, Ok, Outcome, TierCalls
from kvstrata.orchestrator.loader import Loader
from kvstrata.orchestrator.lookup import Lookup
from kvstrata.orchestrator.movement import Movement
from kvstrata.orchestrator.objects import ChunkObjects
from kvstrata.orchestrator.registry import flush_shared, shared_orchestrators
from kvstrata.orchestrator.whole import WholeObjects
from kvstrata.orchestrator.writer import KV, Writer
from kvstrata.plan import ChunkWrite, LoadHandle, Plan
from kvstrata.policy.cost import CostModel
from kvstrata.policy.engine import DEFAULT_RULE
from kvstrata.policy.reuse import ReuseEstimator
from kvstrata.policy.route import RequestContext, Route
from kvstrata.telemetry import exporter
from kvstrata.telemetry.metrics import Telemetry
from kvstrata.tiers.base import Tier, tier_class

log = logging.getLogger(__name__)

__all__ = [
    "DROPPED_REASONS",
    "KV",
    "ChunkWrite",
    "Failed",
    "Ok",
    "Orchestrator",
    "Outcome",
    "flush_shared",
    "shared_orchestrators",
]


class Orchestrator:
    def __init__(
        self,
        config,
        model: ModelSpec,
        tiers: Mapping[str, Tier] | None = None,
        telemetry: Telemetry | None = None,
        save_workers: int = 2,
    ):
        self.config, self.model, self.policy = config, model, config.policy
        self.chunk_tokens: int = config.chunk_tokens
        self.telemetry = telemetry or Telemetry()
        self.cost = CostModel.from_config(config, n_layers=model.n_layers)
        r = config.reuse
        self.reuse = ReuseEstimator(r.sketch_width, r.sketch_depth, r.half_life_s)
        if tiers is None:
            tiers = {
                n: tier_class(s.kind).from_settings(n, s.settings) for n, s in config.tiers.items()
            }
        self.tiers: dict[str, Tier] = dict(tiers)
        self.keyring = keyring_for(config)
        for tier in self.tiers.values():
            tier.use_keyring(self.keyring)
        b = config.orchestrator.breaker
        timeouts = {name: spec.timeout_ms / 1e3 for name, spec in config.tiers.items()}
        self.calls = TierCalls(
            self.tiers, timeouts, (b.failures, b.cooldown_s), self.telemetry, self.cost
        )
        self.objects = ChunkObjects(config, model, self.chunk_tokens, self.keyring)
        self.writer = Writer(
            self.calls, self.objects, self.telemetry, config.orchestrator.save_queue_chunks
        )
        self.lookups = Lookup(
            config, model, self.calls, self.cost, self.reuse, self.telemetry, self.writer.inflight
        )
        self.loader = Loader(config, model, self.calls, self.objects, self.cost, self.telemetry)
        self.whole = WholeObjects(self.calls, self.objects, self.telemetry)
        self.movement = Movement(self.calls, self.telemetry, self.writer.submit)
        self.writer.demote = self.movement.demote
        self.loader.after_load = self.movement.promote
        self._shared_key = None
        runtime.run(self.writer.start(save_workers), timeout=30)
        if exporter.requested_by_env():  # KVSTRATA_TELEMETRY_*: an exporter for any process
            exporter.serve(self.telemetry, config.telemetry, "")

    # -- sharing --------------------------------------------------------------

    @classmethod
    def shared(cls, config, model: ModelSpec) -> Orchestrator:
        """One orchestrator per (configuration, model) per process, shared by its users
        (:mod:`.registry`). Each user calls :meth:`close` once; the last close really closes."""
        key = registry.share_key(config, model)

        def make() -> Orchestrator:
            orch = cls(config, model)
            orch._shared_key = key
            return orch

        return registry.acquire(key, make)

    @property
    def users(self) -> int:
        """How many :meth:`shared` users hold this orchestrator (1 if not shared)."""
        return registry.users(self._shared_key)

    def close(self, timeout: float = 30.0) -> None:
        """Drain the save queue (up to ``timeout``), then close every tier (the last user only)."""
        if not registry.release(self._shared_key):
            return
        self.flush(timeout)

        async def stop() -> None:
            await self.writer.stop()
            await self.calls.close()

        runtime.run(stop(), timeout=timeout)

    # -- the components' settings, as the facade's ----------------------------

    @property
    def breakers(self):
        return self.calls.breakers

    @property
    def links(self):
        return self.loader.links

    @property
    def geometry(self):
        return self.objects.geometry

    @property
    def inflight_wait_s(self) -> float:
        return self.lookups.inflight_wait_s

    @inflight_wait_s.setter
    def inflight_wait_s(self, seconds: float) -> None:
        self.lookups.inflight_wait_s = seconds

    def lookup_timeout_s(self) -> float:
        return self.calls.lookup_timeout_s()

    # -- lookup ---------------------------------------------------------------

    def lookup(
        self,
        tokens: Sequence[int] | np.ndarray,
        ctx: RequestContext,
        skip_tokens: int = 0,
        limit_tokens: int | None = None,
    ) -> Plan:
        """Plan the load of the longest worthwhile prefix beyond ``skip_tokens`` (what the
        engine holds); never raises.

        Keys cover every full chunk of ``tokens`` (saves use them); loads stop
        at ``limit_tokens`` (an engine must compute at least the last token).
        """
        coro = self.alookup(tokens, ctx, skip_tokens, limit_tokens)
        try:
            return runtime.run(coro, timeout=self.lookup_timeout_s())
        except Exception as exc:  # a lookup can always fall back to recompute
            log.warning("lookup failed, recomputing: %s", exc)
            return self.lookups.failed(ctx, skip_tokens, exc)

    async def alookup(
        self, tokens, ctx: RequestContext, skip_tokens: int = 0, limit_tokens: int | None = None
    ) -> Plan:
        """:meth:`lookup` on the background loop."""
        return await self.lookups.run(tokens, ctx, skip_tokens, limit_tokens)

    # -- load -----------------------------------------------------------------

    def load(
        self,
        plan: Plan,
        layers_per_read: int | None = None,
        compute_s_per_layer: float | None = None,
    ) -> LoadHandle:
        """Start reading the plan's chunks; returns at once.

        Layer-wise routes read in layer groups planned by
        :func:`kvstrata.policy.pipeline.plan_groups` (``layers_per_read`` forces
        uniform groups); whole-object routes in one group.
        ``compute_s_per_layer`` is the engine's compute time per layer for this
        request if the caller knows it (else the cost model's estimate).
        """
        return self.loader.load(plan, layers_per_read, compute_s_per_layer)

    def drain_observations(self) -> list[tuple[str, float, int]]:
        """Reads measured since the last call: ``(tier, seconds, bytes)``."""
        return self.loader.drain_observations()

    # -- save -----------------------------------------------------------------

    def save(
        self, plan: Plan, chunk_index: int, kv: KV, tiers: Sequence[str] | None = None
    ) -> bool:
        """Queue one full chunk of a plan's prompt for writing. Never blocks; False if nothing
        was queued.

        ``kv`` is canonical ``[n_layers, 2, chunk_tokens, kv_heads, head_dim]``
        in the model's dtype, or a zero-argument callable returning it. The
        caller must not modify it afterwards. ``tiers`` defaults to the route's
        write tiers that admit the chunk (:meth:`admitted`).
        """
        if chunk_index >= len(plan.logical_keys()):
            return False
        tiers = self.admitted(plan, chunk_index) if tiers is None else tuple(tiers)
        return self.write(plan.chunk_write(chunk_index, tiers), kv)

    def write(self, chunk: ChunkWrite, kv: KV) -> bool:
        """Queue a chunk described by value (a connector's worker side holds keys, not a
        plan): the save queue's one entry point, which :meth:`save` also uses."""
        return self.writer.submit(chunk, kv)

    def admitted(self, plan: Plan, chunk_index: int) -> tuple[str, ...]:
        """The route's write tiers whose admission rule accepts this chunk now (rejections
        counted)."""
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

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save has been written or dropped (tests, shutdown)."""
        return self.writer.flush(timeout)
