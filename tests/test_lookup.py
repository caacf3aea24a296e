"""The routing hint (kvstrata.lookup): per-tier prefix tokens and load estimates, in process,
over the exporter's /lookup and through ``kvstrata lookup``; it matches the plan a request gets.

Tiers: DRAM and a shared Redis Cluster (the session's real one)."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from typer.testing import CliRunner

from kvstrata import lookup as lk
from kvstrata.cli.main import app
from kvstrata.config import TelemetryConfig, parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from kvstrata.telemetry import exporter

CHUNK = 32
MODEL = ModelSpec("tiny-lookup-model", n_layers=4, kv_heads=2, head_dim=16, dtype="float32")
N_CHUNKS = 6


def config_text(cluster_url: str, prefix: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          dram: {{kind: memory, capacity_bytes: 64MiB}}
          shared: {{kind: redis, url: "{cluster_url}", key_prefix: "{prefix}", timeout_ms: 10000}}
        engine: {{prefill_tokens_per_s: 1.0}}
        orchestrator: {{default_budget_ms: 60000}}
        policy:
          default: {{read: [dram, shared], write: [dram, shared]}}
        """)


@pytest.fixture
def setup(redis_cluster, tmp_path):
    """A shared orchestrator whose DRAM holds 2 chunks of a prompt and the cluster all 6."""
    path = tmp_path / "strata.yaml"
    path.write_text(config_text(redis_cluster.url, f"lookup-{time.time_ns()}:"))
    cfg = parse_config(path.read_text())
    orch = Orchestrator.shared(cfg, MODEL)
    tokens = [
        int(t) for t in np.random.default_rng(7).integers(0, 30000, size=N_CHUNKS * CHUNK + 5)
    ]
    plan = orch.lookup(tokens, RequestContext())
    rng = np.random.default_rng(0)
    for i in range(N_CHUNKS):
        kv = rng.standard_normal(
            (MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim), dtype=np.float32
        )
        assert orch.save(plan, i, kv, tiers=("dram", "shared") if i < 2 else ("shared",))
    assert orch.flush(30)
    yield orch, tokens, path
    orch.close()


def test_lookup_reports_each_tier_and_the_plan_a_request_gets(setup) -> None:
    orch, tokens, _ = setup
    keys = orch.lookup(tokens, RequestContext()).logical_keys()  # as a request would see them
    seen = orch.reuse.count(keys[0])
    report = lk.lookup(orch, tokens)
    assert orch.reuse.count(keys[0]) == seen  # a probe observes nothing
    assert [(t.tier, t.tokens) for t in report.tiers] == [
        ("dram", 2 * CHUNK),
        ("shared", N_CHUNKS * CHUNK),
    ]
    assert all(t.load_s > 0 and t.recompute_s == t.tokens / 1.0 for t in report.tiers)
    assert report.plan_tokens == {"dram": 2 * CHUNK, "shared": (N_CHUNKS - 2) * CHUNK}
    plan = orch.lookup(tokens, RequestContext(), limit_tokens=len(tokens) - 1)
    assert plan.tokens_by_tier() == report.plan_tokens
    assert (
        plan.choice.chunks == N_CHUNKS and report.plan_load_s > 0
    )  # (each contains teaches latency)
    other = lk.lookup(orch, tokens, lk.context(cache_salt="another-tenant"))  # keys are per tenant
    assert [t.tokens for t in other.tiers] == [0, 0] and other.plan_tokens == {}


def test_lookup_over_the_exporter_and_the_cli(setup, tmp_path) -> None:
    orch, tokens, path = setup
    service = exporter.serve(orch.telemetry, TelemetryConfig(prometheus_port=0), "scheduler")
    try:
        base = service.url.removesuffix("/metrics")
        expected = lk.lookup(orch, tokens).to_dict()["tiers"]
        with urllib.request.urlopen(
            f"{base}/lookup?tokens={','.join(map(str, tokens))}", timeout=30
        ) as r:
            got = json.loads(r.read())
        assert [(t["tier"], t["tokens"]) for t in got["tiers"]] == [
            (t["tier"], t["tokens"]) for t in expected
        ]
        assert got["plan"]["tokens"] == {"dram": 2 * CHUNK, "shared": (N_CHUNKS - 2) * CHUNK}
        body = json.dumps({"tokens": tokens, "cache_salt": "another-tenant"}).encode()
        with urllib.request.urlopen(
            urllib.request.Request(f"{base}/lookup", data=body), timeout=30
        ) as r:
            assert json.loads(r.read())["plan"]["tokens"] == {}
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(f"{base}/lookup?tokens=1,x", timeout=30)
        assert bad.value.code == 400
        with urllib.request.urlopen(service.url, timeout=30) as r:  # /metrics is still served
            assert b"kvstrata_" in r.read()

        runner = CliRunner()
        ids = ",".join(map(str, tokens))
        via_url = runner.invoke(app, ["lookup", "--url", base, "--tokens", ids, "--json"])
        assert via_url.exit_code == 0, via_url.output
        assert json.loads(via_url.output)["plan"]["tokens"] == got["plan"]["tokens"]
        # from another process's view: its own (empty) DRAM, the same shared cluster
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(
            json.dumps(
                {
                    "num_hidden_layers": MODEL.n_layers,
                    "num_attention_heads": 4,
                    "num_key_value_heads": MODEL.kv_heads,
                    "hidden_size": 4 * MODEL.head_dim,
                }
            )
        )
        local = runner.invoke(
            app,
            [
                "lookup",
                "--config",
                str(path),
                "--model",
                str(model),
                "--model-id",
                MODEL.name,
                "--tokens",
                ids,
                "--json",
            ],
        )
        assert local.exit_code == 0, local.output
        report = json.loads(local.output)
        assert [(t["tier"], t["tokens"]) for t in report["tiers"]] == [
            ("dram", 0),
            ("shared", N_CHUNKS * CHUNK),
        ]
        assert report["plan"]["tokens"] == {"shared": N_CHUNKS * CHUNK}
        table = runner.invoke(app, ["lookup", "--url", base, "--tokens", ids])
        assert table.exit_code == 0 and "shared" in table.output and "dram" in table.output
    finally:
        exporter.stop(orch.telemetry)
