"""The load-or-recompute decision against a real Redis behind a real bandwidth-capped link.

Each case puts chunks in Redis, reaches it through a throttled TCP proxy at a
given rate, loads once so the cost model measures the link, and asks again:
slow links must flip the decision to recompute, fast ones must keep loading,
and the flip must sit where the measured numbers put it.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvstrata.config import parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from kvstrata.testing.throttle import ThrottledProxy

CHUNK = 64
MODEL = ModelSpec(
    "flip-model", n_layers=8, kv_heads=4, head_dim=64, dtype="float32"
)  # 1 MiB per chunk
PREFILL_TPS = 1000.0  # recomputing one chunk costs 64 ms


def make(redis_url: str, prefix: str) -> Orchestrator:
    cfg = parse_config(f"""
version: 1
chunk_tokens: {CHUNK}
tiers:
  shared: {{kind: redis, url: "{redis_url}", key_prefix: "{prefix}:", timeout_ms: 20000,
           timeout_s: 20}}
engine: {{prefill_tokens_per_s: {PREFILL_TPS}}}
orchestrator: {{default_budget_ms: 600000}}
policy:
  default: {{read: [shared], write: [shared]}}
""")
    return Orchestrator(cfg, MODEL)


@pytest.mark.parametrize(
    "rate_mbps, expect_load", [(2, False), (6, False), (60, True), (None, True)]
)
def test_decision_follows_the_measured_link(redis_server, rate_mbps, expect_load) -> None:
    host, port = redis_server.url.split("//")[1].split("/")[0].split(":")
    proxy = ThrottledProxy(host, int(port), bytes_per_s=(rate_mbps or 0) * 1e6)
    orch = make(f"redis://127.0.0.1:{proxy.port}/0", f"flip-{rate_mbps}")
    try:
        tokens = np.arange(4 * CHUNK) % 30000 + int(rate_mbps or 99) * 7
        plan = orch.lookup(tokens, RequestContext())
        kv = np.ones((MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim), np.float32)
        for i in range(4):
            orch.save(plan, i, kv)
        assert orch.flush(120)
        first = orch.lookup(tokens, RequestContext())
        assert len(first.chunks) == 4, "with the prior (fast Redis), loading wins"
        handle = orch.load(first)
        assert handle.wait_all(120) and not handle.failed  # the load measures the link
        latency, bandwidth = orch.cost.tier("shared")
        second = orch.lookup(tokens, RequestContext())
        chunk_s = orch.cost.read_s("shared", MODEL.chunk_bytes(CHUNK))
        # the numbers: one chunk's load against one chunk's recompute
        assert (len(second.chunks) > 0) == (chunk_s < CHUNK / PREFILL_TPS)
        assert (len(second.chunks) > 0) == expect_load, (bandwidth / 1e6, chunk_s)
        if rate_mbps:
            assert bandwidth / 1e6 == pytest.approx(rate_mbps, rel=0.5)
    finally:
        orch.close()
        proxy.close()
