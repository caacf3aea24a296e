"""Policy rules: what a request looks like (:class:`RequestContext`), what a rule's request
must look like (:class:`Match`) and where its KV goes.

A :class:`Match` is a region of request-feature space. Each constrained
feature narrows it:

* ranges (``context_tokens``, ``reuse``, ``budget_ms``): ``min <= value < max``,
  either bound optional;
* ``tenant``, ``model``: the request's value is any of the listed ones;
* ``tags``: the request carries all of the listed tags;
* ``hints``: each listed key is present with exactly that string value.

``specificity`` counts the constrained features (each hints key counts 1).
Among the rules that match a request, the winner has the highest
:attr:`Rule.rank`: most specific first, then the higher ``priority``, then
the earlier position in the file.

Because regions are products of simple sets, two questions have exact
answers without enumerating requests: do two regions share a request
(:meth:`Match.intersects`), and is one inside another (:meth:`Match.within`)?
:func:`conflicts` uses them to find ambiguous and unreachable rules.
Everything here is a frozen value; nothing knows about YAML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstrata.policy.route import Route

#: Range conditions (``min <= value < max``) and set conditions (value is one of): a condition
#: is a field of :class:`RequestContext` and of :class:`Match` named here, and a field of
#: ``MatchSpec`` (:mod:`kvstrata.policy.engine`); matching, overlap checks and explanations
#: loop over these names.
RANGE_FEATURES = ("context_tokens", "reuse", "budget_ms")
SET_FEATURES = ("tenant", "model")


def num(x: float) -> str:
    """A number as an operator wrote it: 8192 not 8192.0, 0.5 not 5e-01."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Interval:
    """Values ``v`` with ``min <= v < max``; ``None`` leaves that side open.

    Every request feature is >= 0, so regions are compared on ``[0, inf)``.
    """

    min: float | None = None
    max: float | None = None

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value < self.max)

    def bounds(self) -> tuple[float, float]:
        lo = 0.0 if self.min is None else max(self.min, 0.0)
        return lo, math.inf if self.max is None else self.max

    def intersects(self, other: Interval) -> bool:
        (a_lo, a_hi), (b_lo, b_hi) = self.bounds(), other.bounds()
        return max(a_lo, b_lo) < min(a_hi, b_hi)

    def within(self, other: Interval) -> bool:
        (a_lo, a_hi), (b_lo, b_hi) = self.bounds(), other.bounds()
        return a_lo >= a_hi or (a_lo >= b_lo and a_hi <= b_hi)

    def explain(self, feature: str, value: float, note: str = "") -> tuple[bool, str]:
        """(whether ``value`` is inside, a sentence saying why)."""
        shown = f"{feature} {num(value)}{note}"
        if self.min is not None and value < self.min:
            return False, f"{shown} < min {num(self.min)}"
        if self.max is not None and value >= self.max:
            return False, f"{shown} >= max {num(self.max)}"
        if self.min is not None and self.max is not None:
            return True, f"{shown} in [{num(self.min)}, {num(self.max)})"
        if self.min is not None:
            return True, f"{shown} >= {num(self.min)}"
        return True, f"{shown} < {num(self.max)}"  # type: ignore[arg-type]


