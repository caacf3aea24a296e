"""The standalone exporter, enabled from the environment in a process that is not a vLLM server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from kvstrata.config import TelemetryConfig
from kvstrata.telemetry import exporter


def test_the_environment_overrides_the_file_and_bad_values_are_ignored(caplog) -> None:
    base = TelemetryConfig(prometheus_port=9400, snapshot_path="/tmp/a.json")
    got = exporter.settings(
        base,
        {
            "KVSTRATA_TELEMETRY_PROMETHEUS_PORT": "0",
            "KVSTRATA_TELEMETRY_PROMETHEUS_ADDR": "0.0.0.0",
            "KVSTRATA_TELEMETRY_SNAPSHOT_PATH": "",
        },
    )
    assert (got.prometheus_port, got.prometheus_addr, got.snapshot_path) == (0, "0.0.0.0", None)
    assert (
        exporter.settings(base, {"KVSTRATA_TELEMETRY_PROMETHEUS_PORT": "off"}).prometheus_port
        is None
    )
    for bad in ("99999", "-1", "9400; rm -rf /", "1e3"):
        assert exporter.settings(base, {"KVSTRATA_TELEMETRY_PROMETHEUS_PORT": bad}) == base
    assert "not a port" in caplog.text
    assert exporter.settings(None, {}) == TelemetryConfig()
    assert not exporter.requested_by_env({"KVSTRATA_TELEMETRY_PROMETHEUS_PORT": " "})
    assert exporter.requested_by_env({"KVSTRATA_TELEMETRY_PROMETHEUS_PORT": "0"})


SCRIPT = textwrap.dedent("""
    import json, sys, urllib.request
    import numpy as np
    from kvstrata.config import parse_config
    from kvstrata.model import ModelSpec
    from kvstrata.orchestrator import Orchestrator
    from kvstrata.policy.route import RequestContext
    from kvstrata.telemetry import exporter

    config = parse_config(
        "version: 1\\nchunk_tokens: 16\\ntiers: {dram: {kind: memory}}\\n"
        "policy: {default: {read: [dram], write: [dram]}}\\n"
    )
    spec = ModelSpec("tiny", n_layers=2, kv_heads=1, head_dim=4, dtype="float32")
    orch = Orchestrator(config, spec)  # no telemetry section: the environment asks for the exporter
    plan = orch.lookup(list(range(40)), RequestContext())
    (service,) = exporter.services()
    text = urllib.request.urlopen(service.url, timeout=10).read().decode()
    print("RESULT " + json.dumps({"url": service.url, "role": service.role, "text": text}))
    orch.close()
""")


def test_a_process_without_vllm_gets_an_exporter_from_the_environment(tmp_path) -> None:
    script = tmp_path / "lib_user.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KVSTRATA_")}
    env["KVSTRATA_TELEMETRY_PROMETHEUS_PORT"] = "0"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["url"].startswith("http://127.0.0.1:")
    assert out["role"] == "process"
    lookups = [
        x for x in out["text"].splitlines() if x.startswith("kvstrata_") and 'role="process"' in x
    ]
    assert any("lookup" in x for x in lookups), out["text"][:2000]
