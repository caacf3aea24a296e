"""Configuration loading: the schema, defaults, presets, and every error path with its exact
message."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from kvstrata.cli.policy import policy_app
from kvstrata.config import (
    ConfigError,
    StrataConfig,
    default_config,
    load_config,
    parse_bytes,
    parse_config,
)
from kvstrata.policy.route import RequestContext, Route
from kvstrata.tiers.base import Tier, TierSettings, register

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml")) + sorted(
    (ROOT / "src/kvstrata/presets").glob("*.yaml")
)

# lines 1-4; a case appends from line 5
HEAD = """\
version: 1
tiers:
  dram: {kind: memory}
  local: {kind: disk, path: /tmp/kvstrata-test}
"""
POLICY = HEAD + "policy:\n"  # line 5; policy content from line 6


def one_tier(spec: str) -> str:
    return f"version: 1\ntiers:\n  t: {spec}\n"  # the tier on line 3


def rules(*lines: str) -> str:
    return (
        POLICY + "  rules:\n" + "".join(f"    {line}\n" for line in lines)
    )  # first rule on line 7


FULL = """\
version: 1
chunk_tokens: 256
tiers:
  dram:
    kind: memory
    capacity_bytes: 4GiB
    eviction: s3fifo
    cost: {latency_ms: 0.05, bandwidth_mbps: 20000}
    timeout_ms: 1000
  local: {kind: disk, path: ~/.cache/kvstrata/kv, capacity_bytes: 64GiB}
  shared: {kind: redis, url: "redis://:pw@redis.example:6379/0"}
  cold: {kind: s3, endpoint: "http://s3.example:8333", bucket: kv, cost: {latency_ms: 30}}
engine:
  prefill_tokens_per_s: 150
orchestrator:
  save_queue_chunks: 128
  breaker: {failures: 5, cooldown_s: 2.5}
  default_budget_ms: 1500
reuse: {half_life_s: 60, sketch_width: 1024, sketch_depth: 2}
policy:
  default: {read: [dram, local], write: [dram, local]}
  rules:
    - name: long-rag
      priority: 3
      match:
        context_tokens: {min: 8192}
        reuse: {min: 0.5}
        budget_ms: {max: 500}
        tenant: [acme, globex]
        model: smollm2-135m
        tags: [rag]
        hints: {tier_hint: fast}
      route: {read: [dram, shared], write: [dram, shared], admission: {shared: 2},
              codec: {shared: int8}, retrieval: layerwise, ttl_s: {shared: 3600},
              promote: false, demote: {local: cold}, load: always}
