"""Layer-wise retrieval from S3 and the bandwidth scheduler, emulated on real S3 reads.

Every number comes from kvstrata's real load path (``Orchestrator.load``: the
adaptive layer groups, ranged GETs against a local SeaweedFS server, the
bandwidth scheduler's link pacing the bytes) feeding an emulated engine that
waits for layer l (``wait_layer``) and then "computes" it for C_l seconds.
What is emulated is the deployment: the compute times and link speeds of a
GPU serving Llama-3.1-8B or 70B, scaled so a 2-core machine can run them:

* bytes are scaled by ``1/256`` (16 B of KV per token and layer instead of
  4 KiB; a link of B bytes/s becomes B/256), so transfer *times* are those of
  the deployment;
* everything is slowed by ``--time-scale`` (compute x s, link / s) so Python's
  and the local server's per-GET costs weigh less; reported times are divided
  back, i.e. in deployment seconds.

The compute model per layer for a request with a cached prefix of P tokens
and q new tokens: ``(2 * params_per_layer * q + 4 * q * (P + q/2) * width) / flops``
(dense matmuls plus attention). Profile ``smollm2-cpu`` instead takes its
per-layer compute from vLLM's CPU build running SmolLM2-135M (the hit TTFTs
measured by ``benchmarks/vllm_ttft.py``).

Experiments, side by side in one run:

1. single requests at growing context: TTFT from local DRAM (the baseline:
   the same loader reading the memory tier over a PCIe-speed link), from S3
   layer-wise (adaptive groups), S3 one GET per layer, S3 whole objects; the
   analytic pipeline bound; GETs per request;
2. 1, 4 and 16 concurrent requests of mixed lengths under one shared link cap,
   with each scheduling policy (equal, stall_aware, deadline) on kvstrata's
   work-conserving link, and equal and stall_aware with rates fixed per request
   (``sharing: fixed``, the model ObjectCache's comparison is stated in):
   added TTFT over each request's DRAM TTFT.

    python benchmarks/layerwise.py            # full (~15 min here)
    python benchmarks/layerwise.py --quick    # ~2 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.layerwise
    import _common as common
except ImportError:
    from benchmarks import _common as common

from kvstrata.config import parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy import pipeline
from kvstrata.policy.route import RequestContext
from kvstrata.testing import services

EMULATED_BYTES_PER_TOKEN_LAYER = 16


@dataclass(frozen=True)
class Profile:
    """A deployment to mimic: model shape, GPU throughput,
    links (bytes/s of the real deployment)."""

    name: str
    n_layers: int
    kv_bytes_per_token_layer: int
    params_per_layer: float
    width: int
    flops: float
    s3_bps: float = 12.5e9  # 100 Gb/s RoCE, as ObjectCache's testbed
    dram_bps: float = 25e9  # host DRAM -> GPU over PCIe 4.0 x16
    chunk_tokens: int = 1024
    measured: dict | None = None  # context -> (cached prefix, seconds per layer), measured

    def prefix(self, context: int) -> int:
        """The cached part of a prompt: measured, or three quarters in whole chunks."""
        if self.measured is not None:
            return self.measured[context][0]
        return max(self.chunk_tokens, (context * 3 // 4) // self.chunk_tokens * self.chunk_tokens)

    def compute_s_per_layer(self, prefix: int, new: int) -> float:
        if self.measured is not None:
            return self.measured[prefix + new][1]
        return (
            2 * self.params_per_layer * new + 4 * new * (prefix + new / 2) * self.width
        ) / self.flops

    @property
    def byte_scale(self) -> float:
        return EMULATED_BYTES_PER_TOKEN_LAYER / self.kv_bytes_per_token_layer


LLAMA8B = Profile("llama-3.1-8b / 1xH100", 32, 4096, 0.218e9, 4096, 400e12)
LLAMA70B = Profile("llama-3.1-70b / 4xH100", 80, 4096, 0.856e9, 8192, 1.6e15)


def smollm2_cpu() -> Profile:
    """SmolLM2-135M on vLLM's CPU build: compute per layer from measured hit TTFTs (DRAM)."""
    ttft = common.RESULTS_DIR / "vllm_ttft.json"
    import json

    measured = {}
    for r in json.loads(ttft.read_text())["rows"]:
        hit = r["hits"]["dram"]  # TTFT of a DRAM hit, less the tier read: the engine's compute
        measured[int(r["tokens"])] = (
            int(r["hit_tokens"]),
            (hit["median_s"] - hit["tier_read_s_median"]) / 30,
        )
    # fp32, 3 KV heads x 64: 1536 B per token and layer; a 10 Gb/s link; DRAM at 10 GB/s
    return Profile(
        "smollm2-135m / vLLM CPU (measured)",
        30,
        1536,
        0,
        0,
        1,
        s3_bps=1.25e9,
        dram_bps=10e9,
        chunk_tokens=256,
        measured=measured,
    )


