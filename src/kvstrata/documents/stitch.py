"""Which prompt tokens come from which document object, and how to assemble their KV.

:func:`plan_stitch` (scheduler side, no I/O) finds the documents a prompt
starts with: the ones a request names, in its order, or -- with detection --
registered documents found one after another from position 0 (by their first
tokens, then verified in full). Every document is verified against the
prompt's token ids; the stitched prefix ends at the first token that is not
part of a registered document in the expected place -- nothing is guessed.
Non-document tokens between documents therefore end the prefix (vLLM computes
the rest normally). The end is rounded down to the engine's block size and
never reaches the last prompt token (vLLM computes at least that one).

Repairs (training-free, docs/documents.md):

* ``none``: every document's KV as computed alone, keys re-rotated to its
  place. Exact for the first document only.
* ``context``: documents after the first use their variant computed after
  the first document (the system prompt), re-rotated by
  ``start - len(context)``: each document attends to the real prompt start
  instead of being its own start (no spurious attention sink). Falls back to
  ``none`` for a document without that variant.
* ``tail``: like ``none``, but the prefix ends where the last document
  starts: vLLM recomputes the last document (and everything after it) with
  full attention to the stitched ones.

:func:`assemble_layer` (worker side) builds one layer's canonical KV for
the stitched token range from fetched objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstrata.documents.corpus import (
    HEAD_TOKENS,
    Corpus,
    DocEntry,
    Manifest,
    head_hash,
    tokens_hash,
)
from kvstrata.documents.rope import Rope

REPAIRS = ("none", "context", "tail")


@dataclass(frozen=True)
class Segment:
    doc: str
    key: bytes  # the object: the document alone, or its variant after a context
    start: int  # prompt position of its first token
    n_tokens: int  # tokens of the object used, from its first
    shift: int  # rotation applied to its keys: start - (context length of the variant)


@dataclass(frozen=True)
class StitchPlan:
    segments: tuple[Segment, ...]
    end: int  # prompt tokens [0, end) come from documents
    repair: str
    reason: str

    @property
    def documents(self) -> list[str]:
        return [s.doc for s in self.segments]


def find_documents(
    prompt: np.ndarray, manifest: Manifest, names: Sequence[str] | None
) -> tuple[list[tuple[DocEntry, int]], str]:
    """The registered documents the prompt starts with, as (entry, start); and why the run ended."""
    found: list[tuple[DocEntry, int]] = []
    pos = 0
    heads = manifest.by_head() if names is None else {}
    for i in range(len(names) if names is not None else len(prompt)):
        if pos >= len(prompt):
            return found, "prompt ends"
        if names is not None:
            entry = manifest.documents.get(str(names[i]))
            if entry is None:
                return found, f"document {names[i]!r} is not registered"
            if tokens_hash(prompt[pos : pos + entry.n_tokens]) != entry.tokens_hash:
                return found, f"document {names[i]!r} is not at prompt position {pos}"
        else:
            candidates = sorted(
                heads.get(head_hash(prompt[pos : pos + HEAD_TOKENS]), ()), key=lambda e: -e.n_tokens
            )
            entry = next(
                (
                    e
                    for e in candidates
                    if tokens_hash(prompt[pos : pos + e.n_tokens]) == e.tokens_hash
                ),
                None,
            )
            if entry is None:
                return found, f"no registered document at prompt position {pos}"
        found.append((entry, pos))
        pos += entry.n_tokens
    return found, "all named documents found" if names is not None else "prompt ends"


def plan_stitch(
    prompt: Sequence[int] | np.ndarray,
    manifest: Manifest,
    names: Sequence[str] | None,
    corpus: Corpus,
    block_size: int,
    repair: str = "none",
) -> StitchPlan:
    """The stitched prefix of ``prompt``: block-aligned, at most ``len(prompt) - 1`` tokens."""
    if repair not in REPAIRS:
        raise ValueError(f"repair must be one of {REPAIRS}, not {repair!r}")
    prompt = np.asarray(prompt, dtype=np.int64)
    found, reason = find_documents(prompt, manifest, names)
    if repair == "tail" and len(found) >= 2:
        found, reason = found[:-1], "tail repair: the last document is recomputed"
    if not found:
        return StitchPlan((), 0, repair, reason)
    stop = found[-1][1] + found[-1][0].n_tokens
    end = min(stop, len(prompt) - 1) // block_size * block_size
    first = found[0][0]
    segments = []
    for entry, start in found:
        if start >= end:
            break
        key, shift = bytes.fromhex(entry.key), start
        ctx_key = (
            entry.contexts.get(first.tokens_hash) if repair == "context" and start > 0 else None
        )
        if ctx_key is not None:
            key, shift = bytes.fromhex(ctx_key), start - first.n_tokens
        segments.append(Segment(entry.id, key, start, min(entry.n_tokens, end - start), shift))
    if end < stop:
        reason += f"; ends at {end} (block-aligned, before the last prompt token)"
    return StitchPlan(tuple(segments), end, repair, reason)


def assemble_layer(
    corpus: Corpus,
    rope: Rope,
    segments: Sequence[Segment],
    objects: Mapping[bytes, object],
    layer: int,
    skip: int,
    end: int,
) -> torch.Tensor:
    """Canonical ``[2, end - skip, H, D]`` float KV of prompt tokens ``[skip, end)`` for one
    layer."""
    m = corpus.model
    out = torch.empty(2, end - skip, m.kv_heads, m.head_dim, dtype=torch.float32)
    for seg in segments:
        lo, hi = max(seg.start, skip), min(seg.start + seg.n_tokens, end)
        if lo >= hi:
            continue
        kv = corpus.layer(objects[seg.key], layer)[:, lo - seg.start : hi - seg.start]
        out[0, lo - skip : hi - skip] = rope.rotate(
            torch.from_numpy(np.array(kv[0], dtype=np.float32)), seg.shift
        )
        out[1, lo - skip : hi - skip] = torch.from_numpy(np.asarray(kv[1], dtype=np.float32))
    return out
