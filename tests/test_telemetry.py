"""Telemetry through the orchestrator with real tiers (memory, Redis, S3): exact counters.

A scripted workload: three prompts stored in three tiers, then three
requests served from them (one with the engine holding its first chunk).
Every counter is known in advance. Then the same numbers through a snapshot
file, the Prometheus exporter, ``kvstrata stats`` and ``kvstrata report``.
"""

from __future__ import annotations

import textwrap
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from kvstrata.cli.stats import stats_app
from kvstrata.config import parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from kvstrata.telemetry import exporter
from kvstrata.telemetry import report as rp
from kvstrata.telemetry.metrics import Telemetry, load_snapshots

CHUNK = 32
MODEL = ModelSpec("telemetry-test-model", n_layers=4, kv_heads=2, head_dim=16, dtype="float32")
RAW_CHUNK = (
    MODEL.n_layers * 2 * CHUNK * MODEL.kv_heads * MODEL.head_dim * 4
)  # 32768 bytes read per chunk
READ = "[dram, shared, cold]"


def config_text(redis_url: str, s3, extra: str = "") -> str:
    stamp = time.time_ns()
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          dram: {{kind: memory, capacity_bytes: 64MiB}}
          shared: {{kind: redis, url: "{redis_url}", key_prefix: "tel-{stamp}:"}}
          cold:
            kind: s3
            endpoint: {s3.endpoint}
            bucket: {s3.bucket}
            prefix: tel-{stamp}/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
            max_retries: 0
        {extra}
        policy:
          default: {{read: {READ}, write: [dram], load: always}}
          rules:
            - {{name: to-shared, match: {{hints: {{to: shared}}}},
               route: {{read: {READ}, write: [shared], load: always}}}}
            - {{name: to-cold, match: {{hints: {{to: cold}}}},
               route: {{read: {READ}, write: [cold], load: always}}}}
        """)


def prompt(n_chunks: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30000, size=n_chunks * CHUNK + 5)


def kv_for(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    return rng.standard_normal(
        (MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim), dtype=np.float32
    )


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def store(orch: Orchestrator, tokens, to: str | None) -> None:
    plan = orch.lookup(tokens, RequestContext(hints={"to": to} if to else {}))
    for i in range(len(tokens) // CHUNK):
        assert orch.save(plan, i, kv_for(i))
    assert orch.flush(30)


def serve(orch: Orchestrator, tokens, skip_tokens: int = 0) -> dict[str, int]:
    plan = orch.lookup(tokens, RequestContext(), skip_tokens=skip_tokens)
    handle = orch.load(plan)
    assert handle.wait_all(30) and not handle.failed
    return plan.tokens_by_tier()


@pytest.fixture(scope="module")
def workload(redis_server, s3_server):
    """Runs the script once; yields the orchestrator (closed after the module)."""
    orch = Orchestrator(parse_config(config_text(redis_server.url, s3_server)), MODEL)
    a, b, c = prompt(3, 1), prompt(2, 2), prompt(4, 3)  # 101, 69 and 133 tokens
    store(orch, a, None)  # -> dram
    store(orch, b, "shared")
    store(orch, c, "cold")
    assert serve(orch, a) == {"dram": 96}
    assert serve(orch, b) == {"shared": 64}  # promoted to dram
    eventually(
        lambda: (
            orch.telemetry.value(
                "kvstrata_chunk_moves_total", kind="promote", src="shared", dst="dram"
            )
            == 2
        )
    )
    assert serve(orch, c, skip_tokens=CHUNK) == {
        "cold": 96
    }  # the engine held chunk 0; promoted to dram
    t = orch.telemetry
    # a load's accounting and promotions run after the
    # engine got its data: wait for them to be queued
    eventually(lambda: t.value("kvstrata_tokens_total", source="cold") == 96)
    eventually(
        lambda: t.value("kvstrata_chunk_moves_total", kind="promote", src="cold", dst="dram") == 3
    )
    assert orch.flush(30)  # promotions written
    yield orch
    orch.close()


def test_counters_are_exact(workload: Orchestrator) -> None:
    t = workload.telemetry
    v = t.value
    # tokens by who served them: the stores' lookups recompute everything (101 + 69 + 133)
    assert v("kvstrata_tokens_total", source="dram") == 96
    assert v("kvstrata_tokens_total", source="shared") == 64
    assert v("kvstrata_tokens_total", source="cold") == 96
    assert v("kvstrata_tokens_total", source="engine") == 32
    assert v("kvstrata_tokens_total", source="recompute") == 303 + 5 + 5 + 5
    # lookups: chunks each read tier was asked about, found or not
    # stores: 3 + 2 + 4 misses everywhere; A: dram 3 hits; B: dram 2 misses, shared 2 hits;
    # C (from chunk 1): dram and shared 3 misses each, cold 3 hits
    expect = {
        ("dram", "hit"): 3,
        ("dram", "miss"): 9 + 2 + 3,
        ("shared", "hit"): 2,
        ("shared", "miss"): 9 + 3,
        ("cold", "hit"): 3,
        ("cold", "miss"): 9,
    }
    for (tier, result), n in expect.items():
        assert v("kvstrata_tier_ops_total", tier=tier, op="lookup", result=result) == n, (
            tier,
            result,
        )
    assert v("kvstrata_lookups_total", rule="default", outcome="load") == 3
    assert v("kvstrata_lookups_total", rule="default", outcome="recompute") == 1
    assert v("kvstrata_lookups_total", rule="to-shared", outcome="recompute") == 1
    # loads: one whole-object get per tier per request, every chunk a hit
    for tier, chunks in {"dram": 3, "shared": 2, "cold": 3}.items():
        assert v("kvstrata_tier_ops_total", tier=tier, op="get", result="ok") == 1
        assert v("kvstrata_tier_latency_seconds_count", tier=tier, op="get") == 1
        assert v("kvstrata_tier_ops_total", tier=tier, op="read_chunk", result="hit") == chunks
        assert v("kvstrata_tier_bytes_total", tier=tier, direction="read") == chunks * RAW_CHUNK
    assert v("kvstrata_load_seconds_count") == 3
    # writes: dram got A's 3 chunks and 5 promotions,
    # shared B's 2, cold C's 4 -- all one object size
    promoted = {"shared": 2, "cold": 3}
    for src, n in promoted.items():
        assert v("kvstrata_chunk_moves_total", kind="promote", src=src, dst="dram") == n
    written = {"dram": 3 + 5, "shared": 2, "cold": 4}
    sizes = {
        tier: v("kvstrata_tier_bytes_total", tier=tier, direction="write") / n
        for tier, n in written.items()
    }
    size = sizes["dram"]
    assert sizes == {"dram": size, "shared": size, "cold": size}
    assert (
        size == int(size) and RAW_CHUNK < size < RAW_CHUNK + 4096
    )  # raw KV plus the object's header
    for tier, n in written.items():
        assert v("kvstrata_tier_ops_total", tier=tier, op="put", result="ok") == n
    # nothing went wrong
    snap = t.snapshot()
    bad = {
        k: x
        for k, x in snap.items()
        if any(r in k for r in ("result=error", "result=timeout", "skipped"))
    }
    assert bad == {}
    assert v("kvstrata_save_dropped_total", reason="queue_full") == 0
    assert v("kvstrata_save_queue_depth") == 0
    assert v("kvstrata_evictions_total", tier="dram") == 0


def test_summary_derives_hit_rates(workload: Orchestrator) -> None:
    s = rp.summarize({"time": 0, "samples": workload.telemetry.samples()})
    rows = {t.tier: t for t in s.tiers}
    assert [
        (r.lookups, r.hits, r.hit_tokens) for r in (rows["dram"], rows["shared"], rows["cold"])
    ] == [(17, 3, 96), (14, 2, 64), (12, 3, 96)]
    assert rows["shared"].hit_rate == 2 / 14
    assert rows["cold"].bytes_read == 3 * RAW_CHUNK
    assert rows["dram"].p50_s is not None and rows["dram"].p50_s <= rows["dram"].p99_s
    assert (s.engine_tokens, s.recompute_tokens, s.prompt_tokens) == (32, 318, 32 + 256 + 318)
    assert s.extra["promotions"] == 5 and s.extra["demotions"] == 0


def test_snapshot_file_and_stats_command(workload: Orchestrator, tmp_path) -> None:
    path = workload.telemetry.save_snapshot(tmp_path / "snap.json", role="test")
    (doc,) = load_snapshots(path)
    assert doc["role"] == "test" and doc["samples"]
    result = CliRunner().invoke(
        stats_app, ["stats", "--snapshot", str(path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    cells = {row[0]: row for row in map(str.split, result.output.splitlines()) if row}
    # tier, lookups, hit rate, hit tokens, bytes in, bytes out, p50, p99, errors
    assert [cells["cold"][i] for i in (1, 2, 3, 5, 8)] == ["12", "25.0%", "96", "98.3kB", "0"]
    assert [cells["shared"][i] for i in (1, 2, 3, 5)] == ["14", "14.3%", "64", "65.5kB"]
    assert cells["engine"][1:] == ["32"] and cells["recompute"][1:] == ["318"]  # only their tokens


def test_exporter_serves_the_same_numbers_with_process_labels(workload: Orchestrator) -> None:
    service = exporter.TelemetryService(workload.telemetry, roles={"worker"})
    url = service.start_exporter("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        import os

        key = (
            "kvstrata_tokens_total",
            (("pid", str(os.getpid())), ("role", "worker"), ("source", "cold")),
        )
        assert samples[key] == 96
        summary = rp.summarize(rp.load([url])[-1])
        assert {t.tier: t.hit_tokens for t in summary.tiers} == {
            "dram": 96,
            "shared": 64,
            "cold": 96,
        }
        assert summary.recompute_tokens == 318
    finally:
        service.stop()


def test_exporter_moves_to_the_next_port_when_taken() -> None:
    first = exporter.TelemetryService(Telemetry(), roles={"scheduler"})
    second = exporter.TelemetryService(Telemetry(), roles={"worker"})
    try:
        port = int(first.start_exporter("127.0.0.1", 0).rsplit(":", 1)[1].split("/")[0])
        url = second.start_exporter("127.0.0.1", port)
        assert url != first.url and url.startswith("http://127.0.0.1:")
    finally:
        first.stop()
        second.stop()


def test_serve_from_config_shares_one_service_per_telemetry(tmp_path) -> None:
    cfg = parse_config(
        textwrap.dedent(f"""\
        version: 1
        tiers: {{dram: {{kind: memory}}}}
        telemetry: {{prometheus_port: 0, snapshot_path: "{tmp_path}/snap-{{role}}.json"}}
        """)
    )
    assert cfg.telemetry.prometheus_addr == "127.0.0.1"
    t = Telemetry()
    t.served("dram", 7)
    a = exporter.serve(t, cfg.telemetry, "scheduler")
    b = exporter.serve(t, cfg.telemetry, "worker")
    try:
        assert a is b and a.role == "scheduler+worker"
        text = urllib.request.urlopen(a.url, timeout=5).read().decode()
        assert 'role="scheduler+worker"' in text
        (path,) = [p for p in exporter.save_snapshots() if p.parent == tmp_path]
        assert path.name == "snap-scheduler+worker.json"
        assert rp.summarize(load_snapshots(path)[-1]).tiers[0].hit_tokens == 7
    finally:
        with exporter._LOCK:
            exporter._SERVICES.pop(id(t), None)
        a.stop()
    assert (
        parse_config("version: 1\ntiers: {dram: {kind: memory}}\n").telemetry.prometheus_port
        is None
    )


def test_report_writes_plots_for_one_snapshot_and_a_series(
    workload: Orchestrator, tmp_path
) -> None:
    series = tmp_path / "series.jsonl"
    t = Telemetry()
    for i in range(3):
        t.served("dram", 100)
        t.served("recompute", 50)
        t.located("dram", 1, i)
        t.save_snapshot(series)
    assert len(load_snapshots(series)) == 3
    one = workload.telemetry.save_snapshot(tmp_path / "one.json")
    for source, out in [(one, tmp_path / "one"), (series, tmp_path / "series")]:
        result = CliRunner().invoke(stats_app, ["report", str(source), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert (out / "hits.png").stat().st_size > 5000
        assert "hits.png" in (out / "index.html").read_text()
    assert (tmp_path / "one" / "latency.png").exists()


def test_quantile_from_buckets() -> None:
    buckets = [(0.001, 0.0), (0.01, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert rp.quantile(0.5, buckets) == pytest.approx(0.01)
    assert rp.quantile(0.75, buckets) == pytest.approx(0.055)
    assert rp.quantile(0.5, [(float("inf"), 0.0)]) is None


def test_grafana_dashboard_uses_existing_metrics() -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).parent.parent / "examples/grafana/kvstrata.json").read_text()
    )
    used = {
        name
        for p in dashboard["panels"]
        for t in p["targets"]
        for name in re.findall(r"kvstrata_\w+", t["expr"])
    }
    t = Telemetry()
    t.served("x", 1)
    t.loaded(0.1)
    for family in (t.ops, t.bytes, t.evictions, t.moves, t.bad_objects, t.save_dropped, t.lookups):
        family.labels(*["x"] * len(family._labelnames)).inc()
    t.op("x", "get", "ok", 0.1)
    t.queue_depth(0)
    t.breaker("x", False)
    t.request("x")
    known = {s["name"] for s in t.samples()}
    assert used and used <= known, used - known


def test_failures_are_counted_exactly(redis_server) -> None:
    """A Redis tier nobody listens on: two errors open its breaker, the third call is skipped."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = parse_config(
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          dram: {{kind: memory}}
          gone: {{kind: redis, url: "redis://127.0.0.1:{port}/0", timeout_ms: 2000}}
        orchestrator: {{breaker: {{failures: 2, cooldown_s: 600}}}}
        policy:
          default: {{read: [gone, dram], write: [dram], load: always}}
        """)
    )
    orch = Orchestrator(cfg, MODEL)
    try:
        for seed in range(3):
            assert orch.lookup(prompt(2, seed), RequestContext()).chunks == ()
        v = orch.telemetry.value
        assert v("kvstrata_tier_ops_total", tier="gone", op="contains", result="error") == 2
        assert v("kvstrata_tier_ops_total", tier="gone", op="contains", result="skipped") == 1
        assert (
            v("kvstrata_tier_ops_total", tier="gone", op="lookup", result="miss") == 0
        )  # no answer, no miss
        assert v("kvstrata_tier_ops_total", tier="dram", op="lookup", result="miss") == 6
        assert v("kvstrata_breaker_open", tier="gone") == 1
        (row,) = [
            t for t in rp.summarize({"samples": orch.telemetry.samples()}).tiers if t.tier == "gone"
        ]
        assert (row.errors, row.skipped, row.breaker_open) == (2, 1, True)
    finally:
        orch.close()
