"""A model's identity is its weights: SmolLM2 and
perturbed copies of it, through vLLM's own ModelConfig.

Copies of the real checkpoint live in directories with the SAME name
(``a/smollm2``, ``b/smollm2``, ...), so anything keyed by the directory name
would collide. Keys must differ whenever the weights do, and be equal for an
identical copy (so hosts holding the same checkpoint share KV).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kvstrata import fingerprint
from kvstrata.fingerprint import checkpoint_fingerprint, hub_commit, model_identity
from kvstrata.keys import chunk_keys
from kvstrata.offline.convert import prepare_smollm2

TOKENS = list(range(1000, 2000))  # 1,000 prompt tokens: three full 256-token chunks
ONE_TENSOR = "model.layers.7.self_attn.k_proj.weight"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)  # a byte copy: new inode, new mtime
    return dst


def _rewrite(path: Path, change) -> None:
    """Load the safetensors file at ``path``, apply ``change(tensors)``, save it back in place."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _scale_kv(tensors: dict[str, np.ndarray]) -> None:
    for name in tensors:
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name] * np.float32(1.05)


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """original; same (identical copy); kv (k/v projections
    x1.05); one (one tensor changed); all named smollm2."""
    original = prepare_smollm2(progress=False)
    root = tmp_path_factory.mktemp("identity")
    out = {"original": original}
    for name in ("same", "kv", "one"):
        out[name] = _copy(original, root / name / "smollm2")
    _rewrite(out["kv"] / "model.safetensors", _scale_kv)

    def one(tensors):
        tensors[ONE_TENSOR] = tensors[ONE_TENSOR] + np.float32(1e-3)

    _rewrite(out["one"] / "model.safetensors", one)
    return out


@pytest.fixture(scope="module")
def spec_of():
    """The connector's own ModelSpec
    (kvstrata.connectors.vllm_setup.model_spec) from vLLM's ModelConfig."""
    from vllm.config import ModelConfig, ParallelConfig

    from kvstrata.connectors.vllm_setup import model_spec

    def make(model_dir: Path, **extra):
        mc = ModelConfig(model=str(model_dir), dtype="float32")
        vllm_config = SimpleNamespace(
            model_config=mc,
            parallel_config=ParallelConfig(),
            cache_config=SimpleNamespace(cache_dtype="auto"),
        )
        return model_spec(vllm_config, extra)

    return make


def keys(spec, tenant: str = "") -> list:
    return chunk_keys(TOKENS, spec.namespace(tenant), 256)


def test_different_weights_in_same_named_directories_share_no_key(checkpoints, spec_of) -> None:
    same, kv, one = (spec_of(checkpoints[n]) for n in ("same", "kv", "one"))
    assert same.name == kv.name == one.name  # the label (what policies match) is the same...
    assert len({same.identity, kv.identity, one.identity}) == 3  # ...the identity is not
    assert len(keys(same)) == 3
    assert not set(keys(same)) & set(keys(kv))
    assert not set(keys(same)) & set(keys(one))
    assert not set(keys(kv)) & set(keys(one))


def test_an_identical_copy_shares_every_key(checkpoints, spec_of) -> None:
    """Another directory name, another file (inode, mtime):
    same weights, same keys -- cross-host sharing."""
    original, same = spec_of(checkpoints["original"]), spec_of(checkpoints["same"])
    assert original.name != same.name  # smollm2-135m-instruct/... vs smollm2/...
    assert original.identity == same.identity and keys(original) == keys(same)


def test_one_changed_tensor_is_found_though_the_header_is_unchanged(checkpoints) -> None:
    """A fine-tune of one tensor keeps every shape and
    offset: only sampling every tensor catches it."""
    a, b = checkpoints["same"] / "model.safetensors", checkpoints["one"] / "model.safetensors"
    assert _header(a) == _header(b) and a.stat().st_size == b.stat().st_size
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)


def test_model_id_is_the_operators_override(checkpoints, spec_of) -> None:
    same, kv = (
        spec_of(checkpoints["same"], model_id="smollm2-ft"),
        spec_of(checkpoints["kv"], model_id="smollm2-ft"),
    )
    assert same.name == kv.name == "smollm2-ft" and same.identity == kv.identity == ""
    assert keys(same) == keys(kv)


