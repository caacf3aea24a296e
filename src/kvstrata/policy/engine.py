"""The policy engine: the policy section compiled once into ranked rules, one :class:`Decision`
per request.

Contract: a :class:`Policy` is immutable once built; :meth:`Policy.decide` is
a pure function of the request (no I/O, no locks), safe to call from any
thread, once per request on the scheduler's path. Rules are ranked once at
construction, so the first match in rank order is the winner; the scan goes
on only to say which other rules matched and why they lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from kvstrata.policy.route import Decision, RequestContext, Route
from kvstrata.policy.rules import (
    RANGE_FEATURES,
    SET_FEATURES,
    Interval,
    Match,
    Rule,
    conflicts,
    why_lost,
)

if TYPE_CHECKING:
    from kvstrata.config import TierSpec

FieldPath = tuple[str | int, ...]

DEFAULT_RULE = "default"


class Policy:
    """Ranked rules plus the default route (used when no rule matches).

    ``default_budget_ms`` stands in for a request's missing ``budget_ms``
    when a rule constrains the budget (the orchestrator's default budget).
    """

    def __init__(self, rules: Iterable[Rule], default: Route, default_budget_ms: float = 2000.0):
        self.rules: tuple[Rule, ...] = tuple(sorted(rules, key=lambda r: r.rank, reverse=True))
        self.default = default
        self.default_budget_ms = default_budget_ms

    def __repr__(self) -> str:
        names = ", ".join(r.name for r in self.rules)
        return (
            f"Policy(rules=[{names}], default={self.default!r}, "
            f"default_budget_ms={self.default_budget_ms})"
        )

    def rule(self, name: str) -> Rule:
        """The rule called ``name`` (KeyError if none)."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def decide(self, ctx: RequestContext, verbose: bool = False) -> Decision:
        """The route for ``ctx``: the highest-ranked matching rule's, else the default.

        ``why`` names the winner and the constraints it matched, then every
        other matching rule and why it lost; with ``verbose``, also every rule
        that did not match and the first constraint it failed.
        """
        winner: Rule | None = None
        why: list[str] = []
        lost: list[str] = []
        missed: list[str] = []
        for rule in self.rules:
            if not verbose and not rule.match.matches(ctx, self.default_budget_ms):
                continue  # the common case, without building sentences
            matched, reasons = rule.match.check(ctx, self.default_budget_ms)
            if matched and winner is None:
                winner = rule
                why.append(
                    f"rule {rule.name!r} matched (specificity {rule.specificity}, "
                    f"priority {rule.priority})"
                )
                why.extend(reasons or ("it has no constraints",))
            elif matched:
                lost.append(f"rule {rule.name!r} also matched but lost: {why_lost(rule, winner)}")
            elif verbose:
                missed.append(f"rule {rule.name!r} did not match: {reasons[0]}")
        if winner is None:
            return Decision(DEFAULT_RULE, self.default, ("no rule matched: default route", *missed))
        return Decision(winner.name, winner.route, (*why, *lost, *missed))


# -- the policy section: its shape, then its meaning --------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


#: Bounds of what a policy may say (finite, and far beyond any real request or store).
MAX_BUDGET_MS = 1e9  # ~11 days
MAX_TOKENS = 1 << 30
MAX_TTL_S = 10 * 365 * 86_400
MAX_COUNT = 1_000_000  # admission counts, |priority|


class _Range(_Frozen):
    """``min <= value < max``; at least one bound."""

    min: float | None = Field(None, ge=0, le=MAX_BUDGET_MS)
    max: float | None = Field(None, ge=0, le=MAX_BUDGET_MS)

    @model_validator(mode="after")
    def _not_empty(self) -> _Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"empty range: min {self.min:g} >= max {self.max:g}")
        return self


class _TokenRange(_Range):
    min: int | None = Field(None, ge=0, le=MAX_TOKENS)
    max: int | None = Field(None, ge=0, le=MAX_TOKENS)


class _ReuseRange(_Range):
    min: float | None = Field(None, ge=0, le=1)
    max: float | None = Field(None, ge=0, le=1)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _some(names: list[str]) -> list[str]:
    if not names:
        raise ValueError("an empty list matches nothing; leave the key out to match any value")
    return names


_Names = Annotated[list[str], BeforeValidator(_one_or_many), AfterValidator(_some)]


class MatchSpec(_Frozen):
    """``match:`` of a rule, as written; see :class:`kvstrata.policy.rules.Match` for its
    meaning."""

    context_tokens: _TokenRange | None = None
    reuse: _ReuseRange | None = None
    budget_ms: _Range | None = None
    tenant: _Names | None = None
    model: _Names | None = None
    tags: _Names | None = None
    hints: dict[str, str] = {}


class RouteSpec(_Frozen):
    """``route:`` (and ``default:``), as written; tier names are checked by
    :func:`compile_policy`."""

    read: list[str] = []
    write: list[str] = []
    admission: dict[str, Annotated[int, Field(ge=1, le=MAX_COUNT)]] = {}
    codec: dict[str, str] = {}
    retrieval: Literal["layerwise", "whole"] = "whole"
    ttl_s: dict[str, Annotated[int, Field(gt=0, le=MAX_TTL_S)]] = {}
    promote: bool = True
    demote: dict[str, str] = {}
    load: Literal["cost", "always", "never"] = "cost"


