"""Telemetry end to end: vLLM's CPU build with StrataConnector, per-tier hit tokens everywhere.

One engine in this process (vLLM's scheduler and worker roles share one
orchestrator, so one registry and one exporter labelled
``role="scheduler+worker"``) with a DRAM tier and the session's real Redis,
and ``telemetry:`` asking for an exporter on a free port and a snapshot file.
Two prompts, each asked twice: the second time one is served from DRAM, the
other from Redis. The per-tier hit tokens must then show in the Prometheus
exporter, in ``kvstrata stats`` (from the exporter and from the snapshot),
and in the numbers the connector hands to vLLM's stats hooks.
"""

from __future__ import annotations

import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

vllm = pytest.importorskip(
    "vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)"
)

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from kvstrata.cli.stats import stats_app  # noqa: E402
from kvstrata.offline.convert import prepare_smollm2  # noqa: E402
from kvstrata.offline.runner import generate, make_llm, text_tokens  # noqa: E402
from kvstrata.orchestrator import flush_shared, shared_orchestrators  # noqa: E402
from kvstrata.telemetry import exporter  # noqa: E402
from kvstrata.telemetry import report as rp  # noqa: E402

PROMPT_TOKENS = 1500
HIT = (PROMPT_TOKENS - 1) // 256 * 256  # 1280: whole chunks; vLLM computes the last token itself
OFFSETS = {"dram": 70000, "shared": 75000}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, redis_server) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("telemetry-e2e")
    config = tmp / "strata-telemetry.yaml"
    snapshot = tmp / "snapshot-{role}.json"
    config.write_text(
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: 256
        tiers:
          dram: {{kind: memory, capacity_bytes: 1GiB}}
          shared: {{kind: redis, url: "{redis_server.url}", key_prefix: "tel-e2e:"}}
        engine: {{prefill_tokens_per_s: 100}}
        telemetry: {{prometheus_port: 0, snapshot_path: "{snapshot}"}}
        policy:
          default: {{read: [dram], write: [dram]}}
          rules:
            - {{name: via-shared, match: {{hints: {{tier: shared}}}},
               route: {{read: [shared], write: [shared]}}}}
        """)
    )
    return config, tmp / "snapshot-scheduler+worker.json"


@pytest.fixture(scope="module")
def served(setup):
    """Runs the workload once: each prompt stored, then
    served from its tier; shuts the engine down after."""
    from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown, has_kv_transfer_group

    config, _ = setup
    if (
        has_kv_transfer_group()
    ):  # an engine of an earlier module: its worker connector would be reused
        ensure_kv_transfer_shutdown()
    llm = make_llm(prepare_smollm2(progress=False), config, kv_cache_gib=1)
    try:
        yield llm, _workload(llm)
    finally:
        telemetry = _service()[0].telemetry
        # both roles' connectors shut down: the orchestrator closes
        llm.llm_engine.engine_core._finalizer()
        if has_kv_transfer_group():
            ensure_kv_transfer_shutdown()
        exporter.stop(telemetry)


def _workload(llm) -> dict:
    results = {}
    for tier, offset in OFFSETS.items():
        ids = text_tokens(llm.get_tokenizer(), PROMPT_TOKENS, offset=offset)
        hints = {"tier": tier} if tier != "dram" else None
        first = generate(llm, ids, 2, kv_params=hints)
        assert flush_shared(60)
        second = generate(llm, ids, 2, kv_params=hints)
        assert first.num_cached_tokens == 0 and second.num_cached_tokens == HIT
        assert second.kvstrata["loaded_tokens"] == {tier: HIT}
        results[tier] = second
    assert flush_shared(60)
    telemetry = _service()[0].telemetry
    deadline = time.monotonic() + 10  # a load is accounted just after the engine got its data
    while (
        telemetry.value("kvstrata_tokens_total", source="shared") < HIT
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    return results


def _service():
    (orch,) = [
        o
        for o in shared_orchestrators()
        if o.config.path and o.config.path.name == "strata-telemetry.yaml"
    ]
    (service,) = [s for s in exporter.services() if s.telemetry is orch.telemetry]
    return orch, service


def test_exporter_shows_hit_tokens_per_tier(served) -> None:
    orch, service = _service()
    assert service.role == "scheduler+worker" and service.url
    text = urllib.request.urlopen(service.url, timeout=5).read().decode()
    tokens = {
        s.labels["source"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kvstrata_tokens_total"
    }
    assert tokens["dram"] == HIT and tokens["shared"] == HIT
    assert tokens["recompute"] == 2 * PROMPT_TOKENS + 2 * (PROMPT_TOKENS - HIT)
    assert 'role="scheduler+worker"' in text
    assert (
        orch.telemetry.value("kvstrata_tier_ops_total", tier="shared", op="lookup", result="hit")
        == HIT // 256
    )


def _table(output: str) -> dict[str, list[str]]:
    return {row[0]: row for row in map(str.split, output.splitlines()) if row}


def test_stats_command_from_the_exporter_and_a_snapshot(served, setup) -> None:
    _, snapshot = setup
    _, service = _service()
    assert snapshot in exporter.save_snapshots()
    for args in (["--url", service.url], ["--snapshot", str(snapshot)]):
        result = CliRunner().invoke(stats_app, ["stats", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        table = _table(result.output)
        # tier, lookups, hit rate, hit tokens: each tier
        # was asked about 5 chunks twice, and had them once
        assert table["dram"][1:4] == ["10", "50.0%", f"{HIT:,}"], result.output
        assert table["shared"][1:4] == ["10", "50.0%", f"{HIT:,}"], result.output


def test_vllm_stats_hooks_carry_hit_tokens_per_tier(served) -> None:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvstrata.connectors.vllm import StrataConnector
    from kvstrata.connectors.vllm_metrics import StrataStats, tokens_by_source

    worker = get_kv_transfer_group()  # this process's worker-role connector
    assert isinstance(worker, StrataConnector)
    worker.get_kv_connector_stats()  # whatever the last steps had not reported yet
    assert worker.get_kv_connector_stats() is None  # nothing new: nothing sent
    a = StrataStats(
        data={
            "reads": [["dram", 0.01, 1000]],
            "load_error_blocks": 0,
            "telemetry": {
                "counters": [["kvstrata_tokens", ["dram"], HIT]],
                "gauges": [],
                "observations": [],
            },
        }
    )
    b = StrataConnector.build_kv_connector_stats(
        {
            "reads": [],
            "load_error_blocks": 1,
            "telemetry": {
                "counters": [
                    ["kvstrata_tokens", ["shared"], HIT],
                    ["kvstrata_tokens", ["recompute"], 440],
                ],
                "gauges": [],
                "observations": [],
            },
        }
    )
    reduced = a.aggregate(b).reduce()
    assert tokens_by_source(a.data["telemetry"]) == {"dram": HIT, "shared": HIT, "recompute": 440}
    assert reduced["kvstrata_tokens_dram"] == HIT and reduced["kvstrata_tokens_shared"] == HIT
    assert (
        reduced["kvstrata_tokens_recompute"] == 440 and reduced["kvstrata_load_error_blocks"] == 1
    )
    assert reduced["kvstrata_hit_rate"] == round(1 - 440 / (2 * HIT + 440), 3)
    assert list(reduced)[3:5] == [
        "kvstrata_tokens_dram",
        "kvstrata_tokens_shared",
    ]  # tiers before the rest


def test_summary_numbers(served) -> None:
    orch, service = _service()
    summary = rp.summarize(rp.scrape(service.url))
    rows = {t.tier: t for t in summary.tiers}
    assert rows["shared"].bytes_read == orch.model.chunk_bytes(256) * (HIT // 256)
    assert rows["shared"].p50_s is not None and rows["shared"].errors == 0
