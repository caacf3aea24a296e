"""The values that cross the policy boundary: what a request looks like, where its KV goes.

The connector builds a :class:`RequestContext` per request (defined beside the
rules that match on it, :mod:`kvstrata.policy.rules`, and re-exported here); the
policy engine answers with a :class:`Decision` (the matched rule and its
:class:`Route`); the orchestrator carries the route out. All frozen: a decision
never changes under the code that acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from kvstrata.policy.rules import RequestContext

__all__ = ["Decision", "LoadMode", "RequestContext", "Retrieval", "Route"]

Retrieval = Literal["layerwise", "whole"]
LoadMode = Literal["cost", "always", "never"]


def _empty() -> Mapping:
    return MappingProxyType({})


@dataclass(frozen=True)
class Route:
    """Where one request's KV is read from and written to.

    * ``read``: tiers to look in, fastest first; a chunk is loaded from the
      first tier that has it.
    * ``write``: tiers new chunks are saved to.
    * ``admission``: tier -> minimum times a chunk must have been seen before
      it is written there (e.g. ``{"s3": 2}``: S3 only for chunks seen twice).
    * ``codec``: tier -> codec name; tiers not named use ``"none"``.
    * ``retrieval``: read layer by layer (overlapping compute) or whole objects.
    * ``ttl_s``: tier -> seconds until what this route writes there expires, for
      tiers whose kind takes a TTL per put (``Tier.supports_ttl``: Redis); it
      overrides the tier's own ``ttl_s`` for these objects.
    * ``promote``: on a hit in a slower tier, also write the chunk to the
      faster tiers in ``read`` that are in ``write``.
    * ``demote``: tier -> tier that receives the chunks it evicts.
    * ``load``: ``cost`` (load only when the cost model says loading beats
      recomputing within budget), ``always`` or ``never`` (write-only route).
    """

    name: str = "default"
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admission: Mapping[str, int] = field(default_factory=_empty)
    codec: Mapping[str, str] = field(default_factory=_empty)
    retrieval: Retrieval = "whole"
    ttl_s: Mapping[str, int] = field(default_factory=_empty)
    promote: bool = True
    demote: Mapping[str, str] = field(default_factory=_empty)
    load: LoadMode = "cost"

    def codec_for(self, tier: str) -> str:
        return self.codec.get(tier, "none")


@dataclass(frozen=True)
class Decision:
    """The policy's answer: which rule matched, its route, and why (for ``policy explain``)."""

    rule: str
    route: Route
    why: tuple[str, ...] = field(default=())
