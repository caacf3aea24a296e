"""Stitched document prefixes served through vLLM's CPU build (SmolLM2-135M), corpus in real S3
(SeaweedFS).

The reference is full prefill by the same engine (a request that names no
documents: computed normally; vLLM's prefix cache is off and the connector's
default route stores nothing). A prompt that begins with a single document is
the one case where stitching is exact: the greedy tokens must be identical.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)"
)

from kvstrata import runtime  # noqa: E402
from kvstrata.config import load_config  # noqa: E402
from kvstrata.offline.convert import prepare_smollm2  # noqa: E402
from kvstrata.offline.runner import generate, running_llm, text_tokens  # noqa: E402

BLOCK = 128


def config_text(s3) -> str:
    return textwrap.dedent(f"""\
        version: 1
        tiers:
          dram: {{kind: memory, capacity_bytes: 64MiB}}
          cold:
            kind: s3
            endpoint: "{s3.endpoint}"
            bucket: {s3.bucket}
            prefix: documents-e2e/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
        policy:
          default: {{read: [dram], write: []}}
        documents: {{corpus: e2e}}
        """)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_server):
    """The corpus precomputed into S3 (the default documents tier), then one engine with the
    connector."""
    from kvstrata.offline.precompute import add_documents, open_corpus

    model_dir = prepare_smollm2(progress=False)
    path = tmp_path_factory.mktemp("docs-e2e") / "strata.yaml"
    path.write_text(config_text(s3_server))
    corpus, computer = open_corpus(load_config(path), model_dir, threads=1)
    tok = computer.tokenizer
    docs = {"alpha": text_tokens(tok, 400, 7000), "beta": text_tokens(tok, 300, 21000)}
    texts = [(name, tok.decode(ids)) for name, ids in docs.items()]
    add_documents(corpus, texts, computer, context_id="alpha")
    ids = {name: computer.tokens(t) for name, t in texts}
    question = computer.tokens("\n\nQuestion: what is this text about? Answer:")
    with running_llm(model_dir, path, kv_cache_gib=1) as llm:
        yield llm, ids, question, corpus, computer


def test_single_document_prefix_is_exact(setup) -> None:
    llm, ids, question, *_ = setup
    prompt = ids["alpha"] + question
    full = generate(llm, prompt, 16)
    assert full.num_cached_tokens == 0
    stitched = generate(llm, prompt, 16, kv_params={"kvstrata": {"documents": ["alpha"]}})
    expected = len(ids["alpha"]) // BLOCK * BLOCK
    assert stitched.num_cached_tokens == expected
    assert stitched.kvstrata["loaded_tokens"] == {"documents": expected}
    assert stitched.token_ids == full.token_ids


def test_two_documents_are_stitched_and_repairs_change_what_is_loaded(setup) -> None:
    llm, ids, question, *_ = setup
    prompt = ids["alpha"] + ids["beta"] + question
    names = {"documents": ["alpha", "beta"]}
    both = len(ids["alpha"] + ids["beta"]) // BLOCK * BLOCK
    plain = generate(llm, prompt, 2, kv_params={"kvstrata": names})
    assert plain.num_cached_tokens == both and plain.kvstrata["documents"] == ["alpha", "beta"]
    tail = generate(llm, prompt, 2, kv_params={"kvstrata": {**names, "repair": "tail"}})
    assert tail.num_cached_tokens == len(ids["alpha"]) // BLOCK * BLOCK
    assert tail.kvstrata["documents"] == ["alpha"] and tail.kvstrata["repair"] == "tail"


def transformers_greedy(
    computer, segments: list[tuple[list[int], int, np.ndarray]], rest: list[int], n: int
):
    """Greedy tokens of transformers continuing from stitched KV: (tokens, start, KV computed
    at 0..) per segment."""
    from kvstrata.documents import Rope
    from kvstrata.offline.capture import numpy_to_cache

    rope = Rope.from_config(computer.model.config)
    parts = []
    for _, shift, kv in segments:
        kv = kv.copy()
        for layer in range(kv.shape[0]):
            kv[layer, 0] = rope.rotate(torch.from_numpy(kv[layer, 0]), shift).numpy()
        parts.append(kv)
    cache = numpy_to_cache(np.concatenate(parts, axis=2), computer.model.config)
    out, feed = [], list(rest)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than two threads fighting over a shared machine's cores
    with torch.no_grad():
        for _ in range(n):
            logits = computer.model(
                torch.tensor([feed]), past_key_values=cache, use_cache=True
            ).logits
            feed = [int(logits[0, -1].argmax())]
            out.append(feed[0])
    torch.set_num_threads(threads)
    return tuple(out)


@pytest.mark.parametrize("repair", ["none", "context"])
def test_two_stitched_documents_give_what_transformers_gives_from_the_same_kv(
    setup, repair: str
) -> None:
    """Re-rotation and placement at a non-zero offset, through vLLM: the reference is transformers
    continuing from the very KV the stitch should produce (alpha alone; beta alone moved to its
    place, or beta computed after alpha)."""
    llm, ids, question, _, computer = setup
    a, b = ids["alpha"], ids["beta"]
    prompt = a + b + question
    end = len(a + b) // BLOCK * BLOCK
    kv_a = computer.kv(a)
    kv_b = computer.kv(b, context=a) if repair == "context" else computer.kv(b)
    shift_b = 0 if repair == "context" else len(a)
    expected = transformers_greedy(
        computer, [(a, 0, kv_a), (b, shift_b, kv_b[:, :, : end - len(a)])], prompt[end:], 8
    )
    got = generate(
        llm, prompt, 8, kv_params={"kvstrata": {"documents": ["alpha", "beta"], "repair": repair}}
    )
    assert got.num_cached_tokens == end
    assert got.token_ids == expected


@pytest.fixture(scope="module")
def beta_full(setup):
    """Full prefill of beta + question (the reference of the tests below)."""
    llm, ids, question, *_ = setup
    prompt = ids["beta"] + question
    return prompt, generate(llm, prompt, 8)


def test_documents_not_where_named_are_computed_normally(setup, beta_full) -> None:
    llm, ids, question, *_ = setup
    prompt, full = beta_full
    wrong = generate(
        llm, prompt, 8, kv_params={"kvstrata": {"documents": ["alpha"]}}
    )  # alpha is not at 0
    assert wrong.num_cached_tokens == 0 and wrong.token_ids == full.token_ids
    unnamed = generate(llm, ids["alpha"] + question, 1)  # detection is off by default
    assert unnamed.num_cached_tokens == 0


def test_a_missing_document_object_is_recomputed(setup, beta_full) -> None:
    llm, _, _, corpus, _ = setup
    prompt, full = beta_full
    manifest = runtime.run(corpus.load_manifest())
    from kvstrata.keys import ChunkKey
    from kvstrata.orchestrator import shared_orchestrators

    (orch,) = shared_orchestrators()
    before = orch.telemetry.value(
        "kvstrata_tier_ops_total", tier="documents", op="stitch", result="error"
    )
    key = ChunkKey.from_hex(manifest.documents["beta"].key)
    runtime.run(corpus.store.calls.tiers[corpus.tiers[0]].delete([key]))
    again = generate(llm, prompt, 8, kv_params={"kvstrata": {"documents": ["beta"]}})
    assert again.token_ids == full.token_ids
    # the stitch failed and was reported (vLLM recomputed the blocks), it did not just happen
    # to work
    assert (
        orch.telemetry.value(
            "kvstrata_tier_ops_total", tier="documents", op="stitch", result="error"
        )
        == before + 1
    )
