"""How long a lookup takes on the scheduler's side (docs/serving.md: may it run inline?).

A 1,500-token prompt (5 chunks of 256) of SmolLM2-135M-shaped KV, stored in a
DRAM pool and a local directory; then 50 lookups each with: the pool in this
process (single-process vLLM), the engine core's index of a worker's pool
(multiprocess vLLM), and that index empty so that the chunks are found on
disk. No vLLM needed. Run: ``python benchmarks/lookup_latency.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np

from kvstrata import runtime
from kvstrata.config import parse_config
from kvstrata.connectors import vllm_pool
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext

MODEL = ModelSpec("smollm2-135m", 30, 3, 64, "float32")
MODES = ("memory pool", "scheduler index (multiprocess)", "scheduler index empty -> disk")


def main(n: int = 50) -> None:
    tmp = tempfile.mkdtemp()
    config = parse_config(f"""
version: 1
chunk_tokens: 256
tiers:
  dram: {{kind: memory, capacity_bytes: 1GiB}}
  local: {{kind: disk, path: "{tmp}"}}
policy:
  default: {{read: [dram, local], write: [dram, local]}}
""")
    tokens = np.arange(1500) % 49152
    ctx = RequestContext(context_tokens=1500)
    kv = np.zeros((MODEL.n_layers, 2, 256, MODEL.kv_heads, MODEL.head_dim), np.float32)
    for mode in MODES:
        orch = Orchestrator(config, MODEL)
        try:
            if mode != MODES[0]:
                vllm_pool.attach(orch, worker=False)  # the engine core's view: an index, no bytes
            plan = orch.lookup(tokens, ctx, limit_tokens=1499)
            for i in range(len(plan.logical_keys())):
                orch.save(plan, i, kv)
            orch.flush(60)
            if mode == MODES[1]:  # what the worker's journal would have reported
                vllm_pool.indexes(orch)["dram"].apply({k.digest: True for k in plan.logical_keys()})
            times = []
            for _ in range(n):
                started = time.perf_counter()
                found = runtime.run(orch.alookup(tokens, ctx, limit_tokens=1499))
                times.append(time.perf_counter() - started)
            times.sort()
            print(
                f"{mode:32s} plan {found.tokens_by_tier()}  "
                f"median {statistics.median(times) * 1e3:.3f} ms"
                f"  p90 {times[int(0.9 * n)] * 1e3:.3f} ms"
            )
        finally:
            orch.close()


if __name__ == "__main__":
    main()