"""


# -- the schema ------------------------------------------------------------------------


def test_full_example_parses_into_typed_values() -> None:
    cfg = parse_config(FULL)
    assert cfg.path is None and cfg.version == 1 and cfg.chunk_tokens == 256
    assert list(cfg.tiers) == ["dram", "local", "shared", "cold"]
    dram = cfg.tiers["dram"]
    assert (dram.name, dram.kind, dram.timeout_ms) == ("dram", "memory", 1000)
    assert dram.settings.capacity_bytes == 4 << 30 and dram.settings.eviction == "s3fifo"
    assert (dram.cost.latency_ms, dram.cost.bandwidth_mbps) == (0.05, 20000)
    assert cfg.tiers["shared"].settings.url.get_secret_value() == "redis://:pw@redis.example:6379/0"
    assert (cfg.tiers["cold"].cost.latency_ms, cfg.tiers["cold"].cost.bandwidth_mbps) == (
        30,
        250,
    )  # partial prior
    assert cfg.engine.prefill_tokens_per_s == 150
    o = cfg.orchestrator
    assert (o.save_queue_chunks, o.breaker.failures, o.breaker.cooldown_s, o.default_budget_ms) == (
        128,
        5,
        2.5,
        1500,
    )
    assert (cfg.reuse.half_life_s, cfg.reuse.sketch_width, cfg.reuse.sketch_depth) == (60, 1024, 2)
    assert cfg.policy.default == Route(
        name="default", read=("dram", "local"), write=("dram", "local")
    )
    assert cfg.policy.default_budget_ms == 1500
    (rule,) = cfg.policy.rules
    assert (rule.name, rule.priority, rule.specificity) == ("long-rag", 3, 7)
    assert rule.route == Route(
        name="long-rag",
        read=("dram", "shared"),
        write=("dram", "shared"),
        admission={"shared": 2},
        codec={"shared": "int8"},
        retrieval="layerwise",
        ttl_s={"shared": 3600},
        promote=False,
        demote={"local": "cold"},
        load="always",
    )


def test_full_example_decides() -> None:
    cfg = parse_config(FULL)
    request = RequestContext(
        context_tokens=9000,
        reuse=0.6,
        budget_ms=None,
        tenant="acme",
        model="smollm2-135m",
        tags=frozenset({"rag", "x"}),
        hints={"tier_hint": "fast"},
    )
    assert (
        cfg.policy.decide(request).rule == "default"
    )  # no budget: the default 1500 ms is not < 500
    decision = cfg.policy.decide(RequestContext(**{**request.__dict__, "budget_ms": 400}))
    assert decision.rule == "long-rag" and decision.route.read == ("dram", "shared")


def test_defaults_fill_what_the_file_leaves_out() -> None:
    cfg = parse_config(
        "version: 1\ntiers: {m: {kind: memory}, d: {kind: disk}, r: {kind: redis}, s: {kind: s3}}\n"
    )
    assert cfg.chunk_tokens == 256
    assert {
        n: (t.cost.latency_ms, t.cost.bandwidth_mbps, t.timeout_ms) for n, t in cfg.tiers.items()
    } == {
        "m": (0.02, 20000, 1000),
        "d": (0.3, 1500, 2000),
        "r": (0.5, 800, 2000),
        "s": (15, 250, 5000),
    }
    assert cfg.engine.prefill_tokens_per_s == 150
    assert (cfg.orchestrator.save_queue_chunks, cfg.orchestrator.default_budget_ms) == (256, 2000)
    assert (cfg.orchestrator.breaker.failures, cfg.orchestrator.breaker.cooldown_s) == (3, 10)
    assert (cfg.reuse.half_life_s, cfg.reuse.sketch_width, cfg.reuse.sketch_depth) == (
        600,
        65536,
        4,
    )
    # no policy section: read and write every tier, in file order
    assert cfg.policy.default == Route(
        name="default", read=("m", "d", "r", "s"), write=("m", "d", "r", "s")
    )
    assert cfg.policy.rules == ()


class _TapeSettings(TierSettings):
    pass


@register
class _TapeTier(Tier):
    kind = "tape-for-tests"
    settings_class = _TapeSettings


def test_unknown_kind_defaults_for_registered_plugins() -> None:
    tape = parse_config("version: 1\ntiers: {t: {kind: tape-for-tests}}\n").tiers["t"]
    assert (tape.cost.latency_ms, tape.cost.bandwidth_mbps, tape.timeout_ms) == (5, 200, 5000)


def test_empty_sections_mean_defaults_and_x_keys_hold_anchors() -> None:
    cfg = parse_config(
        "version: 1\nx-tier: &t {kind: memory, eviction: lru}\n"
        "tiers: {a: *t, b: {<<: *t, capacity_bytes: 1KiB}}\nengine:\nreuse:\npolicy:\n"
    )
    assert cfg.tiers["a"].settings.eviction == cfg.tiers["b"].settings.eviction == "lru"
    assert cfg.tiers["b"].settings.capacity_bytes == 1024
    assert cfg.engine.prefill_tokens_per_s == 150


def test_config_is_frozen() -> None:
    cfg = parse_config(HEAD)
    with pytest.raises(ValidationError):
        cfg.chunk_tokens = 512  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.tiers["x"] = cfg.tiers["dram"]  # type: ignore[index]
    with pytest.raises(ValidationError):
        cfg.tiers["dram"].timeout_ms = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.policy.default.admission["x"] = 1  # type: ignore[index]


def test_environment_overrides_tier_settings(monkeypatch) -> None:
    monkeypatch.setenv("KVSTRATA_MEMORY_CAPACITY_BYTES", "12345")
    assert parse_config(HEAD).tiers["dram"].settings.capacity_bytes == 12345


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0),
        ("1024", 1024),
        ("1B", 1),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("2 MB", 2_000_000),
        ("1MiB", 1 << 20),
        ("4GiB", 4 << 30),
        ("4gib", 4 << 30),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("2TiB", 2 << 40),
        ("1.5KiB", 1536),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "strata.yaml"
    path.write_text(HEAD)
    assert load_config(path).path == path
    path.write_text(HEAD + "chunk_tokens: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:5: chunk_tokens: must be a positive multiple of 16 (got 7)"
    assert err.value.source == str(path) and err.value.problems[0].line == 5


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^.*missing\.yaml: cannot read: No such file or directory$"
    ):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(
        ConfigError,
        match=r"latin1\.yaml:2: not UTF-8 text \(byte 0xe9 at column 6\); "
        r"save the file as UTF-8$",
    ):
        load_config(tmp_path / "latin1.yaml")


# -- presets and examples ---------------------------------------------------------------


def test_default_config_is_embedded_and_needs_no_servers() -> None:
    cfg = default_config()
    assert isinstance(cfg, StrataConfig)
    assert {t.kind for t in cfg.tiers.values()} == {"memory", "disk"}
    assert cfg.policy.default.read == ("dram", "local")


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_examples_and_presets_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.tiers and cfg.policy.default.read


def test_the_four_presets_exist() -> None:
    names = {p.stem for p in (ROOT / "examples/policies").glob("*.yaml")}
    assert {"short-chat", "long-rag", "cost-bound-long", "static-corpus"} <= names


@pytest.mark.parametrize(
    "preset, request_, rule",
    [
        ("short-chat", RequestContext(context_tokens=1500), "chat"),
        ("short-chat", RequestContext(context_tokens=50000), "default"),
        ("long-rag", RequestContext(context_tokens=20000, reuse=0.8), "long-shared"),
        (
            "long-rag",
            RequestContext(context_tokens=20000, reuse=0.8, tags=frozenset({"rag"})),
            "rag-tagged",
        ),
        ("long-rag", RequestContext(context_tokens=20000, reuse=0.1), "default"),
        ("long-rag", RequestContext(context_tokens=2000), "short"),
        ("cost-bound-long", RequestContext(context_tokens=65536, reuse=0.1), "long-low-reuse"),
        ("cost-bound-long", RequestContext(context_tokens=65536, reuse=0.9), "long-reused"),
        (
            "cost-bound-long",
            RequestContext(context_tokens=65536, reuse=0.1, budget_ms=150),
            "tight-budget",
        ),
        (
            "static-corpus",
            RequestContext(context_tokens=30000, tags=frozenset({"corpus"})),
            "corpus",
        ),
        ("static-corpus", RequestContext(tags=frozenset({"corpus", "precompute"})), "precompute"),
        ("static-corpus", RequestContext(context_tokens=30000), "default"),
    ],
)
def test_presets_route_as_the_design_table_says(
    preset: str, request_: RequestContext, rule: str
) -> None:
    cfg = load_config(ROOT / "examples/policies" / f"{preset}.yaml")
    assert cfg.policy.decide(request_).rule == rule


def test_preset_routes() -> None:
    def route(preset: str, rule: str) -> Route:
        return load_config(ROOT / "examples/policies" / f"{preset}.yaml").policy.rule(rule).route

    assert route("short-chat", "chat").read == ("dram",)
    assert route("long-rag", "long-shared").write == ("dram", "shared")
    cold = route("cost-bound-long", "long-low-reuse")
    assert (cold.retrieval, dict(cold.admission)) == ("layerwise", {"cold": 2})
    assert route("static-corpus", "corpus").read == ("dram", "corpus")


# -- every error, exactly ----------------------------------------------------------------

ERRORS = {
    # YAML
    "syntax": (
        "version: 1\ntiers: [dram\n",
        "strata.yaml:3: invalid YAML: expected ',' or ']', but got "
        "'<stream end>' (column 1); while parsing a flow sequence at line 2",
    ),
    "tab": (
        "version: 1\n\tchunk_tokens: 16\n",
        "strata.yaml:2: invalid YAML: found character '\\t' that cannot start any token (column 1)",
    ),
    "mapping in a scalar": (
        "version: 1\ntiers: a: b\n",
        "strata.yaml:2: invalid YAML: mapping values are not allowed here (column 9)",
    ),
    "control character": (
        "version: 1\nx: \x07\n",
        "strata.yaml:2: invalid YAML: special characters are not allowed",
    ),
    "two documents": (
        "version: 1\n---\nversion: 1\n",
        "strata.yaml:2: invalid YAML: but found another document "
        "(column 1); expected a single document in the stream at line 1",
    ),
    "duplicate key": (
        HEAD + "  dram: {kind: disk}\n",
        "strata.yaml:5: tiers.dram: duplicate key 'dram' (first at line 3)",
    ),
    "duplicate key in flow": (
        one_tier("{kind: memory, kind: disk}"),
        "strata.yaml:3: tiers.t.kind: duplicate key 'kind' (first at line 3)",
    ),
    "object tag": (
        "version: 1\ntiers: !!python/object:os.system {}\n",
        "strata.yaml:2: invalid YAML: unsupported tag "
        "'tag:yaml.org,2002:python/object:os.system' (column 8)",
    ),
    "scalar tag": (
        "version: 1\nchunk_tokens: !!python/name:os.system ''\n",
        "strata.yaml:2: invalid YAML: could not "
        "determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system' (column 15)",
    ),
    "empty": (
        "",
        "strata.yaml:1: expected a mapping of sections (version, tiers, ...), found nothing",
    ),
    "comments only": (
        "# nothing yet\n",
        "strata.yaml:1: expected a mapping of sections (version, tiers, ...), found nothing",
    ),
    "a list": (
        "- version: 1\n",
        "strata.yaml:1: expected a mapping of sections (version, tiers, ...), found a list",
    ),
    # top level
    "unknown section, close": (
        HEAD + "polcy: {}\n",
        "strata.yaml:5: polcy: unknown key 'polcy' (did you mean 'policy'?)",
    ),
    "unknown section, far": (
        HEAD + "servers: {}\n",
        "strata.yaml:5: servers: unknown key 'servers' (valid: version, "
        "chunk_tokens, tiers, engine, orchestrator, reuse, telemetry, bandwidth, policy, codecs, "
        "documents, auth)",
    ),
    "no version": (
        "tiers:\n  dram: {kind: memory}\n",
        "strata.yaml:1: version: required key missing",
    ),
    "version 2": (
        "version: 2\ntiers: {dram: {kind: memory}}\n",
        "strata.yaml:1: version: unsupported version 2 (this kvstrata reads version 1)",
    ),
    "version type": (
        "version: one\ntiers: {dram: {kind: memory}}\n",
        "strata.yaml:1: version: input should be a valid "
        "integer, unable to parse string as an integer (got 'one')",
    ),
    "chunk not a multiple": (
        HEAD + "chunk_tokens: 100\n",
        "strata.yaml:5: chunk_tokens: must be a positive multiple of 16 (got 100)",
    ),
    "chunk zero": (
        HEAD + "chunk_tokens: 0\n",
        "strata.yaml:5: chunk_tokens: input should be greater than 0 (got 0)",
    ),
    # tiers
    "no tiers": ("version: 1\n", "strata.yaml:1: tiers: required key missing"),
    "empty tiers": ("version: 1\ntiers: {}\n", "strata.yaml:2: tiers: define at least one tier"),
    "tiers a list": (
        "version: 1\ntiers: [dram]\n",
        "strata.yaml:2: tiers: input should be a valid dictionary",
    ),
    "tier a string": (
        one_tier("memory"),
        "strata.yaml:3: tiers.t: input should be a valid dictionary (got 'memory')",
    ),
    "tier name": (
        "version: 1\ntiers:\n  my tier: {kind: memory}\n",
        "strata.yaml:3: tiers.my tier: invalid tier name: use letters, digits, '_', '.' and '-'",
    ),
    "no kind": (
        one_tier("{capacity_bytes: 1}"),
        "strata.yaml:3: tiers.t.kind: required key missing",
    ),
    "unknown kind": (
        one_tier("{kind: tape}"),
        "strata.yaml:3: tiers.t.kind: unknown tier kind 'tape' (known: disk, lmcache, memory, "
        "redis, s3)",
    ),
    "kind not a string": (
        one_tier("{kind: [memory]}"),
        "strata.yaml:3: tiers.t.kind: input should be a valid string (got ['memory'])",
    ),
    "unknown setting, close": (
        one_tier("{kind: memory, evicton: lru}"),
        "strata.yaml:3: tiers.t.evicton: unknown key 'evicton' (did you mean 'eviction'?)",
    ),
    "unknown setting, far": (
        one_tier("{kind: memory, color: red}"),
        "strata.yaml:3: tiers.t.color: unknown key "
        "'color' (valid: kind, cost, timeout_ms, capacity_bytes, eviction)",
    ),
    "setting choice": (
        one_tier("{kind: memory, eviction: lfu}"),
        "strata.yaml:3: tiers.t.eviction: input should be 'lru' or 's3fifo' (got 'lfu')",
    ),
    "setting type": (
        one_tier("{kind: s3, max_retries: many}"),
        "strata.yaml:3: tiers.t.max_retries: input should be "
        "a valid integer, unable to parse string as an integer (got 'many')",
    ),
    "size unit": (
        one_tier("{kind: memory, capacity_bytes: 4GiBB}"),
        "strata.yaml:3: tiers.t.capacity_bytes: invalid "
        "size '4GiBB': use bytes or a number with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)",
    ),
    "size negative": (
        one_tier("{kind: memory, capacity_bytes: -1}"),
        "strata.yaml:3: tiers.t.capacity_bytes: input should be greater than 0 (got -1)",
    ),
    "cost key": (
        one_tier("{kind: memory, cost: {bandwith_mbps: 3}}"),
        "strata.yaml:3: tiers.t.cost.bandwith_mbps: unknown key 'bandwith_mbps' (did you mean "
        "'bandwidth_mbps'?)",
    ),
    "cost range": (
        "version: 1\ntiers:\n  t:\n    kind: disk\n    cost:\n      latency_ms: 0\n",
        "strata.yaml:6: tiers.t.cost.latency_ms: input should be greater than 0 (got 0)",
    ),
    "cost type": (
        one_tier("{kind: memory, cost: fast}"),
        "strata.yaml:3: tiers.t.cost: must be a mapping like "
        "{latency_ms: 0.5, bandwidth_mbps: 800} (got 'fast')",
    ),
    "timeout": (
        one_tier("{kind: memory, timeout_ms: -3}"),
        "strata.yaml:3: tiers.t.timeout_ms: input should be greater than 0 (got -3)",
    ),
    "secret type": (
        one_tier("{kind: redis, url: [redis://:hunter2@h]}"),
        "strata.yaml:3: tiers.t.url: input should be a valid string",
    ),
    # other sections
    "engine": (
        HEAD + "engine: {prefill_tokens_per_s: -1}\n",
        "strata.yaml:5: engine.prefill_tokens_per_s: input should be greater than 0 (got -1)",
    ),
    "breaker": (
        HEAD + "orchestrator:\n  breaker: {failures: 0}\n",
        "strata.yaml:6: orchestrator.breaker.failures: input should be greater than or equal to 1 "
        "(got 0)",
    ),
    "breaker key": (
        HEAD + "orchestrator:\n  breaker: {failure: 2}\n",
        "strata.yaml:6: orchestrator.breaker.failure: "
        "unknown key 'failure' (did you mean 'failures'?)",
    ),
    "budget": (
        HEAD + "orchestrator: {default_budget_ms: 0}\n",
        "strata.yaml:5: orchestrator.default_budget_ms: input should be greater than 0 (got 0)",
    ),
    "queue": (
        HEAD + "orchestrator: {save_queue_chunks: 2.5}\n",
        "strata.yaml:5: orchestrator.save_queue_chunks: "
        "input should be a valid integer, got a number with a fractional part (got 2.5)",
    ),
    "sketch depth": (
        HEAD + "reuse: {sketch_depth: 9}\n",
        "strata.yaml:5: reuse.sketch_depth: input should be less than or equal to 8 (got 9)",
    ),
    # policy shape
    "policy key": (
        POLICY + "  defualt: {read: [dram]}\n",
        "strata.yaml:6: policy.defualt: unknown key 'defualt' (did you mean 'default'?)",
    ),
    "rules not a list": (
        POLICY + "  rules: {a: 1}\n",
        "strata.yaml:6: policy.rules: input should be a valid list",
    ),
    "rule without route": (
        rules("- name: a"),
        "strata.yaml:7: policy.rules[0].route: required key missing",
    ),
    "rule without name": (
        rules("- route: {read: [dram]}"),
        "strata.yaml:7: policy.rules[0].name: required key missing",
    ),
    "rule empty name": (
        rules("- {name: '', route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].name: string should have at least 1 character (got '')",
    ),
    "rule key": (
        rules("- {name: a, prio: 1, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].prio: unknown key 'prio' (did you mean 'priority'?)",
    ),
    "priority type": (
        rules("- {name: a, priority: high, route: {read: [dram]}}"),
        "strata.yaml:7: "
        "policy.rules[0].priority: input should be a valid integer, unable to parse string as an "
        "integer (got 'high')",
    ),
    # match shape
    "match key": (
        rules("- name: a", "  match: {tenants: [x]}", "  route: {read: [dram]}"),
        "strata.yaml:8: policy.rules[0].match.tenants: unknown key 'tenants' (did you mean "
        "'tenant'?)",
    ),
    "range key": (
        rules("- {name: a, match: {context_tokens: {minimum: 1}}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.context_tokens.minimum: unknown key 'minimum' "
        "(did you mean 'min'?)",
    ),
    "range without bounds": (
        rules("- {name: a, match: {budget_ms: {}}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.budget_ms: give min, max or both",
    ),
    "empty range": (
        rules("- {name: a, match: {context_tokens: {min: 10, max: 5}}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.context_tokens: empty range: min 10 >= max 5",
    ),
    "reuse above 1": (
        rules("- {name: a, match: {reuse: {min: 1.5}}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.reuse.min: input should be less than or equal to 1 "
        "(got 1.5)",
    ),
    "negative bound": (
        rules("- {name: a, match: {budget_ms: {min: -1}}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.budget_ms.min: input should be greater than or equal "
        "to 0 (got -1)",
    ),
    "fractional tokens": (
        rules("- {name: a, match: {context_tokens: {min: 1.5}}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.context_tokens.min: input should be a valid integer, "
        "got a number with a fractional part (got 1.5)",
    ),
    "empty tenant list": (
        rules("- {name: a, match: {tenant: []}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.tenant: an empty list matches nothing; leave the "
        "key out to match any value",
    ),
    "tenant type": (
        rules("- {name: a, match: {tenant: [7]}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].match.tenant[0]: input should be a valid string (got 7)",
    ),
    "hint type": (
        rules("- name: a", "  match:", "    hints: {priority: 1}", "  route: {read: [dram]}"),
        "strata.yaml:9: policy.rules[0].match.hints.priority: input should be a valid string (got "
        "1)",
    ),
    # route shape
    "read not a list": (
        POLICY + "  default: {read: dram}\n",
        "strata.yaml:6: policy.default.read: input should be a valid list (got 'dram')",
    ),
    "retrieval": (
        POLICY + "  default: {read: [dram], retrieval: layers}\n",
        "strata.yaml:6: policy.default.retrieval: input should be 'layerwise' or 'whole' (got "
        "'layers')",
    ),
    "load": (
        POLICY + "  default: {read: [dram], load: maybe}\n",
        "strata.yaml:6: policy.default.load: input should be 'cost', 'always' or 'never' (got "
        "'maybe')",
    ),
    "admission zero": (
        POLICY + "  default: {write: [dram], admission: {dram: 0}}\n",
        "strata.yaml:6: policy.default.admission.dram: input should be greater than or equal to 1 "
        "(got 0)",
    ),
    "route key": (
        POLICY + "  default: {reads: [dram]}\n",
        "strata.yaml:6: policy.default.reads: unknown key 'reads' (did you mean 'read'?)",
    ),
    # route meaning
    "unknown read tier": (
        rules("- name: a", "  route:", "    read: [shraed]"),
        "strata.yaml:9: policy.rules[0].route.read[0]: unknown tier 'shraed' (defined: dram, "
        "local)",
    ),
    "unknown write tier": (
        POLICY + "  default:\n    write:\n      - dram\n      - s3\n",
        "strata.yaml:9: policy.default.write[1]: unknown tier 's3' (defined: dram, local)",
    ),
    "unknown admission tier": (
        POLICY + "  default: {write: [dram], admission: {cold: 2}}\n",
        "strata.yaml:6: policy.default.admission.cold: unknown tier 'cold' (defined: dram, local)",
    ),
    "unknown codec tier": (
        POLICY + "  default: {write: [dram], codec: {cold: int8}}\n",
        "strata.yaml:6: policy.default.codec.cold: unknown tier 'cold' (defined: dram, local)",
    ),
    "unknown documents tier": (
        HEAD + "documents:\n  tiers: [dram, cold]\n",
        "strata.yaml:6: documents.tiers[1]: unknown tier 'cold' (defined: dram, local)",
    ),
    "unknown ttl tier": (
        POLICY + "  default: {write: [dram], ttl_s: {cold: 60}}\n",
        "strata.yaml:6: policy.default.ttl_s.cold: unknown tier 'cold' (defined: dram, local)",
    ),
    "unknown demote source": (
        POLICY + "  default: {write: [dram], demote: {cold: dram}}\n",
        "strata.yaml:6: policy.default.demote.cold: unknown tier 'cold' (defined: dram, local)",
    ),
    "unknown demote target": (
        POLICY + "  default: {write: [dram], demote: {dram: cold}}\n",
        "strata.yaml:6: policy.default.demote.dram: unknown tier 'cold' (defined: dram, local)",
    ),
    "listed twice": (
        POLICY + "  default: {read: [dram, local, dram]}\n",
        "strata.yaml:6: policy.default.read[2]: tier 'dram' is listed twice",
    ),
    "nowhere": (
        POLICY + "  default: {read: [], write: []}\n",
        "strata.yaml:6: policy.default: the route reads from no tier and writes to no tier",
    ),
    "nowhere by omission": (
        rules("- {name: a, route: {promote: false}}"),
        "strata.yaml:7: policy.rules[0].route: the route reads from no tier and writes to no tier",
    ),
    "admission without write": (
        POLICY + "  default: {read: [local], write: [dram], admission: {local: 2}}\n",
        "strata.yaml:6: policy.default.admission.local: tier 'local' is not in this route's "
        "write list",
    ),
    "ttl without write": (
        POLICY + "  default: {read: [local], write: [dram], ttl_s: {local: 2}}\n",
        "strata.yaml:6: policy.default.ttl_s.local: tier 'local' is not in this route's write list",
    ),
    "ttl without TTL": (
        POLICY + "  default: {write: [dram], ttl_s: {dram: 60}}\n",
        "strata.yaml:6: policy.default.ttl_s.dram: tier 'dram' (kind memory) has no TTL",
    ),
    "ttl on s3": (  # S3 has no per-object expiry on PUT: refused, not ignored
        "version: 1\ntiers:\n  cold: {kind: s3}\npolicy:\n"
        "  default: {write: [cold], ttl_s: {cold: 60}}\n",
        "strata.yaml:5: policy.default.ttl_s.cold: tier 'cold' (kind s3) has no TTL",
    ),
    "codec unused": (
        POLICY + "  default: {write: [dram], codec: {local: int8}}\n",
        "strata.yaml:6: policy.default.codec.local: tier 'local' is neither read nor written by "
        "this route",
    ),
    "demote to itself": (
        POLICY + "  default: {write: [dram], demote: {dram: dram}}\n",
        "strata.yaml:6: policy.default.demote.dram: tier 'dram' cannot demote to itself",
    ),
    "demote across codecs": (
        POLICY + "  default: {write: [dram, local], codec: {dram: int8}, demote: {dram: local}}\n",
        "strata.yaml:6: policy.default.demote.dram: demoting 'dram' to 'local' moves objects as "
        "they are, so both need the same codec (got 'int8' and 'none')",
    ),
    # rules meaning
    "duplicate rule": (
        rules(
            "- {name: a, match: {tenant: x}, route: {read: [dram]}}",
            "- {name: a, match: {tenant: y}, route: {read: [dram]}}",
        ),
        "strata.yaml:8: policy.rules[1].name: duplicate rule name 'a' (first at line 7)",
    ),
    "reserved name": (
        rules("- {name: default, match: {tenant: x}, route: {read: [dram]}}"),
        "strata.yaml:7: policy.rules[0].name: the name 'default' is reserved for policy.default",
    ),
    "overlap": (
        rules(
            "- {name: long, match: {context_tokens: {min: 8192}}, route: {read: [dram]}}",
            "- {name: rag, match: {tags: rag}, route: {read: [local]}}",
        ),
        "strata.yaml:8: policy.rules[1]: rule 'rag' overlaps rule 'long' (line 7): same "
        "specificity (1) and priority (0); raise one rule's priority or make their matches "
        "disjoint",
    ),
    "unreachable: more specific": (
        rules(
            "- {name: eu, match: {tenant: [acme]}, route: {read: [dram]}}",
            "- {name: all, match: {tenant: [acme, globex], reuse: {min: 0}}, route: {read: "
            "[local]}}",
        ),
        "strata.yaml:7: policy.rules[0]: rule 'eu' can never win: every request it matches also "
        "matches rule 'all' (line 8), which is more specific (2 > 1)",
    ),
    "unreachable: priority": (
        rules(
            "- name: rag-eu",
            "  match: {tags: [rag, eu]}",
            "  route: {read: [dram]}",
            "- name: rag",
            "  priority: 1",
            "  match: {tags: [rag]}",
            "  route: {read: [local]}",
        ),
        "strata.yaml:7: policy.rules[0]: rule 'rag-eu' can never win: every request it matches "
        "also matches rule 'rag' (line 10), which has the same specificity (1) and a higher "
        "priority (1 > 0)",
    ),
    # several problems at once: all of the pass, by line
    "several": (
        "version: 1\nchunk_tokens: 7\ntiers:\n  t: {kind: memory, eviction: x}\n"
        "engine: {prefill_tokens_per_s: 0}\n",
        "strata.yaml:2: chunk_tokens: must be a positive multiple of 16 (got 7)\n"
        "strata.yaml:4: tiers.t.eviction: input should be 'lru' or 's3fifo' (got 'x')\n"
        "strata.yaml:5: engine.prefill_tokens_per_s: input should be greater than 0 (got 0)",
    ),
}


@pytest.mark.parametrize("text, message", ERRORS.values(), ids=ERRORS.keys())
def test_error_messages(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "strata.yaml")
    assert str(err.value) == message


def test_alias_bombs_stop_early() -> None:
    levels = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    with pytest.raises(
        ConfigError,
        match=r"^strata\.yaml:\d+: invalid YAML: the document expands to over "
        r"100000 values \(column \d+\)$",
    ):
        parse_config("version: 1\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + levels, "strata.yaml")


def test_errors_are_value_errors_with_structured_problems() -> None:
    with pytest.raises(ValueError) as err:
        parse_config(HEAD + "chunk_tokens: 7\n")
    problem = err.value.problems[0]  # type: ignore[attr-defined]
    assert (problem.line, problem.path) == (5, "chunk_tokens")
    assert str(err.value).startswith("<string>:5: ")


def test_setting_from_the_environment_is_named(monkeypatch) -> None:
    monkeypatch.setenv("KVSTRATA_MEMORY_EVICTION", "fifo")
    with pytest.raises(ConfigError) as err:
        parse_config(HEAD, "strata.yaml")
    assert str(err.value) == (
        "strata.yaml:3: tiers.dram.eviction: input should be 'lru' or 's3fifo' (got 'fifo') "
        "(from environment variable KVSTRATA_MEMORY_EVICTION)"
    )


SECRET = "hunter2-very-secret"


@pytest.mark.parametrize(
    "tier",
    [
        f"{{kind: redis, url: [redis://:{SECRET}@h]}}",
        f"{{kind: redis, url: 'redis://:{SECRET}@h', max_connections: 'redis://:{SECRET}@h'}}",
        f"{{kind: s3, secret_access_key: {{k: {SECRET}}}}}",
        f"{{kind: s3, secret_access_key: {SECRET}, bukket: x}}",
        f"{{kind: s3, secret_acces_key: {SECRET}}}",
    ],
)
def test_secrets_never_appear_in_errors(tier: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(one_tier(tier), "strata.yaml")
    assert SECRET not in str(err.value)
    assert str(err.value).startswith("strata.yaml:3: tiers.t.")


def test_yaml_errors_do_not_quote_the_source() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            f"version: 1\ntiers:\n  t: {{kind: redis, url: redis://:{SECRET}@h: x}}\n",
            "strata.yaml",
        )
    assert SECRET not in str(err.value) and str(err.value).startswith(
        "strata.yaml:3: invalid YAML: "
    )


# -- the command line ------------------------------------------------------------------

runner = CliRunner()


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "strata.yaml"
    path.write_text(text)
    return str(path)


def test_check_ok(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["check", write(tmp_path, FULL)])
    assert result.exit_code == 0 and result.stdout == "ok: 4 tiers, 1 rules\n"


def test_check_several_files() -> None:
    files = [str(p) for p in EXAMPLES]
    result = runner.invoke(policy_app, ["check", *files])
    assert result.exit_code == 0, result.output
    assert result.stdout.count(": ok: ") == len(files)


def test_check_reports_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY + "  default: {read: [shraed]}\n")
    result = runner.invoke(policy_app, ["check", path])
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"{path}:6: policy.default.read[0]: unknown tier 'shraed' (defined: dram, local)\n"
    )


def test_explain_prints_rule_route_why_and_costs(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    result = runner.invoke(
        policy_app,
        [
            "explain",
            path,
            "--context-tokens",
            "9000",
            "--reuse",
            "0.7",
            "--budget-ms",
            "300",
            "--tenant",
            "acme",
            "--model",
            "smollm2-135m",
            "--tag",
            "rag",
            "--hint",
            "tier_hint=fast",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "rule: long-rag" in out and "dram, shared" in out and "layerwise" in out
    assert "rule 'long-rag' matched (specificity 7, priority 3)" in out
    assert "hint tier_hint = 'fast'" in out
    assert "cost model" in out  # the cost model's rows, or the note saying why they are missing


def test_explain_default_route_lists_near_misses(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["explain", write(tmp_path, FULL), "--context-tokens", "10"])
    assert result.exit_code == 0, result.output
    assert "no rule matched: default route" in result.stdout
    assert "rule 'long-rag' did not match: context_tokens 10 < min 8192" in result.stdout


def test_explain_prints_the_cost_model_rows(tmp_path: Path) -> None:
    result = runner.invoke(
        policy_app, ["explain", write(tmp_path, HEAD), "--context-tokens", "512"]
    )
    assert result.exit_code == 0, result.output
    assert "recompute all" in result.stdout and "full hit (2 chunks)" in result.stdout


def test_explain_rejects_a_bad_hint(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["explain", write(tmp_path, HEAD), "--hint", "novalue"])
    assert result.exit_code == 2
    assert "expected key=value, got 'novalue'" in result.output


def test_explain_invalid_file_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["explain", write(tmp_path, "version: 3\n")])
    assert result.exit_code == 1
    assert "version: unsupported version 3" in result.stderr
