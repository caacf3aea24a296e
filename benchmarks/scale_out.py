"""Shared stores for several engines: objects per second each store serves, and what a
routing hint (``/lookup``) costs.

Usage::

    .venv/bin/python benchmarks/scale_out.py [--quick] [--rgw] \\
        [--out benchmarks/results/scale_out.json]

Starts its own servers (kvstrata.testing.services, stopped at the end): one Redis, a
Redis Cluster (3 masters + 3 replicas), SeaweedFS, and with ``--rgw`` a Ceph RGW
(scripts/rgw.sh). For each store, through kvstrata's own tier (verified gets):

* ``put``: objects/s and MB/s writing ``--batch`` x ``--concurrency`` real chunk objects
  (``--tokens`` tokens of SmolLM2-135M KV: 30 layers x 2 x 3 heads x 64 dims, fp32),
  ``--concurrency`` puts in flight, one object per call (what a save worker does);
* ``get``: objects/s and MB/s of batched whole-object gets (``--batch`` chunks per call,
  as one request's load), ``--concurrency`` calls in flight (several engines loading);
* ``contains``: batched existence checks per second (what every lookup costs).

Then the routing hint: the latency of ``kvstrata.lookup`` over the exporter's HTTP
``/lookup`` for a prompt of ``--batch`` cached chunks on the Redis Cluster. Two shared
cores run client and servers: absolute numbers are this machine's, ratios travel better.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

from kvstrata import format as fmt  # noqa: E402
from kvstrata.keys import Namespace, chunk_keys  # noqa: E402
from kvstrata.testing import services  # noqa: E402
from kvstrata.tiers.base import Hit, create_tier  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
NS = Namespace("bench-scale-out", "float32")


def objects(n: int, tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    keys = chunk_keys(rng.integers(0, 49152, size=n * tokens), NS, tokens)
    section = 2 * tokens * KV_HEADS * HEAD_DIM * 4
    body = rng.bytes(section)
    out = []
    for k in keys:
        meta = fmt.ObjectMeta(
            "none", "float32", tokens, KV_HEADS, HEAD_DIM, NS.fingerprint, k.digest
        )
        out.append((k, fmt.encode(meta, [body] * LAYERS)))
    return out


async def measure(tier, items, batch: int, concurrency: int, seconds: float) -> dict:
    """Put every item (timed), then batched gets and contains of them for ``seconds`` each."""
    size = len(items[0][1])

    async def timed(op, calls, limit: float | None):
        queue = list(calls)[::-1]  # popped from the end: in order
        done = 0
        started = time.perf_counter()

        async def worker():
            nonlocal done
            while queue and (limit is None or time.perf_counter() - started < limit):
                n = await op(queue.pop())
                done += n  # not `done += await ...`: that reads `done` before the await

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - started

    async def put(item):
        await tier.put([item])
        return 1

    n, s = await timed(put, items, None)
    out = {
        "object_bytes": size,
        "objects": n,
        "put_objects_per_s": n / s,
        "put_mb_per_s": n * size / s / 1e6,
    }
    keys = [k for k, _ in items]
    batches = [keys[i : i + batch] for i in range(0, len(keys) - batch + 1, batch)] * 10000

    async def get(ks):
        got = await tier.get(ks)
        assert all(isinstance(g, Hit) for g in got), got
        return len(ks)

    n, s = await timed(get, batches, seconds)
    out.update(get_objects_per_s=n / s, get_mb_per_s=n * size / s / 1e6)

    async def contains(ks):
        assert all(await tier.contains(ks))
        return 1

    n, s = await timed(contains, batches, seconds)
    out.update(contains_calls_per_s=n / s)
    return out


def lookup_latency(cluster_url: str, tokens: int, batch: int, rounds: int) -> dict:
    """p50/p99 of GET /lookup on an exporter for a prompt whose ``batch`` chunks are cached."""
    import textwrap

    from kvstrata.config import TelemetryConfig, parse_config
    from kvstrata.model import ModelSpec
    from kvstrata.orchestrator import Orchestrator
    from kvstrata.policy.route import RequestContext
    from kvstrata.telemetry import exporter

    cfg = parse_config(
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {tokens}
        tiers:
          shared:
            {{kind: redis, url: "{cluster_url}", key_prefix: "bench-lookup-{time.time_ns()}:"}}
        engine: {{prefill_tokens_per_s: 200}}
        policy:
          default: {{read: [shared], write: [shared]}}
        """)
    )
    model = ModelSpec("bench", LAYERS, KV_HEADS, HEAD_DIM, "float32")
    orch = Orchestrator.shared(cfg, model)
    try:
        ids = [int(t) for t in np.random.default_rng(1).integers(0, 49152, size=batch * tokens + 1)]
        plan = orch.lookup(ids, RequestContext())
        kv = np.zeros((LAYERS, 2, tokens, KV_HEADS, HEAD_DIM), np.float32)
        for i in range(batch):
            orch.save(plan, i, kv, tiers=("shared",))
        orch.flush(120)
        service = exporter.serve(orch.telemetry, TelemetryConfig(prometheus_port=0), "bench")
        url = service.url.removesuffix("/metrics") + "/lookup?tokens=" + ",".join(map(str, ids))
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as r:
                report = json.loads(r.read())
            times.append(time.perf_counter() - t0)
        assert report["plan"]["tokens"] == {"shared": batch * tokens}, report
        exporter.stop(orch.telemetry)
        return {
            "prompt_tokens": len(ids),
            "p50_ms": common.percentile(times, 50) * 1e3,
            "p99_ms": common.percentile(times, 99) * 1e3,
            "rounds": rounds,
        }
    finally:
        orch.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="3 s per get/contains phase instead of 10")
    ap.add_argument("--rgw", action="store_true", help="also a Ceph RGW (scripts/rgw.sh)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per chunk object")
    ap.add_argument(
        "--batch", type=int, default=8, help="chunks per get call (one request's prefix)"
    )
    ap.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    seconds = 3.0 if args.quick else 10.0
    out = args.out or common.RESULTS_DIR / (
        "scale_out-quick.json" if args.quick else "scale_out.json"
    )
    started, date = time.perf_counter(), common.utc_now()
    rows, ready = {}, {}
    with tempfile.TemporaryDirectory(prefix="kvstrata-scale-") as tmp:
        tmp = Path(tmp)
        redis = services.start_redis(tmp / "redis")
        cluster = services.start_redis_cluster(tmp / "cluster")
        s3 = services.start_seaweedfs(tmp / "s3")
        rgw = services.start_rgw(tmp / "rgw") if args.rgw else None
        ready = {
            "redis": redis.ready_seconds,
            "redis-cluster": cluster.ready_seconds,
            "seaweedfs": s3.ready_seconds,
            **({"rgw": rgw.ready_seconds} if rgw else {}),
        }
        try:
            stores = {
                "redis": lambda: create_tier(
                    "redis", url=redis.url, key_prefix="bench:", max_connections=16
                ),
                "redis-cluster": lambda: create_tier(
                    "redis", url=cluster.url, key_prefix="bench:", max_connections=16
                ),
                "seaweedfs": lambda: create_tier(
                    "s3",
                    endpoint=s3.endpoint,
                    bucket=s3.bucket,
                    prefix="bench/",
                    access_key_id=s3.access_key,
                    secret_access_key=s3.secret_key,
                ),
            }
            if rgw:
                stores["rgw"] = lambda: create_tier(
                    "s3",
                    endpoint=rgw.endpoint,
                    bucket=rgw.bucket,
                    prefix="bench/",
                    access_key_id=rgw.access_key,
                    secret_access_key=rgw.secret_key,
                )
            items = objects(args.batch * args.concurrency, args.tokens, 0)

            async def run():
                for name, make in stores.items():
                    tier = make()
                    try:
                        rows[name] = await measure(
                            tier, items, args.batch, args.concurrency, seconds
                        )
                    finally:
                        await tier.close()
                    print(name, {k: round(v, 1) for k, v in rows[name].items()}, flush=True)

            asyncio.run(run())
            lookup = lookup_latency(cluster.url, args.tokens, args.batch, 50)
            print("lookup", lookup)
        finally:
            for server in (rgw, s3, cluster, redis):
                if server is not None:
                    server.stop()
    payload = {
        "benchmark": "scale_out",
        "date": date,
        "command": common.command_line(),
        "machine": common.machine_info(["redis", "obstore"]),
        "load_average_end": common.load_average(),
        "parameters": {
            "tokens_per_object": args.tokens,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "phase_seconds": seconds,
            "model": "SmolLM2-135M geometry, fp32",
        },
        "servers": {"ready_seconds": ready},
        "stores": rows,
        "lookup_http": lookup,
        "total_seconds": time.perf_counter() - started,
    }
    print("wrote", common.write_json(out, common.round_floats(payload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