@dataclass(frozen=True)
class Request:
    """A prompt of ``context`` tokens; the first ``cached``
    are in the cache (default: the profile's share)."""

    profile: Profile
    context: int
    cached: int | None = None
    kind: str = ""
    budget_factor: float = 2.0  # latency SLO: this many times the request's DRAM TTFT

    @property
    def prefix(self) -> int:
        return self.cached if self.cached is not None else self.profile.prefix(self.context)

    @property
    def new(self) -> int:
        return self.context - self.prefix

    @property
    def c(self) -> float:
        return self.profile.compute_s_per_layer(self.prefix, self.new)

    def x(self, bps: float) -> float:
        return self.prefix * self.profile.kv_bytes_per_token_layer / bps

    def bound(self, bps: float) -> float:
        n = self.profile.n_layers
        return pipeline.bound([self.x(bps)] * n, [self.c] * n)


# -- the emulated deployment ----------------------------------------------------------


class Bench:
    """One S3 server, objects written once per (profile,
    request index); orchestrators per setting."""

    def __init__(self, time_scale: float, workdir: Path, window: int = 2):
        self.s = time_scale
        self.window = window
        self.server = services.start_seaweedfs(workdir / "s3")
        self.prefix = f"lw-{uuid.uuid4().hex[:8]}/"
        self.orchs: dict[tuple, Orchestrator] = {}
        self.stored: dict[tuple, object] = {}

    def close(self) -> None:
        for o in self.orchs.values():
            o.close()
        self.server.stop()

    def model(self, p: Profile) -> ModelSpec:
        return ModelSpec(
            f"emu-{p.n_layers}", p.n_layers, 1, 2, "float32"
        )  # 16 B per token and layer

    def orch(self, p: Profile, tier: str, policy: str, cap_bps: float) -> Orchestrator:
        """An orchestrator reading ``tier`` (s3 or dram)
        through a link of the (deployment) capacity.

        ``policy`` may end in ``+ra``: the same policy with unbounded read-ahead (every layer
        group requested at once, as a client without a loader window would); or in ``+fixed``:
        the link's ``sharing: fixed`` (a rate per request, set when a request starts)."""
        key = (p.name, tier, policy, cap_bps)
        if key not in self.orchs:
            policy, _, variant = policy.partition("+")
            window = 64 if variant == "ra" else self.window
            sharing = "fixed" if variant == "fixed" else "work_conserving"
            emulated = cap_bps * p.byte_scale / self.s
            srv = self.server
            cfg = parse_config(f"""
version: 1
chunk_tokens: {p.chunk_tokens}
tiers:
  s3: {{kind: s3, endpoint: "{srv.endpoint}", bucket: {srv.bucket}, prefix: {self.prefix},
        access_key_id: {srv.access_key}, secret_access_key: {srv.secret_key}, timeout_ms: 60000,
        max_concurrency: 64}}
  dram: {{kind: memory, capacity_bytes: 4GiB}}
bandwidth:
  {{policy: {policy}, sharing: {sharing}, links: {{{tier}: {emulated}}}, read_window: {window}}}
policy:
  default: {{read: [{tier}], write: [{tier}], retrieval: layerwise, load: always}}
""")
            self.orchs[key] = Orchestrator(cfg, self.model(p))
        return self.orchs[key]

    def plan(
        self, orch: Orchestrator, req: Request, ident: int, tier: str, budget_s: float | None = None
    ):
        """The request's plan; its prefix is written to the tier the first time."""
        rng = np.random.default_rng(ident)
        tokens = rng.integers(0, 50_000, req.context)
        ctx = RequestContext(budget_ms=None if budget_s is None else budget_s * 1e3)
        plan = orch.lookup(tokens, ctx, limit_tokens=req.prefix)
        n = req.prefix // req.profile.chunk_tokens
        if (tier, req.profile.name, ident) not in self.stored:
            geometry = (req.profile.n_layers, 2, req.profile.chunk_tokens, 1, 2)
            for i in range(n):
                orch.save(plan, i, rng.standard_normal(geometry).astype(np.float32))
            assert orch.flush(300), "writing the prefix timed out"
            self.stored[(tier, req.profile.name, ident)] = True
            plan = orch.lookup(tokens, ctx, limit_tokens=req.prefix)
        assert len(plan.chunks) == n, f"prefix not stored: {len(plan.chunks)}/{n} chunks"
        return plan

    def run(
        self, orch: Orchestrator, jobs: list[tuple[Request, object]], layers_per_read=None
    ) -> list[dict]:
        """Start every job's load at once; each emulated engine waits per layer, then computes."""
        results: list[dict] = [{} for _ in jobs]
        start = threading.Barrier(len(jobs))

        def engine(i: int, req: Request, plan) -> None:
            c = req.c * self.s
            start.wait()
            t0 = time.monotonic()
            handle = orch.load(plan, layers_per_read=layers_per_read, compute_s_per_layer=c)
            for layer in range(req.profile.n_layers):
                handle.wait_layer(layer, timeout=600)
                _sleep_until(time.monotonic() + c)
            ttft = (time.monotonic() - t0) / self.s
            assert not handle.failed, f"chunks failed to load: {sorted(handle.failed)}"
            results[i] = {
                "ttft_s": ttft,
                "gets": handle.gets,
                "groups": [len(g) for g in handle.groups],
            }

        threads = [threading.Thread(target=engine, args=(i, r, p)) for i, (r, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


# -- experiments --------------------------------------------------------------------------------


def single(bench: Bench, cases: list[Request], repeats: int) -> list[dict]:
    rows = []
    for n, req in enumerate(cases):
        p = req.profile
        ident = 1000 + n
        variants = {
            "dram": (bench.orch(p, "dram", "deadline", p.dram_bps), "dram", None),
            "s3 layer-wise": (bench.orch(p, "s3", "deadline", p.s3_bps), "s3", None),
            "s3 1 layer/GET": (bench.orch(p, "s3", "deadline", p.s3_bps), "s3", 1),
            "s3 whole": (bench.orch(p, "s3", "deadline", p.s3_bps), "s3", p.n_layers),
        }
        row = {
            "profile": p.name,
            "context": req.context,
            "prefix": req.prefix,
            "new": req.new,
            "chunks": req.prefix // p.chunk_tokens,
            "layers": p.n_layers,
            "compute_s": req.c * p.n_layers,
            "bound_s3_s": req.bound(p.s3_bps),
            "bound_dram_s": req.bound(p.dram_bps),
        }
        for name, (orch, tier, per_read) in variants.items():
            plan = bench.plan(orch, req, ident, tier)
            runs = [bench.run(orch, [(req, plan)], per_read)[0] for _ in range(repeats)]
            row[name] = {
                "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                "gets": runs[0]["gets"],
                "groups": runs[0]["groups"],
            }
        dram = row["dram"]["ttft_s"]
        for name in ("s3 layer-wise", "s3 1 layer/GET", "s3 whole"):
            row[name]["added_s"] = row[name]["ttft_s"] - dram
        row["layerwise_vs_bound"] = row["s3 layer-wise"]["ttft_s"] / row["bound_s3_s"]
        row["gets_per_chunk_layer"] = req.prefix // p.chunk_tokens * p.n_layers
        rows.append(row)
        print(
            f"  {p.name} {req.context:>6} tokens: dram {dram:.3f}s, layer-wise "
            f"{row['s3 layer-wise']['ttft_s']:.3f}s ({row['s3 layer-wise']['gets']} GETs), "
            f"1/GET {row['s3 1 layer/GET']['ttft_s']:.3f}s, "
            f"whole {row['s3 whole']['ttft_s']:.3f}s, "
            f"bound {row['bound_s3_s']:.3f}s",
            flush=True,
        )
    return rows


def kinds(p: Profile) -> dict[str, Request]:
    """Request kinds of a mixed serving workload: how
    much is cached decides how much is computed."""
    return {
        "chat": Request(p, 4096, 3072, "chat"),  # a follow-up turn: short new text
        "doc-qa": Request(p, 16384, 15360, "doc-qa"),  # a question on a cached document
        "long-qa": Request(p, 65536, 61440, "long-qa"),  # a question on a long cached document
        "long-rag": Request(p, 65536, 32768, "long-rag"),  # half cached, half new retrieved text
    }


MIXES = {  # name -> request kinds (the default runs are the first three)
    "1": ["doc-qa"],
    "4": ["chat", "doc-qa", "long-qa", "long-rag"],
    "16": ["chat"] * 10
    + ["doc-qa"] * 3
    + ["long-qa"] * 2
    + ["long-rag"],  # mostly short turns, as in serving
    "16-compute": ["chat"] * 8 + ["long-rag"] * 8,  # half compute-bound: where capping should pay
}
DEFAULT_MIXES = ("1", "4", "16")
# kvstrata's link re-splits at every event (work conserving); "+fixed" runs the same policy with a
# rate per request set when a request starts (sharing:
# fixed), the model ObjectCache's numbers are in
POLICIES = ("equal", "stall_aware", "deadline", "equal+fixed", "stall_aware+fixed")


def shared(
    bench: Bench,
    profile: Profile,
    cap_bps: float,
    mixes: dict[int, list[str]],
    dram_ttft: dict[str, float],
    repeats: int,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    rows = []
    for label, names in mixes.items():
        reqs = [kinds(profile)[name] for name in names]
        concurrency = len(names)
        row = {
            "mix": label,
            "concurrency": concurrency,
            "requests": names,
            "cap_bps": cap_bps,
            "policies": {},
        }
        for policy in (*POLICIES, *extra):
            orch = bench.orch(profile, "s3", policy, cap_bps)
            added_runs = []
            for _ in range(repeats):
                jobs = [
                    (
                        r,
                        bench.plan(
                            orch,
                            r,
                            2000 + 100 * list(kinds(profile)).index(r.kind) + i,
                            "s3",
                            r.budget_factor * dram_ttft[r.kind] * bench.s,
                        ),
                    )
                    for i, r in enumerate(reqs)
                ]
                out = bench.run(orch, jobs)
                added_runs.append(
                    [o["ttft_s"] - dram_ttft[r.kind] for o, r in zip(out, reqs, strict=True)]
                )
            added = [statistics.median(run[i] for run in added_runs) for i in range(len(reqs))]
            missed = sum(
                1
                for a, r in zip(added, reqs, strict=True)
                if a + dram_ttft[r.kind] > r.budget_factor * dram_ttft[r.kind]
            )
            row["policies"][policy] = {
                "added_s": added,
                "mean_added_s": statistics.fmean(added),
                "p90_added_s": float(np.percentile(added, 90)),
                "slo_missed": missed,
            }
            print(
                f"  {label:>10} ({concurrency:>2} requests), {policy:<11}: "
                f"mean added {statistics.fmean(added) * 1e3:8.1f} ms,"
                f" SLO missed {missed}/{len(reqs)}",
                flush=True,
            )
        mean = {p: v["mean_added_s"] for p, v in row["policies"].items()}
        row["equal_over_deadline"] = mean["equal"] / mean["deadline"]
        row["stall_aware_over_deadline"] = mean["stall_aware"] / mean["deadline"]
        row["equal_over_stall_aware"] = mean["equal"] / mean["stall_aware"]
        row["fixed_equal_over_stall_aware"] = mean["equal+fixed"] / mean["stall_aware+fixed"]
        row["fixed_stall_aware_over_deadline"] = mean["stall_aware+fixed"] / mean["deadline"]
        rows.append(row)
    return rows


def dram_baselines(
    bench: Bench, profile: Profile, names: set[str], repeats: int
) -> dict[str, float]:
    """Each request kind's TTFT alone from local DRAM: what added TTFT is measured against."""
    out = {}
    orch = bench.orch(profile, "dram", "deadline", profile.dram_bps)
    for n, name in enumerate(sorted(names)):
        req = kinds(profile)[name]
        plan = bench.plan(orch, req, 3000 + n, "dram")
        out[name] = statistics.median(
            bench.run(orch, [(req, plan)])[0]["ttft_s"] for _ in range(repeats)
        )
    return out


# -- report ---------------------------------------------------------------------------------------


def print_tables(single_rows: list[dict], shared_rows: list[dict], cap_bps: float) -> None:
    ms = lambda s: common.fmt_num(s * 1e3, 1)  # noqa: E731
    common.print_table(
        "layer-wise retrieval, one request (deployment time; DRAM = same loader over PCIe)",
        [
            "profile",
            "context",
            "DRAM TTFT ms",
            "S3 layer-wise ms",
            "added ms",
            "added %",
            "bound ms",
            "vs bound",
            "GETs",
            "GETs 1/layer",
            "1 layer/GET ms",
            "whole ms",
        ],
        [
            [
                r["profile"],
                f"{r['context']:,}",
                ms(r["dram"]["ttft_s"]),
                ms(r["s3 layer-wise"]["ttft_s"]),
                ms(r["s3 layer-wise"]["added_s"]),
                f"{100 * r['s3 layer-wise']['added_s'] / r['dram']['ttft_s']:.1f}%",
                ms(r["bound_s3_s"]),
                f"{r['layerwise_vs_bound']:.3f}",
                r["s3 layer-wise"]["gets"],
                r["gets_per_chunk_layer"],
                ms(r["s3 1 layer/GET"]["ttft_s"]),
                ms(r["s3 whole"]["ttft_s"]),
            ]
            for r in single_rows
        ],
    )
    common.print_table(
        f"mean added TTFT under a shared {cap_bps * 8 / 1e9:.0f} Gb/s cap (ms; SLO = 2x DRAM TTFT)",
        [
            "requests",
            "equal",
            "stall-aware",
            "deadline (ours)",
            "equal / ours",
            "stall-aware / ours",
            "equal / stall-aware",
            "SLO missed e/s/d",
        ],
        [
            [
                r.get("mix", r["concurrency"]),
                ms(r["policies"]["equal"]["mean_added_s"]),
                ms(r["policies"]["stall_aware"]["mean_added_s"]),
                ms(r["policies"]["deadline"]["mean_added_s"]),
                f"{r['equal_over_deadline']:.2f}x",
                f"{r['stall_aware_over_deadline']:.2f}x",
                f"{r['equal_over_stall_aware']:.2f}x",
                "/".join(
                    str(r["policies"][p]["slo_missed"])
                    for p in ("equal", "stall_aware", "deadline")
                ),
            ]
            for r in shared_rows
        ],
    )
    common.print_table(
        "the same, rates fixed per request (sharing: fixed, ObjectCache's model) "
        "vs ours (work conserving)",
        [
            "requests",
            "equal (fixed)",
            "stall-aware (fixed)",
            "deadline (ours)",
            "equal / stall-aware (fixed)",
            "stall-aware (fixed) / ours",
        ],
        [
            [
                r.get("mix", r["concurrency"]),
                ms(r["policies"]["equal+fixed"]["mean_added_s"]),
                ms(r["policies"]["stall_aware+fixed"]["mean_added_s"]),
                ms(r["policies"]["deadline"]["mean_added_s"]),
                f"{r['fixed_equal_over_stall_aware']:.2f}x",
                f"{r['fixed_stall_aware_over_deadline']:.2f}x",
            ]
            for r in shared_rows
        ],
    )


def plot(single_rows: list[dict], shared_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    short = {"llama-3.1-8b": "8B", "llama-3.1-70b": "70B", "smollm2-135m": "SmolLM2"}
    labels = [
        f"{short.get(r['profile'].split(' ')[0], r['profile'])}\n{r['context']:,}"
        for r in single_rows
    ]
    xs = np.arange(len(single_rows))
    for k, (name, key) in enumerate(
        [
            ("DRAM", "dram"),
            ("S3 layer-wise", "s3 layer-wise"),
            ("S3 1 layer/GET", "s3 1 layer/GET"),
            ("S3 whole", "s3 whole"),
        ]
    ):
        a.bar(
            xs + (k - 1.5) * 0.2,
            [r[key]["ttft_s"] / r["dram"]["ttft_s"] for r in single_rows],
            0.2,
            label=name,
        )
    a.scatter(
        xs,
        [r["bound_s3_s"] / r["dram"]["ttft_s"] for r in single_rows],
        color="k",
        marker="_",
        s=400,
        zorder=3,
        label="pipeline bound (S3)",
    )
    a.set_xticks(xs, labels)
    a.set_ylabel("TTFT / DRAM TTFT")
    a.set_title("one request: S3 vs local DRAM")
    a.legend(fontsize=8)
    xs = np.arange(len(shared_rows))
    bars = [
        ("equal", "equal", ""),
        ("stall-aware", "stall_aware", ""),
        ("deadline (ours)", "deadline", ""),
        ("equal, fixed rates", "equal+fixed", "//"),
        ("stall-aware, fixed rates", "stall_aware+fixed", "//"),
    ]
    for k, (name, key, hatch) in enumerate(bars):
        b.bar(
            xs + (k - 2) * 0.17,
            [r["policies"][key]["mean_added_s"] * 1e3 for r in shared_rows],
            0.17,
            label=name,
            hatch=hatch,
            color=f"C{k % 3}",
            alpha=0.55 if hatch else 1.0,
        )
    b.set_xticks(xs, [str(r.get("mix", r["concurrency"])) for r in shared_rows])
    b.set_ylabel("mean added TTFT (ms)")
    b.set_title("shared link cap: scheduling policies")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats (~2 min)")
    ap.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="slow-down of the emulation (default 4, quick 2)",
    )
    ap.add_argument(
        "--cap-gbps",
        type=float,
        default=100.0,
        help="shared link cap for the concurrency runs (Gb/s)",
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--read-window", type=int, default=2, help="layer groups in flight per request")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-single", action="store_true", help="only the shared-cap experiment")
    ap.add_argument(
        "--read-ahead",
        action="store_true",
        help="also run each policy with unbounded read-ahead (policy+ra)",
    )
    ap.add_argument(
        "--mixes", default=None, help=f"mixes to run, of {','.join(MIXES)} (default 1,4,16)"
    )
    args = ap.parse_args(argv)
    quick = args.quick
    scale = args.time_scale or (2.0 if quick else 4.0)
    repeats = args.repeats or (1 if quick else 3)
    out = args.out or common.RESULTS_DIR / ("layerwise.quick.json" if quick else "layerwise.json")

    cases = [Request(LLAMA8B, c) for c in (4096, 16384, 65536)]
    if not quick:
        cases.append(Request(LLAMA70B, 65536))
        cpu = smollm2_cpu()
        cases += [Request(cpu, c) for c in sorted(cpu.measured)]
    wanted = (
        set(args.mixes.split(",")) if args.mixes else ({"4", "16"} if quick else set(DEFAULT_MIXES))
    )
    mixes = {k: v for k, v in MIXES.items() if k in wanted}
    extra = ("equal+ra", "stall_aware+ra", "deadline+ra") if args.read_ahead else ()
    cap = args.cap_gbps * 1e9 / 8

    with tempfile.TemporaryDirectory(prefix="kvstrata-layerwise-") as tmp:
        bench = Bench(scale, Path(tmp), args.read_window)
        try:
            print("single requests:", flush=True)
            single_rows = [] if args.skip_single else single(bench, cases, repeats)
            print("shared cap:", flush=True)
            dram = dram_baselines(
                bench, LLAMA8B, {k for mix in mixes.values() for k in mix}, repeats
            )
            shared_rows = shared(bench, LLAMA8B, cap, mixes, dram, repeats, extra)
        finally:
            bench.close()

    print_tables(single_rows, shared_rows, cap)
    png = out.with_suffix(".png")
    plot(single_rows, shared_rows, png)
    common.write_json(
        out,
        {
            "benchmark": "layerwise",
            "date": common.utc_now(),
            "command": common.command_line(),
            "profile": "quick" if quick else "full",
            "parameters": {
                "time_scale": scale,
                "read_window": args.read_window,
                "repeats": repeats,
                "chunk_tokens": LLAMA8B.chunk_tokens,
                "byte_scale": "16 B per token and layer stand for the profile's KV bytes",
                "cap_bps": cap,
                "mixes": mixes,
                "kinds": {
                    k: {
                        "context": r.context,
                        "cached": r.prefix,
                        "new": r.new,
                        "compute_s_per_layer": r.c,
                    }
                    for k, r in kinds(LLAMA8B).items()
                },
                "budget": "2x the request's DRAM TTFT",
                "dram_ttft_s": dram,
            },
            "machine": common.machine_info(["obstore", "numpy"]),
            "single": common.round_floats(single_rows, 5),
            "shared": common.round_floats(shared_rows, 5),
        },
    )
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
