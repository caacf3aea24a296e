"""Real KV for training and measuring codecs: SmolLM2 through transformers on CPython's docs.

The text is CPython's own reference docs (``pydoc_data.topics``, the same
corpus as :func:`kvstrata.offline.runner.text_tokens`), split by characters: the first
70% trains codecs, the last 30% is held out for measuring them.

KV comes from transformers' ``past_key_values``. Like vLLM's paged cache, it
holds K *after* RoPE, so a codec trained here sees what kvstrata stores.
Arrays are canonical ``[n_layers, 2, T, kv_heads, head_dim]`` float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_FRACTION = 0.7


def corpus(part: str) -> str:
    """``"train"`` (first 70% of the docs) or ``"heldout"`` (the rest)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    cut = int(len(text) * TRAIN_FRACTION)
    if part == "train":
        return text[:cut]
    if part == "heldout":
        return text[cut:]
    raise ValueError(f"part must be 'train' or 'heldout', not {part!r}")


def load_model(model_dir: str | Path | None = None):
    """(model, tokenizer) of SmolLM2-135M in float32,
    eval mode (the kvstrata-prepared checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvstrata.offline.convert import prepare_smollm2

    hf_logging.set_verbosity_error()
    path = str(model_dir or prepare_smollm2(progress=False))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def sequences(
    tokenizer, part: str, n_seqs: int, seq_len: int, stride_chars: int | None = None
) -> list[list[int]]:
    """``n_seqs`` token sequences of ``seq_len`` tokens,
    spread evenly over the ``part`` of the corpus."""
    text = corpus(part)
    span = seq_len * 8  # characters that comfortably hold seq_len tokens
    stride = stride_chars or max((len(text) - span) // max(n_seqs, 1), 1)
    out = []
    for i in range(n_seqs):
        ids = tokenizer.encode(text[i * stride : i * stride + span])
        if len(ids) < seq_len:
            raise ValueError("not enough text for that many tokens")
        out.append(ids[:seq_len])
    return out


def cache_to_numpy(past) -> np.ndarray:
    """transformers' cache (batch 1) -> ``[n_layers, 2, T, kv_heads, head_dim]`` float32."""
    if hasattr(past, "layers"):  # transformers >= 4.56: DynamicCache.layers[i].keys / .values
        pairs = [(layer.keys, layer.values) for layer in past.layers]
    elif hasattr(past, "key_cache"):
        pairs = list(zip(past.key_cache, past.value_cache, strict=True))
    else:  # legacy tuple of (k, v)
        pairs = [(k, v) for k, v in past]
    # [B, H, T, D] -> [T, H, D]
    return np.stack(
        [
            np.stack([k[0].transpose(0, 1).float().numpy(), v[0].transpose(0, 1).float().numpy()])
            for k, v in pairs
        ]
    )


def numpy_to_cache(kv: np.ndarray, config):
    """The inverse of :func:`cache_to_numpy`: a DynamicCache holding ``kv`` for batch 1."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer in range(kv.shape[0]):
        k = torch.from_numpy(np.ascontiguousarray(kv[layer, 0].transpose(1, 0, 2)))[None]
        v = torch.from_numpy(np.ascontiguousarray(kv[layer, 1].transpose(1, 0, 2)))[None]
        cache.update(k, v, layer)
    return cache


def capture(model, ids: list[int]) -> np.ndarray:
    """KV of ``ids`` as the model computes it (one forward pass)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    return cache_to_numpy(out.past_key_values)
