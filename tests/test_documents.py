"""Per-document KV: exact position correction, precompute (resumable, change-aware), stitch
planning, CLI.

Real model (SmolLM2-135M through transformers), real text (CPython's
``pydoc_data.topics``), a real disk tier. No vLLM here (tests/test_documents_vllm.py).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstrata import runtime
from kvstrata.config import parse_config
from kvstrata.documents import Corpus, Rope, plan_stitch, tokens_hash
from kvstrata.offline.precompute import Precomputer, add_documents, model_spec_for
from kvstrata.orchestrator import Orchestrator

SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "head_dim": 64,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}


# -- the rotation itself ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPTJForCausalLM"])
def test_rerotation_moves_keys_exactly(arch: str) -> None:
    rope = Rope.from_config({**SMOLLM2, "architectures": [arch]})
    assert rope.style == ("neox" if arch.startswith("Llama") else "gptj")
    x = np.random.default_rng(0).standard_normal((300, 3, 64))
    positions = np.arange(300)
    for shift in (1, 257, 3001, 7777):
        moved = rope.rotate(rope.apply(x, positions), shift)
        direct = rope.apply(x, positions + shift)
        assert torch.allclose(moved, direct, rtol=0, atol=1e-10), shift
    # and the rotation is not the identity (the test could fail)
    assert not torch.allclose(
        rope.rotate(rope.apply(x, positions), 5), rope.apply(x, positions), atol=1e-3
    )


def test_rope_refuses_what_it_cannot_move_exactly() -> None:
    from kvstrata.documents import UnsupportedRope

    with pytest.raises(UnsupportedRope):
        Rope.from_config(
            {**SMOLLM2, "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2}}
        )
    with pytest.raises(UnsupportedRope):
        Rope.from_config({**SMOLLM2, "architectures": ["SomethingElse"]})


# -- with the real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    from kvstrata.offline.capture import load_model
    from kvstrata.offline.convert import prepare_smollm2

    model_dir = prepare_smollm2(progress=False)
    model, tokenizer = load_model(model_dir)
    return model_dir, model, tokenizer


def text(tokenizer, n_tokens: int, offset: int) -> list[int]:
    from kvstrata.offline.runner import text_tokens

    return text_tokens(tokenizer, n_tokens, offset=offset)


def test_first_layer_stitched_keys_equal_keys_computed_in_place(hf) -> None:
    """Layer 0's K and V depend only on the token and its position: re-rotation must reproduce
    them."""
    _, model, tokenizer = hf
    rope = Rope.from_config(model.config)
    computer = Precomputer(model, tokenizer, threads=1)
    prefix, doc = text(tokenizer, 300, 1000), text(tokenizer, 200, 30000)
    in_place = computer.kv(doc, context=prefix)[0]  # [2, T, H, D], positions 300..499
    alone = computer.kv(doc)[0]  # positions 0..299
    stitched_k = rope.rotate(torch.from_numpy(alone[0]), len(prefix)).numpy()
    scale = np.abs(in_place[0]).max()
    assert np.abs(stitched_k - in_place[0]).max() <= 1e-4 * scale
    assert np.abs(alone[1] - in_place[1]).max() <= 1e-5 * np.abs(in_place[1]).max()
    # without the correction the keys are far off: the test can fail
    assert np.abs(alone[0] - in_place[0]).max() > 0.1 * scale


def corpus_config(tmp: Path) -> str:
    return textwrap.dedent(f"""\
        version: 1
        tiers:
          dram: {{kind: memory, capacity_bytes: 1GiB}}
          corpus_disk: {{kind: disk, path: "{tmp / "corpus"}"}}
        documents: {{tiers: [corpus_disk], corpus: test}}
        """)


def open_test_corpus(tmp: Path, hf) -> tuple[Corpus, Precomputer]:
    model_dir, model, tokenizer = hf
    config = parse_config(corpus_config(tmp))
    from kvstrata.documents import corpus_tiers

    spec = model_spec_for(model_dir, model.config)
    orch = Orchestrator(config, spec)  # new tier objects, as a new process would have
    rope = Rope.from_config(model.config).describe()
    corpus = Corpus("test", spec, orch.whole, corpus_tiers(config), rope)
    return corpus, Precomputer(model, tokenizer, threads=1)


def test_precompute_is_resumable_and_recomputes_only_changed_documents(tmp_path, hf) -> None:
    _, _, tokenizer = hf
    docs = [(f"doc{i}", tokenizer.decode(text(tokenizer, 100, 5000 + 4000 * i))) for i in range(3)]
    corpus, computer = open_test_corpus(tmp_path, hf)
    assert [r.status for r in add_documents(corpus, docs[:2], computer)] == ["added", "added"]
    # a new process (new tier objects): the first two are found, the third is added
    corpus, computer = open_test_corpus(tmp_path, hf)
    assert [r.status for r in add_documents(corpus, docs, computer)] == [
        "unchanged",
        "unchanged",
        "added",
    ]
    changed = [docs[0], (docs[1][0], docs[1][1] + " One more sentence."), docs[2]]
    assert [r.status for r in add_documents(corpus, changed, computer)] == [
        "unchanged",
        "changed",
        "unchanged",
    ]
    manifest = runtime.run(corpus.load_manifest())
    assert sorted(manifest.documents) == ["doc0", "doc1", "doc2"]
    entry = manifest.documents["doc1"]
    ids = computer.tokens(changed[1][1])
    assert entry.tokens_hash == tokens_hash(ids) and entry.n_tokens == len(ids)
    (obj,) = runtime.run(corpus.get([corpus.doc_key(entry.tokens_hash)]))
    stored = np.stack([corpus.layer(obj, layer) for layer in range(corpus.model.n_layers)])
    assert np.array_equal(
        stored, computer.kv(ids)
    )  # what was stored is the model's KV, bit for bit
    # context variants: computed once for every other document, then skipped
    statuses = [r.status for r in add_documents(corpus, changed, computer, context_id="doc0")]
    assert statuses == ["unchanged", "context", "context"]
    statuses = [r.status for r in add_documents(corpus, changed, computer, context_id="doc0")]
    assert statuses == ["unchanged"] * 3
    manifest = runtime.run(corpus.load_manifest())
    ctx = manifest.documents["doc0"].tokens_hash
    assert set(manifest.documents["doc2"].contexts) == {ctx}


def test_stitch_plan_verifies_documents_and_never_guesses(tmp_path, hf) -> None:
    _, _, tokenizer = hf
    docs = {
        "sys": text(tokenizer, 40, 100),
        "a": text(tokenizer, 150, 8000),
        "b": text(tokenizer, 140, 16000),
    }
    corpus, computer = open_test_corpus(tmp_path, hf)
    add_documents(
        corpus, [(k, tokenizer.decode(v)) for k, v in docs.items()], computer, context_id="sys"
    )
    manifest = runtime.run(corpus.load_manifest())
    ids = {k: computer.tokens(tokenizer.decode(v)) for k, v in docs.items()}
    question = text(tokenizer, 50, 50000)
    prompt = ids["sys"] + ids["a"] + ids["b"] + question
    n_sys, n_a, n_b = len(ids["sys"]), len(ids["a"]), len(ids["b"])

    plan = plan_stitch(prompt, manifest, ["sys", "a", "b"], corpus, 128)
    assert plan.documents == ["sys", "a", "b"]
    assert plan.end == (n_sys + n_a + n_b) // 128 * 128
    assert [(s.start, s.shift) for s in plan.segments] == [
        (0, 0),
        (n_sys, n_sys),
        (n_sys + n_a, n_sys + n_a),
    ]
    assert (
        plan_stitch(prompt, manifest, None, corpus, 128).end == plan.end
    )  # detection finds the same
    # context repair: later documents use their variant computed after "sys", shifted by
    # start - len(sys)
    ctx = plan_stitch(prompt, manifest, ["sys", "a", "b"], corpus, 128, repair="context")
    assert [s.shift for s in ctx.segments] == [0, 0, n_a]
    assert ctx.segments[1].key != plan.segments[1].key
    # tail repair: the last document is left to the engine
    assert (
        plan_stitch(prompt, manifest, ["sys", "a", "b"], corpus, 128, repair="tail").end
        == (n_sys + n_a) // 128 * 128
    )
    # wrong order, unknown names, tokens between documents: the prefix ends there
    assert plan_stitch(prompt, manifest, ["sys", "b", "a"], corpus, 128).end == 0
    assert plan_stitch(prompt, manifest, ["nope"], corpus, 128).end == 0
    gap = ids["sys"] + ids["a"] + [198] + ids["b"] + question
    assert (
        plan_stitch(gap, manifest, ["sys", "a", "b"], corpus, 128).end == (n_sys + n_a) // 128 * 128
    )
    assert plan_stitch(gap, manifest, None, corpus, 128).documents == ["sys", "a"]
    # a prompt that is only documents: the last token is left to the engine (block size 1 to see it)
    only = ids["sys"] + ids["a"]
    assert plan_stitch(only, manifest, ["sys", "a"], corpus, 1).end == len(only) - 1


def test_cli_corpus_add_and_list(tmp_path, hf) -> None:
    from typer.testing import CliRunner

    from kvstrata.cli.main import app

    model_dir, _, tokenizer = hf
    (tmp_path / "docs").mkdir()
    for i in range(2):
        (tmp_path / "docs" / f"d{i}.txt").write_text(
            tokenizer.decode(text(tokenizer, 100, 3000 * (i + 1)))
        )
    config = tmp_path / "strata.yaml"
    config.write_text(corpus_config(tmp_path))
    runner = CliRunner()
    args = [
        "corpus",
        "add",
        str(tmp_path / "docs"),
        "--config",
        str(config),
        "--model-dir",
        str(model_dir),
        "--threads",
        "1",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 added" in first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 unchanged" in again.output, again.output
    listing = runner.invoke(
        app, ["corpus", "list", "--config", str(config), "--model-dir", str(model_dir)]
    )
    assert listing.exit_code == 0 and "d0.txt" in listing.output and "d1.txt" in listing.output, (
        listing.output
    )


def test_scheduler_branch_plans_stitches_and_ignores_malformed_requests(tmp_path, hf) -> None:
    """The connector's scheduler-side documents branch on request values (no engine needed)."""
    from types import SimpleNamespace

    from kvstrata.config import DocumentsConfig
    from kvstrata.documents.connector import DocumentScheduler

    _, _, tokenizer = hf
    corpus, computer = open_test_corpus(tmp_path, hf)
    docs = [
        ("sys", tokenizer.decode(text(tokenizer, 60, 100))),
        ("a", tokenizer.decode(text(tokenizer, 150, 9000))),
    ]
    add_documents(corpus, docs, computer)
    ids = {k: computer.tokens(v) for k, v in docs}
    prompt = ids["sys"] + ids["a"] + text(tokenizer, 40, 60000)
    sched = DocumentScheduler(corpus, DocumentsConfig(), 128)

    def request(rid: str, params) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, kv_transfer_params=params)

    named = request("r1", {"kvstrata": {"documents": ["sys", "a"]}})
    assert sched.match(named, 0) == (len(ids["sys"]) + len(ids["a"])) // 128 * 128
    assert sched.handles("r1")
    assert sched.finished(named)["kvstrata"]["documents"] == ["sys", "a"]
    assert not sched.handles("r1")
    for bad in (
        None,
        {},
        {"kvstrata": "x"},
        {"kvstrata": {"documents": "sys"}},
        {"kvstrata": {"documents": []}},
        {"kvstrata": {"documents": ["sys"], "repair": "magic"}},
        {"kvstrata": {"documents": ["nope"]}},
    ):
        assert sched.match(request("r2", bad), 0) is None, (
            bad
        )  # exact computation, never an exception
    assert not sched.handles("r2")
    # the engine already holds the stitched part: still a document request (never saved),
    # nothing to load
    assert sched.match(request("r3", {"kvstrata": {"documents": ["sys", "a"]}}), 256) == 0
    assert sched.handles("r3")
    detecting = DocumentScheduler(corpus, DocumentsConfig(detect=True), 128)
    assert detecting.match(request("r4", None), 0) == (len(ids["sys"]) + len(ids["a"])) // 128 * 128


def test_documents_use_the_orchestrator_and_connectors_no_private_attributes() -> None:
    # documents' I/O goes through the orchestrator (breaker, timeout, metrics, codecs), and the
    # connector builds the documents branch instead of reaching into other objects' internals
    import ast

    import kvstrata

    root = Path(kvstrata.__file__).parent
    for path in sorted((root / "documents").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("kvstrata.tiers") for n in names), (path.name, names)
    for path in sorted([*(root / "connectors").glob("*.py"), *(root / "documents").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            assert own, f"{path.name}:{node.lineno} reaches into .{node.attr}"