_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class RequestContext:
    """Request features a policy can match on.

    ``reuse`` is the predicted probability that this request's prefix is read
    again (0..1): the request's own hint if it gave one, else the estimator's
    prediction. ``budget_ms`` is the latency budget for loading (None: the
    policy's default). ``hints`` carries any other key the request supplied
    (``kv_transfer_params`` on vLLM), matched as strings.
    """

    context_tokens: int = 0
    reuse: float = 0.0
    budget_ms: float | None = None
    tenant: str = ""
    model: str = ""
    tags: frozenset[str] = frozenset()
    hints: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class Match:
    """A region of requests; ``None`` / empty means the feature is unconstrained."""

    context_tokens: Interval | None = None
    reuse: Interval | None = None
    budget_ms: Interval | None = None
    tenant: frozenset[str] | None = None
    model: frozenset[str] | None = None
    tags: frozenset[str] = frozenset()
    # a factory, not a default: Python 3.11 rejects unhashable (mappingproxy) dataclass defaults
    hints: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    # a frozen value: computed once (cached_property bypasses the frozen __setattr__)
    @cached_property
    def specificity(self) -> int:
        ranges = sum(getattr(self, f) is not None for f in (*RANGE_FEATURES, *SET_FEATURES))
        return ranges + bool(self.tags) + len(self.hints)

    def matches(self, ctx: RequestContext, default_budget_ms: float) -> bool:
        """Does ``ctx`` fall in this region? (:meth:`check` without the words: the per-request
        path.)"""
        for feature in RANGE_FEATURES:
            interval: Interval | None = getattr(self, feature)
            if interval is not None and not interval.contains(
                _value(ctx, feature, default_budget_ms)
            ):
                return False
        for feature in SET_FEATURES:
            allowed: frozenset[str] | None = getattr(self, feature)
            if allowed is not None and getattr(ctx, feature) not in allowed:
                return False
        return self.tags <= ctx.tags and all(ctx.hints.get(k) == v for k, v in self.hints.items())

    def check(self, ctx: RequestContext, default_budget_ms: float) -> tuple[bool, tuple[str, ...]]:
        """Does ``ctx`` fall in this region?

        Returns ``(True, one reason per constraint)`` or ``(False, (the first
        failing constraint,))``. A request without a budget is matched as if
        it had ``default_budget_ms``.
        """
        reasons: list[str] = []
        for ok, reason in self._tests(ctx, default_budget_ms):
            if not ok:
                return False, (reason,)
            reasons.append(reason)
        return True, tuple(reasons)

    def _tests(self, ctx: RequestContext, default_budget_ms: float):
        for feature in RANGE_FEATURES:
            interval: Interval | None = getattr(self, feature)
            if interval is None:
                continue
            note = " (default)" if getattr(ctx, feature) is None else ""
            yield interval.explain(feature, _value(ctx, feature, default_budget_ms), note)
        for feature in SET_FEATURES:
            allowed: frozenset[str] | None = getattr(self, feature)
            if allowed is not None:
                value = getattr(ctx, feature)
                verb = "in" if value in allowed else "not in"
                yield (
                    value in allowed,
                    f"{feature} {value!r} {verb} {{{', '.join(sorted(allowed))}}}",
                )
        if self.tags:
            missing = self.tags - ctx.tags
            yield (
                not missing,
                f"tags lack {', '.join(sorted(missing))}"
                if missing
                else f"tags include {', '.join(sorted(self.tags))}",
            )
        for key, want in self.hints.items():
            got = ctx.hints.get(key)
            if got == want:
                yield True, f"hint {key} = {want!r}"
            elif got is None:
                yield False, f"hint {key} missing"
            else:
                yield False, f"hint {key} is {got!r}, not {want!r}"

    def intersects(self, other: Match) -> bool:
        """Is there a request both regions contain?"""
        for feature in RANGE_FEATURES:
            a, b = getattr(self, feature), getattr(other, feature)
            if a is not None and b is not None and not a.intersects(b):
                return False
        for feature in SET_FEATURES:
            a, b = getattr(self, feature), getattr(other, feature)
            if a is not None and b is not None and not a & b:
                return False
        # tags: a request may carry the union of both tag sets
        return all(other.hints.get(k, v) == v for k, v in self.hints.items())

    def within(self, other: Match) -> bool:
        """Is every request in this region also in ``other``'s?"""
        for feature in RANGE_FEATURES:
            a, b = getattr(self, feature), getattr(other, feature)
            if b is not None and not (a or Interval()).within(b):
                return False
        for feature in SET_FEATURES:
            a, b = getattr(self, feature), getattr(other, feature)
            if b is not None and (a is None or not a <= b):
                return False
        return other.tags <= self.tags and all(
            self.hints.get(k) == v for k, v in other.hints.items()
        )

    def describe(self) -> str:
        """The constraints, YAML-like, for listings."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Interval):
                lo = "" if value.min is None else num(value.min)
                hi = "" if value.max is None else num(value.max)
                parts.append(f"{f.name} [{lo}, {hi})")
            elif isinstance(value, frozenset) and value:
                parts.append(f"{f.name} {{{', '.join(sorted(value))}}}")
        parts += [f"hint {k}={v!r}" for k, v in self.hints.items()]
        return "; ".join(parts) or "any request"


def _value(ctx: RequestContext, feature: str, default_budget_ms: float) -> float:
    """A range feature's value; a request without a budget is matched with the default one."""
    value = getattr(ctx, feature)
    return default_budget_ms if value is None and feature == "budget_ms" else value