def test_corpus_precompute_uses_the_connectors_identity(checkpoints, spec_of) -> None:
    from transformers import AutoConfig

    from kvstrata.offline.precompute import model_spec_for

    for name in ("same", "kv"):
        corpus = model_spec_for(checkpoints[name], AutoConfig.from_pretrained(checkpoints[name]))
        assert corpus.namespace() == spec_of(checkpoints[name]).namespace()


def test_an_update_in_place_changes_the_fingerprint(checkpoints, tmp_path, monkeypatch) -> None:
    """Memoized by path+size+mtime+inode: unchanged files are not read again; replaced ones are."""
    model = _copy(checkpoints["same"], tmp_path / "smollm2")
    reads = []
    real = fingerprint._hash_file
    monkeypatch.setattr(fingerprint, "_hash_file", lambda h, p: (reads.append(p.name), real(h, p)))
    before = checkpoint_fingerprint(model)
    assert (
        checkpoint_fingerprint(model) == before and len(reads) == 2
    )  # config.json + weights, once
    shutil.copyfile(checkpoints["kv"] / "model.safetensors", model / "model.safetensors")
    assert checkpoint_fingerprint(model) == checkpoint_fingerprint(checkpoints["kv"]) != before
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert checkpoint_fingerprint(model) != checkpoint_fingerprint(checkpoints["kv"])


def test_hub_models_are_named_by_their_snapshot_commit(tmp_path, monkeypatch) -> None:
    """A hub id resolves through the local cache's refs to the snapshot commit (no network)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=64, vocab_size=100)
    assert hub_commit("acme/tiny") == commit and hub_commit("acme/tiny", "main") == commit
    assert model_identity("acme/tiny", hf) == f"LlamaForCausalLM/h64/v100/rev:{commit}"
    other = "f" * 40  # an explicit commit is its own answer
    assert model_identity("acme/tiny", hf, other) == f"LlamaForCausalLM/h64/v100/rev:{other}"
    assert model_identity("acme/absent", hf, "v2") == "LlamaForCausalLM/h64/v100/hub:acme/absent@v2"
    # the snapshot directory given as a path is the same model as the hub id
    assert (
        model_identity(str(repo / "snapshots" / commit), hf)
        == f"LlamaForCausalLM/h64/v100/rev:{commit}"
    )


@pytest.mark.slow
def test_a_shared_store_never_serves_one_checkpoints_kv_to_another(checkpoints, tmp_path) -> None:
    """The issue's scenario, through vLLM: three engines
    in turn on one disk store, 1,000-token prompt.

    ``same/smollm2`` writes; ``kv/smollm2`` (same directory name, k/v projections scaled) must load
    nothing; the original (another directory name, the same weights) must load every whole chunk.
    """
    from kvstrata.offline.runner import generate, running_llm, text_tokens
    from kvstrata.orchestrator import flush_shared

    config = tmp_path / "strata.yaml"
    config.write_text(
        "version: 1\nchunk_tokens: 256\ntiers:\n"
        f'  local: {{kind: disk, path: "{tmp_path / "kv"}"}}\n'
        "policy:\n  default: {read: [local], write: [local]}\n"
    )
    runs = {}
    for name in ("same", "kv", "original"):
        with running_llm(checkpoints[name], config, kv_cache_gib=1) as llm:
            ids = text_tokens(llm.get_tokenizer(), 1000, offset=3000)
            runs[name] = generate(llm, ids, 8)
            assert flush_shared(60)
    hit = 999 // 256 * 256  # whole chunks; vLLM computes the last token itself
    assert runs["same"].num_cached_tokens == 0
    assert runs["kv"].num_cached_tokens == 0, runs[
        "kv"
    ].kvstrata  # the old, name-based keys loaded 768
    assert runs["original"].num_cached_tokens == hit and runs["original"].kvstrata[
        "loaded_tokens"
    ] == {"local": hit}
    assert runs["original"].token_ids == runs["same"].token_ids
