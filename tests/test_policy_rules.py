"""Policy rules: matching every feature, specificity, ranking, regions, conflicts and decisions."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from kvstrata.policy.engine import Policy
from kvstrata.policy.route import Decision, RequestContext, Route
from kvstrata.policy.rules import Interval, Match, Rule, conflicts

ACME = frozenset({"acme", "globex"})


def ctx(**kw) -> RequestContext:
    if "tags" in kw:
        kw["tags"] = frozenset(kw["tags"])
    if "hints" in kw:
        kw["hints"] = MappingProxyType(kw["hints"])
    return RequestContext(**kw)


def hints(**kv: str) -> MappingProxyType:
    return MappingProxyType(kv)


# -- matching: (match, request, matched, reasons) ---------------------------------------

MATCHING = {
    "no constraints": (Match(), ctx(), True, ()),
    "min is inclusive": (
        Match(context_tokens=Interval(8192)),
        ctx(context_tokens=8192),
        True,
        ("context_tokens 8192 >= 8192",),
    ),
    "below min": (
        Match(context_tokens=Interval(8192)),
        ctx(context_tokens=8191),
        False,
        ("context_tokens 8191 < min 8192",),
    ),
    "max is exclusive": (
        Match(context_tokens=Interval(None, 4096)),
        ctx(context_tokens=4096),
        False,
        ("context_tokens 4096 >= max 4096",),
    ),
    "below max": (
        Match(context_tokens=Interval(None, 4096)),
        ctx(context_tokens=4095),
        True,
        ("context_tokens 4095 < 4096",),
    ),
    "both bounds": (
        Match(context_tokens=Interval(10, 20)),
        ctx(context_tokens=10),
        True,
        ("context_tokens 10 in [10, 20)",),
    ),
    "reuse at min": (Match(reuse=Interval(0.5)), ctx(reuse=0.5), True, ("reuse 0.5 >= 0.5",)),
    "reuse below min": (
        Match(reuse=Interval(0.5)),
        ctx(reuse=0.49),
        False,
        ("reuse 0.49 < min 0.5",),
    ),
    "reuse of 1 under max 1": (
        Match(reuse=Interval(None, 1.0)),
        ctx(reuse=1.0),
        False,
        ("reuse 1 >= max 1",),
    ),
    "budget given": (
        Match(budget_ms=Interval(None, 500)),
        ctx(budget_ms=499.5),
        True,
        ("budget_ms 499.5 < 500",),
    ),
    "budget missing: default, too big": (
        Match(budget_ms=Interval(None, 500)),
        ctx(),
        False,
        ("budget_ms 2000 (default) >= max 500",),
    ),
    "budget missing: default, matches": (
        Match(budget_ms=Interval(1000)),
        ctx(),
        True,
        ("budget_ms 2000 (default) >= 1000",),
    ),
    "tenant any of": (
        Match(tenant=ACME),
        ctx(tenant="globex"),
        True,
        ("tenant 'globex' in {acme, globex}",),
    ),
    "tenant none of": (
        Match(tenant=ACME),
        ctx(tenant="initech"),
        False,
        ("tenant 'initech' not in {acme, globex}",),
    ),
    "tenant unknown": (Match(tenant=ACME), ctx(), False, ("tenant '' not in {acme, globex}",)),
    "model any of": (
        Match(model=frozenset({"smollm2-135m"})),
        ctx(model="smollm2-135m"),
        True,
        ("model 'smollm2-135m' in {smollm2-135m}",),
    ),
    "model none of": (
        Match(model=frozenset({"smollm2-135m"})),
        ctx(model="llama"),
        False,
        ("model 'llama' not in {smollm2-135m}",),
    ),
    "tags all of": (
        Match(tags=frozenset({"rag", "eu"})),
        ctx(tags={"rag", "eu", "x"}),
        True,
        ("tags include eu, rag",),
    ),
    "tags some of": (
        Match(tags=frozenset({"rag", "eu"})),
        ctx(tags={"rag"}),
        False,
        ("tags lack eu",),
    ),
    "hint equal": (
        Match(hints=hints(tier_hint="fast")),
        ctx(hints={"tier_hint": "fast", "x": "1"}),
        True,
        ("hint tier_hint = 'fast'",),
    ),
    "hint differs": (
        Match(hints=hints(tier_hint="fast")),
        ctx(hints={"tier_hint": "slow"}),
        False,
        ("hint tier_hint is 'slow', not 'fast'",),
    ),
    "hint missing": (
        Match(hints=hints(tier_hint="fast")),
        ctx(),
        False,
        ("hint tier_hint missing",),
    ),
    "every feature": (
        Match(
            Interval(100),
            Interval(0.5),
            Interval(None, 500),
            ACME,
            frozenset({"m"}),
            frozenset({"rag"}),
            hints(a="1"),
        ),
        ctx(
            context_tokens=100,
            reuse=0.9,
            budget_ms=10,
            tenant="acme",
            model="m",
            tags={"rag"},
            hints={"a": "1"},
        ),
        True,
        (
            "context_tokens 100 >= 100",
            "reuse 0.9 >= 0.5",
            "budget_ms 10 < 500",
            "tenant 'acme' in {acme, globex}",
            "model 'm' in {m}",
            "tags include rag",
            "hint a = '1'",
        ),
    ),
    "first failure only": (
        Match(context_tokens=Interval(100), tenant=ACME),
        ctx(context_tokens=5, tenant="x"),
        False,
        ("context_tokens 5 < min 100",),
    ),
}


@pytest.mark.parametrize(
    "match, request_, matched, reasons", MATCHING.values(), ids=MATCHING.keys()
)
def test_match(
    match: Match, request_: RequestContext, matched: bool, reasons: tuple[str, ...]
) -> None:
    assert match.check(request_, default_budget_ms=2000) == (matched, reasons)
    assert match.matches(request_, default_budget_ms=2000) == matched  # the fast path agrees


SPECIFICITY = {
    "nothing": (Match(), 0),
    "one range": (Match(reuse=Interval(0.5)), 1),
    "tags count once": (Match(tags=frozenset({"a", "b", "c"})), 1),
    "each hint counts": (Match(hints=hints(a="1", b="2")), 2),
    "everything": (
        Match(
            Interval(1),
            Interval(0.1),
            Interval(1),
            ACME,
            ACME,
            frozenset({"t", "u"}),
            hints(a="1", b="2"),
        ),
        8,
    ),
}


@pytest.mark.parametrize("match, expected", SPECIFICITY.values(), ids=SPECIFICITY.keys())
def test_specificity(match: Match, expected: int) -> None:
    assert match.specificity == expected


# -- regions: (a, b, a and b intersect, a within b) ----------------------------------------

REGIONS = {
    "adjacent ranges": (
        Match(context_tokens=Interval(None, 100)),
        Match(context_tokens=Interval(100)),
        False,
        False,
    ),
    "overlapping ranges": (
        Match(context_tokens=Interval(None, 101)),
        Match(context_tokens=Interval(100)),
        True,
        False,
    ),
    "nested range": (
        Match(context_tokens=Interval(200, 300)),
        Match(context_tokens=Interval(100)),
        True,
        True,
    ),
    "min 0 is everything": (Match(), Match(context_tokens=Interval(0)), True, True),
    "unconstrained is not inside a range": (
        Match(),
        Match(context_tokens=Interval(1)),
        True,
        False,
    ),
    "different features": (
        Match(context_tokens=Interval(1)),
        Match(reuse=Interval(0.5)),
        True,
        False,
    ),
    "disjoint tenants": (
        Match(tenant=frozenset({"a"})),
        Match(tenant=frozenset({"b"})),
        False,
        False,
    ),
    "tenant subset": (Match(tenant=frozenset({"a"})), Match(tenant=ACME | {"a"}), True, True),
    "any tenant is not inside a list": (Match(), Match(tenant=ACME), True, False),
    "more tags is inside fewer": (
        Match(tags=frozenset({"a", "b"})),
        Match(tags=frozenset({"a"})),
        True,
        True,
    ),
    "different tags still meet": (
        Match(tags=frozenset({"a"})),
        Match(tags=frozenset({"b"})),
        True,
        False,
    ),
    "conflicting hints": (Match(hints=hints(k="1")), Match(hints=hints(k="2")), False, False),
    "more hints is inside fewer": (
        Match(hints=hints(k="1", j="2")),
        Match(hints=hints(k="1")),
        True,
        True,
    ),
}


@pytest.mark.parametrize("a, b, meet, inside", REGIONS.values(), ids=REGIONS.keys())
def test_regions(a: Match, b: Match, meet: bool, inside: bool) -> None:
    assert a.intersects(b) == b.intersects(a) == meet
    assert a.within(b) == inside
    assert a.within(a)


# -- conflicts --------------------------------------------------------------------------

R = Route(read=("dram",))


def rules(*specs: tuple[str, Match, int]) -> list[Rule]:
    return [Rule(name, match, R, priority, i) for i, (name, match, priority) in enumerate(specs)]


LONG = Match(context_tokens=Interval(8192))
RAG = Match(tags=frozenset({"rag"}))

CONFLICTS = {
    "disjoint": (rules(("a", LONG, 0), ("b", Match(context_tokens=Interval(None, 8192)), 0)), []),
    "different priority": (rules(("a", LONG, 0), ("b", RAG, 1)), []),
    "overlap": (
        rules(("a", LONG, 0), ("b", RAG, 0)),
        [
            (
                1,
                0,
                "rule 'b' overlaps rule 'a': same specificity (1) and priority (0); "
                "raise one rule's priority or make their matches disjoint",
            )
        ],
    ),
    "shadowed by a more specific rule": (
        rules(
            ("wide", Match(context_tokens=Interval(0), tags=frozenset({"rag"})), 0),
            ("narrow", RAG, 5),
        ),
        [
            (
                1,
                0,
                "rule 'narrow' can never win: every request it matches also matches rule 'wide', "
                "which is more specific (2 > 1)",
            )
        ],
    ),
    "shadowed by a higher priority": (
        rules(("a", Match(tags=frozenset({"rag", "eu"})), 0), ("b", RAG, 1)),
        [
            (
                0,
                1,
                "rule 'a' can never win: every request it matches also matches rule 'b', "
                "which has the same specificity (1) and a higher priority (1 > 0)",
            )
        ],
    ),
    "narrower with higher priority is fine": (
        rules(("a", Match(tags=frozenset({"rag", "eu"})), 1), ("b", RAG, 0)),
        [],
    ),
    "more specific but outside": (
        rules(("a", Match(context_tokens=Interval(1), tags=frozenset({"x"})), 0), ("b", RAG, 0)),
        [],
    ),
}


@pytest.mark.parametrize("ruleset, expected", CONFLICTS.values(), ids=CONFLICTS.keys())
def test_conflicts(ruleset: list[Rule], expected: list[tuple[int, int, str]]) -> None:
    assert [(c.rule, c.other, c.message) for c in conflicts(ruleset)] == expected


def test_conflict_location_callback() -> None:
    found = conflicts(rules(("a", LONG, 0), ("b", RAG, 0)), where=lambda i: f" (line {10 + i})")
    assert found[0].message.startswith("rule 'b' overlaps rule 'a' (line 10):")


# -- decisions --------------------------------------------------------------------------

DEFAULT = Route(name="default", read=("dram", "local"), write=("dram", "local"))


def route(name: str) -> Route:
    return Route(name=name, read=("dram",), write=("dram",))


def policy(*specs: tuple[str, Match, int], budget: float = 2000.0) -> Policy:
    return Policy(
        [Rule(n, m, route(n), p, i) for i, (n, m, p) in enumerate(specs)], DEFAULT, budget
    )


def test_most_specific_wins_and_losers_are_explained() -> None:
    p = policy(
        ("long", LONG, 9),
        ("long-rag", Match(context_tokens=Interval(8192), tags=frozenset({"rag"})), 0),
    )
    d = p.decide(ctx(context_tokens=9000, tags={"rag"}))
    assert d == Decision(
        "long-rag",
        route("long-rag"),
        (
            "rule 'long-rag' matched (specificity 2, priority 0)",
            "context_tokens 9000 >= 8192",
            "tags include rag",
            "rule 'long' also matched but lost: less specific (1 < 2)",
        ),
    )


def test_priority_breaks_ties_between_equally_specific_rules() -> None:
    p = policy(("long", LONG, 0), ("rag", RAG, 5))
    d = p.decide(ctx(context_tokens=9000, tags={"rag"}))
    assert d.rule == "rag"
    assert (
        d.why[-1]
        == "rule 'long' also matched but lost: same specificity (1), lower priority (0 < 5)"
    )


def test_file_order_breaks_remaining_ties() -> None:
    p = policy(("first", LONG, 0), ("second", RAG, 0))
    d = p.decide(ctx(context_tokens=9000, tags={"rag"}))
    assert d.rule == "first"
    assert (
        d.why[-1]
        == "rule 'second' also matched but lost: same specificity and priority, later in the file"
    )


def test_rank_does_not_depend_on_the_order_rules_are_given() -> None:
    specs = [
        Rule("a", LONG, route("a"), 0, 0),
        Rule("b", RAG, route("b"), 3, 1),
        Rule("c", Match(context_tokens=Interval(1), tags=frozenset({"rag"})), route("c"), 0, 2),
    ]
    forward, backward = Policy(specs, DEFAULT), Policy(reversed(specs), DEFAULT)
    assert [r.name for r in forward.rules] == [r.name for r in backward.rules] == ["c", "b", "a"]


def test_default_route_when_nothing_matches() -> None:
    p = policy(("long", LONG, 0))
    assert p.decide(ctx(context_tokens=10)) == Decision(
        "default", DEFAULT, ("no rule matched: default route",)
    )


def test_verbose_lists_rules_that_did_not_match() -> None:
    p = policy(("long", LONG, 0), ("rag", RAG, 1))
    d = p.decide(ctx(context_tokens=10), verbose=True)
    assert d.why == (
        "no rule matched: default route",
        "rule 'rag' did not match: tags lack rag",
        "rule 'long' did not match: context_tokens 10 < min 8192",
    )


@pytest.mark.parametrize(
    "budget_ms, default_budget, rule",
    [
        (None, 2000.0, "default"),
        (None, 400.0, "tight"),
        (100.0, 2000.0, "tight"),
        (600.0, 400.0, "default"),
    ],
)
def test_missing_budget_uses_the_policy_default(budget_ms, default_budget, rule) -> None:
    p = policy(("tight", Match(budget_ms=Interval(None, 500)), 0), budget=default_budget)
    assert p.decide(ctx(budget_ms=budget_ms)).rule == rule


def test_rule_lookup_by_name() -> None:
    p = policy(("long", LONG, 0))
    assert p.rule("long").match == LONG
    with pytest.raises(KeyError):
        p.rule("nope")


def test_describe_is_readable() -> None:
    m = Match(
        context_tokens=Interval(8192), reuse=Interval(None, 0.5), tenant=ACME, hints=hints(k="v")
    )
    assert (
        m.describe() == "context_tokens [8192, ); reuse [, 0.5); tenant {acme, globex}; hint k='v'"
    )
    assert Match().describe() == "any request"
