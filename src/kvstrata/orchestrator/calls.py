"""The call wrapper: every tier operation goes through :meth:`TierCalls.call`.

One place applies the tier's circuit breaker and timeout, records the
per-tier operation metrics, teaches the cost model the tier's round-trip
latency, and maps failures to a value: a call answers :class:`Ok` (the
tier's answer) or :class:`Failed` (skipped by the breaker, timed out, or a
:class:`~kvstrata.tiers.base.TierError`). Nothing raises for a tier's sake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from kvstrata.breaker import Breaker
from kvstrata.keys import ChunkKey
from kvstrata.policy.cost import CostModel
from kvstrata.telemetry.metrics import Telemetry
from kvstrata.tiers.base import Tier, TierError

log = logging.getLogger("kvstrata.orchestrator")

T = TypeVar("T")

#: Miss reasons whose object is deleted: it can never be served here, and would block a rewrite.
DROPPED_REASONS = frozenset({"corrupt", "unauthenticated", "foreign", "codec"})


@dataclass(frozen=True)
class Ok(Generic[T]):
    """The tier answered."""

    value: T


@dataclass(frozen=True)
class Failed:
    """The tier did not answer: ``skipped`` (breaker open), ``timeout`` or ``error``."""

    tier: str
    op: str
    outcome: Literal["skipped", "timeout", "error"]


Outcome = Ok[T] | Failed


class TierCalls:
    """The tiers by name, each behind its breaker and timeout.

    ``tiers`` is the orchestrator's own mapping (a connector may wrap a tier in
    place, :mod:`kvstrata.connectors.vllm_pool`); calls look the tier up at
    call time.
    """

    def __init__(
        self,
        tiers: dict[str, Tier],
        timeouts: Mapping[str, float],
        breaker: tuple[int, float],
        telemetry: Telemetry,
        cost: CostModel,
    ):
        self.tiers = tiers
        self.timeouts = dict(timeouts)
        self.breakers = {name: Breaker(*breaker) for name in tiers}
        self.telemetry, self.cost = telemetry, cost

    async def call(self, tier: str, op: str, make: Callable[[Tier], Awaitable[T]]) -> Outcome:
        """``make(tier)`` awaited under the tier's breaker and timeout, as a value."""
        if not self.breakers[tier].allow():
            self.telemetry.op(tier, op, "skipped")
            return Failed(tier, op, "skipped")
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(make(self.tiers[tier]), self.timeouts[tier])
        except (TimeoutError, TierError) as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
            self.telemetry.op(tier, op, outcome, time.perf_counter() - started)
            self._record(tier, ok=False)
            log.warning("tier %s %s %s: %s", tier, op, outcome, exc)
            return Failed(tier, op, outcome)
        elapsed = time.perf_counter() - started
        self.telemetry.op(tier, op, "ok", elapsed)
        self._record(tier, ok=True)
        if op == "contains":  # a small round trip: it teaches the cost model the tier's latency
            self.cost.observe_read(tier, elapsed, 0)
        return Ok(result)

    async def put(
        self, tier: str, items: Sequence[tuple[ChunkKey, bytes]], ttl_s: int | None = None
    ) -> Outcome:
        """Store objects: the one place a tier's ``put`` is called (saves, promotions,
        demotions, corpora). ``ttl_s``: a route's expiry for this tier (given only for tiers
        whose kind ``supports_ttl``: the configuration refuses it elsewhere); None, the
        tier's own default."""
        options = {"ttl_s": ttl_s} if ttl_s else {}
        return await self.call(tier, "put", lambda t: t.put(items, **options))

    def _record(self, tier: str, ok: bool) -> None:
        if self.breakers[tier].record(ok):
            is_open = not ok
            self.telemetry.breaker(tier, is_open)
            log.warning("tier %s breaker %s", tier, "opened" if is_open else "closed")

    def reject(self, tier: str, key: ChunkKey, reason: str) -> None:
        """Count a bad object and drop it (on the loop), so nobody trips on it again and a save
        can replace it. A newer format's object ("unsupported") is left to its owner."""
        self.telemetry.bad_object(tier, reason)
        log.warning("tier %s: %s object %s is a miss", tier, reason, key)
        if reason in DROPPED_REASONS:
            asyncio.ensure_future(self.call(tier, "delete", lambda t: t.delete([key])))

    def lookup_timeout_s(self) -> float:
        """How long a whole lookup may take: two rounds of the slowest tier, plus a second."""
        return max(self.timeouts.values(), default=1.0) * 2 + 1.0

    async def close(self) -> None:
        for tier in self.tiers.values():
            try:
                await tier.close()
            except Exception:  # closing is best effort
                log.debug("closing tier %s failed", tier.name, exc_info=True)


def value_or(outcome: Outcome, default: Any) -> Any:
    """The answer of an :class:`Ok`, else ``default``."""
    return outcome.value if isinstance(outcome, Ok) else default
