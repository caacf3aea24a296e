"""Moving post-RoPE keys to another position, exactly.

Rotary embeddings rotate each pair of a key's dimensions by the angle
``position * inv_freq[j]``. Rotations of one plane compose by adding their
angles, so a key computed at position ``i`` and rotated once more by
``p * inv_freq`` equals the key computed at ``i + p``::

    R(p) . RoPE(x, i) = RoPE(x, i + p)

That is why a document's KV can be stored as the model computes it (keys
after RoPE, at positions from 0, exactly what the engine's pages hold) and
still be placed at any offset: only the keys move, values carry no position.
The angles are computed in float64 and applied in float32, so the result is
as close to the engine's own RoPE as the engine's float32 angles are to the
exact ones.

Pairs: ``neox`` style (Llama, Mistral, Qwen: dimension ``j`` with ``j + D/2``,
transformers' ``rotate_half``, vLLM's ``is_neox_style=True``) or ``gptj``
style (``2j`` with ``2j + 1``). Only position-independent frequencies are
supported (rope types ``default`` and ``linear``/``llama3``, whose
``inv_freq`` is fixed); scaling that depends on the sequence length (dynamic
NTK) or rescales the rotated vectors (YaRN's attention factor) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

NEOX_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
        "GraniteForCausalLM",
    }
)
GPTJ_ARCHITECTURES = frozenset({"GPTJForCausalLM", "ChatGLMModel"})


class UnsupportedRope(ValueError):
    """The model's position encoding cannot be moved exactly (documents are disabled for it)."""


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of a model's keys: frequencies and pairing."""

    inv_freq: tuple[float, ...]  # head_dim / 2 frequencies, float64
    style: str  # "neox" | "gptj"

    @property
    def head_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def describe(self) -> dict[str, Any]:
        """What a manifest records: equal descriptions mean equal rotations."""
        return {
            "style": self.style,
            "head_dim": self.head_dim,
            "inv_freq_sha": _sha(np.asarray(self.inv_freq, dtype="<f8").tobytes()),
        }

    @classmethod
    def from_config(cls, config: Any) -> Rope:
        """From a transformers (or vLLM ``hf_config``) model configuration, or its dict."""
        get = (
            (lambda k, d=None: config.get(k, d))
            if isinstance(config, dict)
            else (lambda k, d=None: getattr(config, k, d))
        )
        params = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = float(params.get("rope_theta") or get("rope_theta") or 10000.0)
        kind = params.get("rope_type") or params.get("type") or "default"
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        if float(get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise UnsupportedRope("partial rotary embeddings are not supported")
        inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if kind == "linear":
            inv = inv / float(params["factor"])
        elif kind == "llama3":
            inv = _llama3(inv, params)
        elif kind != "default":
            raise UnsupportedRope(f"rope type {kind!r} depends on length or rescales keys")
        archs = set(get("architectures") or ())
        if archs & NEOX_ARCHITECTURES:
            style = "neox"
        elif archs & GPTJ_ARCHITECTURES:
            style = "gptj"
        else:
            raise UnsupportedRope(f"unknown rotary pairing for architectures {sorted(archs)}")
        return cls(tuple(float(x) for x in inv), style)

    def rotate(self, keys: np.ndarray | torch.Tensor, shift: int) -> torch.Tensor:
        """Keys ``[..., head_dim]`` computed at positions ``i`` -> the same keys at
        ``i + shift``."""
        k = torch.as_tensor(keys)
        if shift == 0:
            return k.clone()
        angle = shift * np.asarray(self.inv_freq, dtype=np.float64)
        cos = torch.from_numpy(np.cos(angle)).to(k.dtype)
        sin = torch.from_numpy(np.sin(angle)).to(k.dtype)
        if self.style == "neox":
            half = self.head_dim // 2
            x1, x2 = k[..., :half], k[..., half:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x1, x2 = k[..., 0::2], k[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)

    def apply(self, x: np.ndarray | torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """RoPE of un-rotated vectors ``[T, ..., head_dim]`` at ``positions`` (float64
        reference, tests)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        angle = torch.from_numpy(np.outer(np.asarray(positions, dtype=np.float64), self.inv_freq))
        shape = (len(positions),) + (1,) * (x.dim() - 2) + (self.head_dim // 2,)
        cos, sin = angle.cos().reshape(shape), angle.sin().reshape(shape)
        if self.style == "neox":
            half = self.head_dim // 2
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _llama3(inv: np.ndarray, p: dict) -> np.ndarray:
    factor, low, high = (
        float(p["factor"]),
        float(p["low_freq_factor"]),
        float(p["high_freq_factor"]),
    )
    old = float(p["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    mid = (wavelen <= old / low) & (wavelen >= old / high)
    return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]
