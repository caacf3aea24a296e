"""kvstrata's families through vLLM's metrics path,
without an engine: outbox -> stats -> Prometheus.

Real prometheus_client metrics in a private registry stand in for vLLM's
front end; the orchestrator and its tiers are real. And the Grafana
dashboard may only name metrics that exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

pytest.importorskip("vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)")

from kvstrata.config import parse_config  # noqa: E402
from kvstrata.connectors.vllm_metrics import StrataPromMetrics, StrataStats, tokens_by_source  # noqa: E402
from kvstrata.model import ModelSpec  # noqa: E402
from kvstrata.orchestrator import Orchestrator  # noqa: E402
from kvstrata.policy.route import RequestContext  # noqa: E402
from kvstrata.telemetry.metrics import FAMILIES  # noqa: E402

MODEL = ModelSpec("metrics-test-model", n_layers=2, kv_heads=2, head_dim=8, dtype="float32")
GRAFANA = Path(__file__).parent.parent / "examples" / "grafana" / "kvstrata.json"


def _registry_types(registry: CollectorRegistry) -> dict:
    def bound(cls):
        return type(
            cls.__name__,
            (cls,),
            {
                "__init__": lambda self, *a, **kw: cls.__init__(
                    self,
                    *a,
                    registry=registry,
                    **{k: v for k, v in kw.items() if k != "multiprocess_mode"},
                )
            },
        )

    return {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}


class _Config:  # what KVConnectorPromMetrics reads of vLLM's configuration
    kv_transfer_config = None


def _samples(registry: CollectorRegistry, drop: tuple[str, ...] = ()) -> dict:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in drop))): s.value
        for f in registry.collect()
        for s in f.samples
        if not s.name.endswith("_created")
    }


def test_every_change_reaches_vllms_registry_once(tmp_path) -> None:
    config = parse_config(f"""
version: 1
chunk_tokens: 16
tiers:
  dram: {{kind: memory, capacity_bytes: 1MiB}}
  local: {{kind: disk, path: "{tmp_path / "kv"}"}}
policy:
  default: {{read: [dram, local], write: [dram, local], load: always}}
""")
    orch = Orchestrator(config, MODEL)
    try:
        orch.telemetry.forward()
        tokens = np.arange(40)
        plan = orch.lookup(tokens, RequestContext(context_tokens=40))
        kv = np.ones((MODEL.n_layers, 2, 16, MODEL.kv_heads, MODEL.head_dim), np.float32)
        for i in range(2):
            orch.save(plan, i, kv)
        assert orch.flush(30)
        hit = orch.lookup(tokens, RequestContext(context_tokens=40))
        assert orch.load(hit).wait_all(30)
        orch.telemetry.request("dram")
        # two processes' drains (here: the same one split in two) aggregate as vLLM does
        first = StrataStats(
            data={"reads": [], "load_error_blocks": 0, "telemetry": orch.telemetry.drain()}
        )
        assert orch.telemetry.drain() is None  # drained once
        orch.telemetry.breaker("local", True)
        second = StrataStats(
            data={"reads": [], "load_error_blocks": 1, "telemetry": orch.telemetry.drain()}
        )
        data = json.loads(
            json.dumps(first.aggregate(second).data)
        )  # plain data: survives any encoding

        registry = CollectorRegistry()
        prom = StrataPromMetrics(
            _Config(), _registry_types(registry), ["model_name", "engine"], {0: ["m", "0"]}
        )
        prom.observe(data, engine_idx=0)
        ours = _samples(orch.telemetry.registry)
        theirs = _samples(registry, drop=("model_name", "engine"))
        assert {k: v for k, v in theirs.items() if v} == {k: v for k, v in ours.items() if v}
        assert theirs[("kvstrata_tokens_total", (("source", "dram"),))] == 32
        assert theirs[("kvstrata_requests_total", (("source", "dram"),))] == 1
        assert tokens_by_source(data["telemetry"])["recompute"] == 40 + 8
        assert {s.labels["engine"] for f in registry.collect() for s in f.samples} == {"0"}
    finally:
        orch.close()


def test_the_grafana_dashboard_names_only_exported_metrics() -> None:
    exported = set()
    for f in FAMILIES:
        exported |= (
            {f"{f.name}_total"}
            if f.kind == "counter"
            else {f"{f.name}_bucket", f"{f.name}_sum", f"{f.name}_count"}
            if f.kind == "histogram"
            else {f.name}
        )
    referenced = set(re.findall(r"kvstrata_[a-z_]+", GRAFANA.read_text()))
    assert referenced, "the dashboard names no kvstrata metric"
    assert referenced <= exported, referenced - exported
