"""Computing documents' KV once with the real model (transformers), and registering them.

:func:`add_documents` tokenizes each document with the model's tokenizer (no
special tokens: a document is a piece of a prompt, not a prompt), computes
its KV alone at positions 0.. (and, with ``context``, also after that
context), stores it and updates the manifest after every document, so an
interrupted run resumes where it stopped. A document whose text and model are
unchanged and whose objects are still stored is skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstrata import runtime
from kvstrata.documents.corpus import Corpus, DocEntry, Manifest, head_hash, tokens_hash
from kvstrata.documents.rope import Rope
from kvstrata.model import ModelSpec

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".html", ".json", ".csv")


@dataclass(frozen=True)
class Added:
    id: str
    n_tokens: int
    status: str  # "added" | "changed" | "unchanged" | "context"


def model_spec_for(
    model_dir: str | Path, config, model_id: str | None = None, dtype: str = "float32"
) -> ModelSpec:
    """The ModelSpec vLLM's connector derives for this checkpoint
    (kvstrata.connectors.vllm_setup)."""
    from kvstrata.fingerprint import model_identity, model_label

    name = model_id or model_label(str(model_dir), config)
    identity = "" if model_id else model_identity(str(model_dir), config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSpec(
        name, config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype, identity
    )


def read_documents(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(id, text) of files and of the text files under directories; the id is the path as
    given/relative."""
    out: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            for f in sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
            ):
                out.append((str(f.relative_to(path)), f.read_text(encoding="utf-8")))
        else:
            out.append((path.name, path.read_text(encoding="utf-8")))
    return out


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Precomputer:
    """Computes document KV with a transformers model (float32, eval mode)."""

    def __init__(self, model, tokenizer, threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        # torch's intra-op threads for the forward passes (None: torch's default). On a small shared
        # machine one thread can be several times faster than spin-waiting for a busy second core.
        self.threads = threads

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def kv(self, tokens: Sequence[int], context: Sequence[int] = ()) -> np.ndarray:
        """KV of ``tokens`` computed after ``context`` (alone if empty): ``[L, 2, T, H, D]``
        float32."""
        import torch

        from kvstrata.offline.capture import capture

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            full = capture(self.model, list(context) + list(tokens))
        finally:
            torch.set_num_threads(before)
        return full[:, :, len(context) :]


def add_documents(
    corpus: Corpus,
    documents: Sequence[tuple[str, str]],
    computer: Precomputer,
    context_id: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    force: bool = False,
) -> list[Added]:
    """Register ``(id, text)`` documents; with ``context_id`` also compute each after that
    document."""
    manifest: Manifest = runtime.run(corpus.load_manifest())
    results: list[Added] = []
    context: list[int] = []
    if context_id is not None:  # the context itself is registered first (alone: it starts prompts)
        texts = dict(documents)
        if context_id not in texts:
            raise ValueError(
                f"the context document {context_id!r} must be among the documents given"
            )
        results.append(
            _add_one(corpus, manifest, computer, context_id, texts[context_id], (), force)
        )
        context = computer.tokens(texts[context_id])
    for i, (doc_id, text) in enumerate(documents):
        if progress:
            progress(doc_id, i, len(documents))
        if doc_id == context_id:
            continue
        results.append(_add_one(corpus, manifest, computer, doc_id, text, context, force))
    if progress:
        progress("", len(documents), len(documents))
    return results


def _add_one(
    corpus: Corpus,
    manifest: Manifest,
    computer: Precomputer,
    doc_id: str,
    text: str,
    context: Sequence[int],
    force: bool,
) -> Added:
    chash = content_hash(text)
    old = manifest.documents.get(doc_id)
    ctx_hash = tokens_hash(context) if context else ""
    if old is not None and old.content_hash == chash and not force:
        alone_ok = runtime.run(corpus.contains(corpus.doc_key(old.tokens_hash)))
        ctx_ok = not ctx_hash or (
            ctx_hash in old.contexts
            and runtime.run(corpus.contains(corpus.doc_key(old.tokens_hash, ctx_hash)))
        )
        if alone_ok and ctx_ok:
            return Added(doc_id, old.n_tokens, "unchanged")
        if alone_ok:  # only the context variant is missing
            key = corpus.doc_key(old.tokens_hash, ctx_hash)
            runtime.run(corpus.put(key, computer.kv(computer.tokens(text), context)))
            manifest.documents[doc_id] = DocEntry(
                **{**old.__dict__, "contexts": {**old.contexts, ctx_hash: str(key)}}
            )
            runtime.run(corpus.save_manifest(manifest))
            return Added(doc_id, old.n_tokens, "context")
    tokens = computer.tokens(text)
    if not tokens:
        raise ValueError(f"document {doc_id!r} has no tokens")
    th = tokens_hash(tokens)
    key = corpus.doc_key(th)
    runtime.run(corpus.put(key, computer.kv(tokens)))
    contexts = {}
    if ctx_hash:
        ckey = corpus.doc_key(th, ctx_hash)
        runtime.run(corpus.put(ckey, computer.kv(tokens, context)))
        contexts[ctx_hash] = str(ckey)
    manifest.documents[doc_id] = DocEntry(
        doc_id, chash, th, head_hash(tokens), len(tokens), str(key), contexts
    )
    runtime.run(
        corpus.save_manifest(manifest)
    )  # after every document: an interrupted run resumes here
    return Added(doc_id, len(tokens), "changed" if old is not None else "added")


def open_corpus(
    config,
    model_dir: str | Path,
    model_id: str | None = None,
    name: str | None = None,
    threads: int | None = None,
):
    """(corpus, precomputer) for a configuration and a checkpoint directory: the CLI's and
    benchmarks' entry. The corpus reads and writes through an orchestrator of ``config``."""
    from kvstrata.documents.corpus import corpus_tiers
    from kvstrata.offline.capture import load_model
    from kvstrata.orchestrator import Orchestrator

    model, tokenizer = load_model(model_dir)
    spec = model_spec_for(model_dir, model.config, model_id)
    orch = Orchestrator(config, spec)
    rope = Rope.from_config(model.config)
    corpus = Corpus(
        name or config.documents.corpus, spec, orch.whole, corpus_tiers(config), rope.describe()
    )
    return corpus, Precomputer(model, tokenizer, threads)