class RuleSpec(_Frozen):
    """One entry of ``rules:``."""

    name: str = Field(min_length=1)
    priority: int = Field(0, ge=-MAX_COUNT, le=MAX_COUNT)
    match: MatchSpec = MatchSpec()
    route: RouteSpec


class PolicySpec(_Frozen):
    """The ``policy:`` section, as written."""

    default: RouteSpec | None = None
    rules: list[RuleSpec] = []


class Reporter(Protocol):
    """Where compile problems go (:class:`kvstrata.config` places them on file lines)."""

    def add(self, path: FieldPath, message: str) -> None: ...

    def line(self, path: FieldPath) -> int: ...


def compile_policy(
    spec: PolicySpec, tiers: Mapping[str, TierSpec], default_budget_ms: float, report: Reporter
) -> Policy:
    """Compile the policy section against the defined ``tiers``, once.

    Reports (never raises) unknown tiers, inconsistent routes, duplicate names and
    conflicting rules through ``report``; the caller raises if anything was reported.
    With no ``default`` route, the default reads and writes every tier in file order.
    """
    implicit = RouteSpec(read=list(tiers), write=list(tiers))
    default = _route(DEFAULT_RULE, spec.default or implicit, ("policy", "default"), tiers, report)
    rules, first = [], {}
    for i, rule in enumerate(spec.rules):
        at: FieldPath = ("policy", "rules", i)
        if rule.name == DEFAULT_RULE:
            report.add((*at, "name"), "the name 'default' is reserved for policy.default")
        elif rule.name in first:
            report.add(
                (*at, "name"),
                f"duplicate rule name {rule.name!r} (first at line {first[rule.name]})",
            )
        first.setdefault(rule.name, report.line((*at, "name")))
        route = _route(rule.name, rule.route, (*at, "route"), tiers, report)
        rules.append(Rule(rule.name, _match(rule.match), route, rule.priority, i))
    for c in conflicts(rules, where=lambda i: f" (line {report.line(('policy', 'rules', i))})"):
        report.add(("policy", "rules", c.rule), c.message)
    return Policy(rules, default, default_budget_ms)


def _match(spec: MatchSpec) -> Match:
    ranges = {f: getattr(spec, f) for f in RANGE_FEATURES}
    sets = {f: getattr(spec, f) for f in SET_FEATURES}
    return Match(
        **{f: None if r is None else Interval(r.min, r.max) for f, r in ranges.items()},
        **{f: None if v is None else frozenset(v) for f, v in sets.items()},
        tags=frozenset(spec.tags or ()),
        hints=MappingProxyType(dict(spec.hints)),
    )


def _route(
    name: str, spec: RouteSpec, at: FieldPath, tiers: Mapping[str, TierSpec], report: Reporter
) -> Route:
    _check_route(spec, at, tiers, report)
    return Route(
        name=name,
        read=tuple(spec.read),
        write=tuple(spec.write),
        admission=MappingProxyType(dict(spec.admission)),
        codec=MappingProxyType(dict(spec.codec)),
        retrieval=spec.retrieval,
        ttl_s=MappingProxyType(dict(spec.ttl_s)),
        promote=spec.promote,
        demote=MappingProxyType(dict(spec.demote)),
        load=spec.load,
    )


def known_tier(tier: str, where: FieldPath, tiers: Mapping[str, object], report: Reporter) -> bool:
    """True if ``tier`` is defined; else reports it at ``where`` (every config field naming a
    tier)."""
    if tier not in tiers:
        report.add(where, f"unknown tier {tier!r} (defined: {', '.join(tiers)})")
    return tier in tiers


def _check_route(
    r: RouteSpec, at: FieldPath, tiers: Mapping[str, TierSpec], report: Reporter
) -> None:
    def known(tier: str, where: FieldPath) -> bool:
        return known_tier(tier, where, tiers, report)

    for field in ("read", "write"):
        for i, tier in enumerate(getattr(r, field)):
            if known(tier, (*at, field, i)) and tier in getattr(r, field)[:i]:
                report.add((*at, field, i), f"tier {tier!r} is listed twice")
    for field in ("admission", "ttl_s"):
        for tier in getattr(r, field):
            if known(tier, (*at, field, tier)) and tier not in r.write:
                report.add((*at, field, tier), f"tier {tier!r} is not in this route's write list")
            elif field == "ttl_s" and tier in tiers and not tiers[tier].tier_class.supports_ttl:
                report.add(
                    (*at, field, tier), f"tier {tier!r} (kind {tiers[tier].kind}) has no TTL"
                )
    for tier in r.codec:
        if known(tier, (*at, "codec", tier)) and tier not in (*r.read, *r.write):
            report.add(
                (*at, "codec", tier), f"tier {tier!r} is neither read nor written by this route"
            )
    for src, dst in r.demote.items():
        where = (*at, "demote", src)
        if known(src, where) and known(dst, where):
            _check_demote(r, src, dst, where, report)
    if not r.read and not r.write:
        report.add(at, "the route reads from no tier and writes to no tier")


def _check_demote(r: RouteSpec, src: str, dst: str, where: FieldPath, report: Reporter) -> None:
    src_codec, dst_codec = r.codec.get(src, "none"), r.codec.get(dst, "none")
    if src == dst:
        report.add(where, f"tier {src!r} cannot demote to itself")
    elif src_codec != dst_codec:
        report.add(
            where,
            f"demoting {src!r} to {dst!r} moves objects as they are, so both need the same "
            f"codec (got {src_codec!r} and {dst_codec!r})",
        )