@dataclass(frozen=True)
class Rule:
    """A named match and the route it selects. ``index`` is the rule's position in the file."""

    name: str
    match: Match
    route: Route
    priority: int = 0
    index: int = 0

    @property
    def specificity(self) -> int:
        return self.match.specificity

    @property
    def rank(self) -> tuple[int, int, int]:
        """Higher wins: specificity, then priority, then earlier in the file."""
        return self.specificity, self.priority, -self.index


def why_lost(loser: Rule, winner: Rule) -> str:
    """Why ``winner`` outranks ``loser``, in words."""
    if winner.specificity != loser.specificity:
        return f"less specific ({loser.specificity} < {winner.specificity})"
    if winner.priority != loser.priority:
        return (
            f"same specificity ({loser.specificity}), "
            f"lower priority ({loser.priority} < {winner.priority})"
        )
    return "same specificity and priority, later in the file"


@dataclass(frozen=True)
class Conflict:
    """A problem with rule ``rule`` (an index into the list given) caused by rule ``other``."""

    rule: int
    other: int
    message: str


def conflicts(rules: Sequence[Rule], where: Callable[[int], str] = lambda i: "") -> list[Conflict]:
    """Rules that are ambiguous or can never win, at most one conflict per rule.

    * unreachable: rule B's region lies inside rule A's and A outranks B on
      specificity, or on priority at equal specificity -- B never wins.
    * overlap: A and B (A earlier) have equal specificity and priority and
      their regions intersect -- only file order would separate them.

    ``where(i)`` adds a location to the other rule's name (e.g. " (line 12)").
    Checks are pairwise: a rule covered only by several rules together is
    not reported.
    """
    found = []
    for j, b in enumerate(rules):
        for i, a in enumerate(rules):
            if i == j:
                continue
            message = _unreachable(a, b, where(i)) or (_overlap(a, b, where(i)) if i < j else None)
            if message:
                found.append(Conflict(j, i, message))
                break
    return found


def _overlap(a: Rule, b: Rule, a_at: str) -> str | None:
    if (a.specificity, a.priority) != (b.specificity, b.priority) or not a.match.intersects(
        b.match
    ):
        return None
    return (
        f"rule {b.name!r} overlaps rule {a.name!r}{a_at}: same specificity ({b.specificity}) "
        f"and priority ({b.priority}); raise one rule's priority or make their matches disjoint"
    )


def _unreachable(a: Rule, b: Rule, a_at: str) -> str | None:
    if (a.specificity, a.priority) <= (b.specificity, b.priority) or not b.match.within(a.match):
        return None
    if a.specificity > b.specificity:
        edge = f"is more specific ({a.specificity} > {b.specificity})"
    else:
        edge = (
            f"has the same specificity ({a.specificity}) "
            f"and a higher priority ({a.priority} > {b.priority})"
        )
    return (
        f"rule {b.name!r} can never win: every request it matches also matches "
        f"rule {a.name!r}{a_at}, which {edge}"
    )
