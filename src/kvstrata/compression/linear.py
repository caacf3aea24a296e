"""A learned transform codec: per-layer linear autoencoders across all KV heads, quantized latent.

Where :mod:`~kvstrata.compression.autoencoder` compresses each head's
``head_dim`` vector with a small MLP, this codec takes one token's whole K
(or V) vector of a layer -- ``C = kv_heads * head_dim`` numbers, so it can use
redundancy *across* heads -- and codes it with a learned linear transform and
a learned bit allocation (classic transform coding, with the transform and
the allocation learned per layer, separately for K and V, from real KV)::

    encoder: z = (r(x) - mean) @ enc                  [C] -> [r]   (r <= C coded components)
             u_c = z_c / scale_c                      (unit variance on the training data)
             s = max_c |u_c|                          (one fp16 scale per vector)
             q_c = floor(u_c / (clip_c * s) * L_c) clipped to b_c bits,  L_c = 2**(b_c - 1) - 1/2
    decoder: x_hat = r^-1(z_hat @ dec + bias),
             z_hat_c = (q_c + 1/2) / L_c * clip_c * s * scale_c

* ``enc`` is the training data's principal axes (PCA: the optimal linear
  encoder), ``dec``/``bias`` are then fitted by least squares to the
  *quantized* latents (the decoder learns to undo part of the quantization),
  and ``clip_c`` (<= 1, the fraction of the vector's absmax that component
  ``c``'s code range spans) is chosen per component on the training data.
* Bits: every vector gets the same budget (``k_bits`` / ``v_bits`` per
  vector, multiples of 8), spread over the components by greedy reverse
  water-filling on their training variance: high-variance components get up
  to 8 bits, low-variance ones fewer or none (``r`` = components with at
  least one bit). Codes are bit-packed per vector.
* ``r(x)``: with ``derotate`` (a checkpoint setting), keys are rotated back
  to before RoPE at their absolute positions (Llama "rotate half" RoPE,
  ``rope_theta`` from the checkpoint) before the encoder and rotated again
  after the decoder -- pre-RoPE keys are far more compressible. The position
  of the chunk's first token is ``encode``'s ``first_position`` (default 0)
  and is recorded in the section, so decoding needs nothing else. A writer
  that does not pass it still round-trips exactly as specified (decode uses
  the recorded position), only the compression is worse for later chunks
  (on SmolLM2: +9.4% perplexity instead of +0.07%; use a checkpoint trained
  without ``derotate`` until the writer passes positions).

* Exact tokens (codec parameter ``exact_tokens``, default 1): per section,
  the K vectors and, separately, the V vectors of the token at position 0
  when the chunk holds it, then of the tokens with the largest relative
  error (estimated in the latent space), are stored as fp16 instead. This
  is for the attention sink -- the sequence's first token, whose KV looks
  like no other token's and which most heads attend to. On SmolLM2 at 0.63
  bytes/element: +0.24% perplexity and 97.4% top-1 agreement coding it like
  the rest, +0.07% and 99.2% storing it (benchmarks/results/codecs.json).

Section: ``<HBBI`` (layer, flags: bit 0 = keys derotated, reserved, first
position), then for K and for V: ``T`` packed code vectors of ``bits / 8``
bytes, ``T`` fp16 scales, ``exact_tokens`` uint16 token indices (ascending)
and their vectors (fp16, ``kv_heads * head_dim`` each). Bytes per token and
layer: ``(k_bits + v_bits) / 8 + 4``, plus per section 8 and ``2 *
exact_tokens * (2 + 2 * kv_heads * head_dim)``.

Checkpoints: one safetensors file (float32 tensors ``{k|v}{layer}.{mean,enc,
dec,bias,scale,clip,bits}``; metadata ``format`` = ``kvstrata-linear-ae``,
``version``, geometry, bit budgets, RoPE settings, the model and training
settings, and the held-out relative error per layer). Same hashing, caching
and refusal rules as the autoencoder codec: the path is configuration only
(never in a header), and a reader whose configured checkpoint differs from the
object's recorded sha256 refuses (CodecError -> a miss).

Cross-layer reuse (KV-CAR) is not implemented here (see the autoencoder
codec's note: it needs the previous layer's section to decode a layer).

Error bound: none a priori (learned). What holds exactly: decoding is
deterministic, every code is in range by construction, and the latent error
per component is at most half a step, ``clip_c * s * scale_c / (2 L_c)``,
plus clipping for ``|u_c| > clip_c * s``; exact tokens are off by fp16
rounding only. The checkpoint records its
held-out relative error per layer (``heldout_rel_err``, through the real
quantizer); tests hold trained codecs to ``rel_err <= 1.5 * recorded`` on
other data of the same distribution, and ``benchmarks/codecs.py`` measures
perplexity and next-token agreement.
"""

from __future__ import annotations

import heapq
import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from kvstrata.compression import checkpoint_file
from kvstrata.compression.base import (
    CodecError,
    Geometry,
    check_params,
    from_float32,
    kv_dtype,
    register,
    to_float32,
)

FORMAT = "kvstrata-linear-ae"
VERSION = 1
_NAMES = ("mean", "enc", "dec", "bias", "scale", "clip", "bits")
_SECTION_HEAD = struct.Struct(
    "<HBBI"
)  # layer, flags (bit 0: keys derotated), reserved, first position
_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


# -- RoPE (Llama's "rotate half" layout) -----------------------------------------------------


_ROPE_CACHE: dict[tuple[int, int, int, float], tuple[np.ndarray, np.ndarray]] = {}


def _rope_tables(
    first_position: int, T: int, D: int, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    key = (first_position, T, D, theta)
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
        ang = (first_position + np.arange(T, dtype=np.float64))[:, None] * inv[None, :]
        tables = (
            np.cos(ang).astype(np.float32)[:, None, :],
            np.sin(ang).astype(np.float32)[:, None, :],
        )
        if len(_ROPE_CACHE) >= 256:  # chunk positions repeat: a small bounded cache
            _ROPE_CACHE.clear()
        _ROPE_CACHE[key] = tables
    return tables


def rope_rotate(x: np.ndarray, first_position: int, theta: float, sign: int) -> np.ndarray:
    """Rotate ``x`` [T, H, D] by RoPE at positions ``first_position + t`` (``sign=-1``: undo it)."""
    T, _, D = x.shape
    cos, sin = _rope_tables(int(first_position), T, D, float(theta))
    if sign < 0:
        sin = -sin
    a, b = x[..., : D // 2], x[..., D // 2 :]
    out = np.empty(x.shape, dtype=np.float32)
    out[..., : D // 2] = a * cos - b * sin
    out[..., D // 2 :] = b * cos + a * sin
    return out


# -- bit packing: component c of a vector takes bits[c] bits, packed LSB-first ---------------------


class Packer:
    """Packs codes [N, r] (code c < 2**bits[c], bits 1..8) into ``sum(bits) / 8`` bytes per vector.

    Component ``c`` occupies bits ``off_c .. off_c + bits[c]`` (``off`` the running sum), little
    endian: it lands in byte ``off_c // 8`` shifted left by ``off_c % 8`` and, when it does not
    fit, its high bits in the next byte. Bits never overlap, so a byte is the sum of its parts.
    """

    def __init__(self, bits: np.ndarray):
        bits = np.asarray(bits, dtype=np.int64)
        off = np.concatenate([[0], np.cumsum(bits)[:-1]])
        self.nbytes = int(bits.sum() + 7) // 8
        self.byte = off // 8
        self.shift = (off % 8).astype(np.uint16)
        self.mask = ((1 << bits) - 1).astype(np.uint16)
        spill = (off % 8) + bits > 8
        self.spill = spill
        self.next_byte = np.where(spill, self.byte + 1, self.byte)
        # encode: the contributions (low parts of every component, high parts of spilling ones)
        # grouped by destination byte, for one np.add.reduceat
        target = np.concatenate([self.byte, self.byte[spill] + 1])
        self.order = np.argsort(target, kind="stable")
        t = target[self.order]
        self.starts = np.flatnonzero(np.concatenate([[True], t[1:] != t[:-1]]))
        self.columns = t[self.starts]

    def pack(self, codes: np.ndarray) -> np.ndarray:
        val = codes.astype(np.uint16) << self.shift
        parts = np.concatenate([val & 0xFF, val[:, self.spill] >> 8], axis=1)[:, self.order]
        out = np.zeros((len(codes), self.nbytes), dtype=np.uint8)
        out[:, self.columns] = np.add.reduceat(parts, self.starts, axis=1)
        return out

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        p = packed.astype(np.uint16)
        val = p[:, self.byte] | (p[:, self.next_byte] << 8) * self.spill
        return ((val >> self.shift) & self.mask).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Codes [N, r] (uint8, code c < 2**bits[c]) ->
    [N, sum(bits) / 8] bytes (see :class:`Packer`)."""
    return Packer(bits).pack(codes)


def unpack_codes(packed: np.ndarray, bits: np.ndarray) -> np.ndarray:
    return Packer(bits).unpack(packed)


# -- the quantizer ---------------------------------------------------------------------------


def vector_scales(u: np.ndarray) -> np.ndarray:
    """One fp16 scale per vector: the absmax of its normalized latent, rounded up (never 0)."""
    amax = np.abs(u).max(axis=1) if u.shape[1] else np.zeros(len(u), np.float32)
    amax = np.minimum(
        amax, 65504.0
    )  # fp16's largest: larger latents clip (NaN stays NaN, then 65504)
    s = amax.astype(np.float16)
    low = s.astype(np.float32) < amax
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    s[~np.isfinite(s)] = np.float16(65504)
    return np.where(s > 0, s, np.float16(1))


def quantize(u: np.ndarray, s: np.ndarray, clip: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Normalized latents [N, r], vector scales [N] -> codes [N, r] (uint8, in 0 .. 2**bits - 1)."""
    half = np.exp2(bits - 1).astype(np.float32)
    L = half - 0.5
    rng = s.astype(np.float32)[:, None] * clip[None, :]
    q = np.floor(u / rng * L)
    return (np.clip(q, -half, half - 1) + half).astype(np.uint8)


def dequantize(codes: np.ndarray, s: np.ndarray, clip: np.ndarray, bits: np.ndarray) -> np.ndarray:
    half = np.exp2(bits - 1).astype(np.float32)
    L = half - 0.5
    return (
        (codes.astype(np.float32) - half + 0.5)
        / L
        * (s.astype(np.float32)[:, None] * clip[None, :])
    )


def _layer_weights(
    tensors: Mapping[str, np.ndarray], kv: str, layer: int, C: int, budget: int
) -> dict[str, np.ndarray]:
    """One transform's tensors, validated (CodecError if any is missing, misshaped, non-finite or
    out of range), with the decoder's folded constants precomputed."""
    w = {}
    for name in _NAMES:
        t = tensors.get(f"{kv}{layer}.{name}")
        if t is None:
            raise CodecError(f"linear-ae checkpoint tensor {kv}{layer}.{name} missing")
        w[name] = np.ascontiguousarray(t, dtype=np.float32)
    r = len(w["bits"])
    shapes = {
        "mean": (C,),
        "enc": (C, r),
        "dec": (r, C),
        "bias": (C,),
        "scale": (r,),
        "clip": (r,),
        "bits": (r,),
    }
    for name, shape in shapes.items():
        if w[name].shape != shape or not np.isfinite(w[name]).all():
            raise CodecError(
                f"linear-ae checkpoint tensor {kv}{layer}.{name} misshaped or non-finite"
            )
    bits = w["bits"]
    if (
        (bits != np.rint(bits)).any()
        or (bits < 1).any()
        or (bits > 8).any()
        or int(bits.sum()) != budget
    ):
        raise CodecError(
            f"linear-ae checkpoint {kv}{layer}: bits must be 1..8 summing to {kv}_bits"
        )
    if (w["scale"] <= 0).any() or (w["clip"] <= 0).any() or (w["clip"] > 1).any():
        raise CodecError(f"linear-ae checkpoint {kv}{layer}: bad scale or clip")
    w["bits"] = bits.astype(np.int64)
    half = np.exp2(w["bits"] - 1).astype(np.float32)
    w["_offset"] = half - np.float32(0.5)
    w["_dec"] = np.ascontiguousarray(
        (w["clip"] * w["scale"] / (half - np.float32(0.5)))[:, None] * w["dec"]
    )
    return w


class LinearCheckpoint:
    """Per-layer K and V transforms, loaded from (or saved to) a safetensors file."""

    def __init__(
        self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str], sha256: str = ""
    ):
        checkpoint_file.check_format(meta, FORMAT, VERSION, "linear-ae")
        try:
            self.n_layers = int(meta["n_layers"])
            self.kv_heads = int(meta["kv_heads"])
            self.head_dim = int(meta["head_dim"])
            self.budget = {"k": int(meta["k_bits"]), "v": int(meta["v_bits"])}
            self.derotate = meta.get("derotate", "false") == "true"
            self.rope_theta = float(meta.get("rope_theta", "10000"))
        except (KeyError, ValueError) as exc:
            raise CodecError(f"bad linear-ae checkpoint metadata: {exc}") from None
        C = self.kv_heads * self.head_dim
        for kv, b in self.budget.items():
            if b <= 0 or b % 8 or b > 8 * C:
                raise CodecError(
                    f"linear-ae checkpoint: {kv}_bits={b} must be a positive multiple of 8, "
                    f"<= {8 * C}"
                )
        if self.derotate and (
            self.head_dim % 2 or not math.isfinite(self.rope_theta) or self.rope_theta <= 1
        ):
            raise CodecError("linear-ae checkpoint: bad RoPE settings")
        self.meta = dict(meta)
        self.sha256 = sha256
        self.weights: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.packers: dict[tuple[str, int], Packer] = {}
        for kv in "kv":
            for layer in range(self.n_layers):
                w = _layer_weights(tensors, kv, layer, C, self.budget[kv])
                self.weights[(kv, layer)] = w
                self.packers[(kv, layer)] = Packer(w["bits"])

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> LinearCheckpoint:
        return cls(*checkpoint_file.read(path, sha256))

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            f"{kv}{layer}.{name}": w[name].astype(np.float32)
            for (kv, layer), w in self.weights.items()
            for name in _NAMES
        }

    def save(self, path: str | Path) -> str:
        """Write the checkpoint (bytes depend only on contents); returns its sha256."""
        self.sha256 = checkpoint_file.write(path, self.tensors(), self.meta)
        return self.sha256

    # -- coding one layer's K or V: x [T, H, D] float32 --------------------------------------

    def encode_vectors(
        self, x: np.ndarray, kv: str, layer: int, first_position: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(packed codes [T, bits/8] uint8, fp16 scales
        [T], estimated squared error per vector [T]).

        The estimate is taken in the latent space (the encoder's columns are orthonormal): what the
        coded components do not hold, ``|x - mean|^2 -
        |z|^2``, plus the latent's quantization error."""
        w = self.weights[(kv, layer)]
        if kv == "k" and self.derotate:
            x = rope_rotate(x, first_position, self.rope_theta, -1)
        T = x.shape[0]
        xc = x.reshape(T, -1) - w["mean"]
        z = xc @ w["enc"]
        u = z / w["scale"]
        s = vector_scales(u)
        codes = quantize(u, s, w["clip"], w["bits"])
        zq = dequantize(codes, s, w["clip"], w["bits"]) * w["scale"]
        err = np.maximum((xc * xc).sum(axis=1) - (z * z).sum(axis=1), 0.0) + ((zq - z) ** 2).sum(
            axis=1
        )
        return self.packers[(kv, layer)].pack(codes), s, err

    def decode_vectors(
        self,
        packed: np.ndarray,
        s: np.ndarray,
        kv: str,
        layer: int,
        first_position: int,
        shape: tuple[int, int, int],
    ) -> np.ndarray:
        w = self.weights[(kv, layer)]
        # z_hat = (code - half + 1/2) * (clip * scale / L) * s: the per-component factor is folded
        # into the decoder matrix, the per-vector scale applied after it
        codes = self.packers[(kv, layer)].unpack(packed).astype(np.float32) - w["_offset"]
        x = ((codes @ w["_dec"]) * s.astype(np.float32)[:, None] + w["bias"]).reshape(shape)
        if kv == "k" and self.derotate:
            x = rope_rotate(x, first_position, self.rope_theta, 1)
        return x

    def roundtrip(self, x: np.ndarray, kv: str, layer: int, first_position: int = 0) -> np.ndarray:
        """``x`` [T, H, D] through the quantized transform
        (what the codec stores and returns, in float32)."""
        packed, s, _ = self.encode_vectors(x, kv, layer, first_position)
        return self.decode_vectors(packed, s, kv, layer, first_position, x.shape)


def load_linear_checkpoint(path: str, sha256: str | None) -> LinearCheckpoint:
    """A checkpoint by path (and hash), verified from
    the file on every call, parsed once per content."""
    return checkpoint_file.load_cached(path, sha256, LinearCheckpoint.load)


@register
class LinearAECodec:
    """Learned linear transform across heads + bit-allocated quantized latent (module docstring).

    Params: ``checkpoint`` (path), ``sha256`` (of the checkpoint file; filled
    in when a writer leaves it out) and ``exact_tokens`` (default 1): per
    section, the K vectors and, separately, the V vectors of that many tokens
    are stored as fp16 instead (values clipped to +-65504) with their uint16
    index: the token at position 0 when the chunk holds it (the attention
    sink: small KV unlike any other token's, that most heads attend to), then
    the tokens with the largest relative error ``|x - x_hat|^2 / |x|^2``
    (estimated in the latent space).

    Bytes per token and layer: ``(k_bits + v_bits) / 8 + 4`` (the
    checkpoint's budgets), plus per section 8 and ``2 * exact_tokens * (2 + 2
    * kv_heads * head_dim)``.
    """

    id: ClassVar[str] = "linear-ae"
    lossless: ClassVar[bool] = False
    local_params: ClassVar[frozenset[str]] = frozenset({"checkpoint"})

    def __init__(self, checkpoint: str, sha256: str | None = None, exact_tokens: int = 1):
        if not 0 <= exact_tokens <= 4096:
            raise CodecError(f"linear-ae: exact_tokens must be in 0..4096 (got {exact_tokens})")
        self.path = str(checkpoint)
        self.ckpt = load_linear_checkpoint(self.path, sha256)
        self.exact_tokens = int(exact_tokens)

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {
            "checkpoint": self.path,
            "sha256": self.ckpt.sha256,
            "exact_tokens": self.exact_tokens,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> LinearAECodec:
        check_params(cls.id, params, {"checkpoint": str, "sha256": str, "exact_tokens": int})
        if "checkpoint" not in params:
            raise CodecError("linear-ae: parameter 'checkpoint' (a path) is required")
        return cls(**params)  # type: ignore[arg-type]

    def _block_bytes(self, kv: str, T: int) -> int:
        C = self.ckpt.kv_heads * self.ckpt.head_dim
        return T * (self.ckpt.budget[kv] // 8 + 2) + min(self.exact_tokens, T) * (2 + 2 * C)

    def section_bytes(self, geometry: Geometry) -> int:
        return _SECTION_HEAD.size + sum(self._block_bytes(kv, geometry.n_tokens) for kv in "kv")

    def _check_geometry(self, kv_heads: int, head_dim: int, layer: int) -> None:
        c = self.ckpt
        if (kv_heads, head_dim) != (c.kv_heads, c.head_dim):
            raise CodecError(
                f"linear-ae checkpoint is for {c.kv_heads} KV heads x head_dim {c.head_dim}, "
                f"not {kv_heads} x {head_dim}"
            )
        if not 0 <= layer < c.n_layers:
            raise CodecError(f"linear-ae checkpoint has {c.n_layers} layers, no layer {layer}")

    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes:
        _, T, H, D = kv.shape
        self._check_geometry(H, D, layer)
        if not 0 <= first_position < 2**32:
            raise CodecError(f"linear-ae: first_position {first_position} out of range")
        x = to_float32(kv, kv_dtype(kv))
        n_exact = min(self.exact_tokens, T)
        parts = [_SECTION_HEAD.pack(layer, 1 if self.ckpt.derotate else 0, 0, first_position)]
        for i in range(2):
            kv_name = "kv"[i]
            packed, s, err = self.ckpt.encode_vectors(x[i], kv_name, layer, first_position)
            parts += [packed.tobytes(), s.astype("<f2").tobytes()]
            if n_exact:
                # relative error: the sink's KV is small and unlike the others; the sequence's first
                # token (the attention sink) always, when this chunk holds it
                rel = err / np.maximum(
                    (x[i].reshape(T, -1).astype(np.float64) ** 2).sum(axis=1), 1e-30
                )
                if first_position == 0:
                    rel[0] = np.inf
                worst = np.sort(np.argsort(-rel, kind="stable")[:n_exact])
                exact = np.clip(x[i][worst].reshape(n_exact, -1), -65504.0, 65504.0)
                parts += [worst.astype("<u2").tobytes(), exact.astype("<f2").tobytes()]
        return b"".join(parts)

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        self._check_geometry(geometry.kv_heads, geometry.head_dim, 0)
        need = self.section_bytes(geometry)
        if len(section) != need:
            raise CodecError(f"linear-ae section is {len(section)} bytes, geometry needs {need}")
        layer, flags, reserved, first_position = _SECTION_HEAD.unpack_from(section)
        if flags != (1 if self.ckpt.derotate else 0) or reserved:
            raise CodecError("linear-ae section flags do not match the checkpoint")
        T, H, D = geometry.n_tokens, geometry.kv_heads, geometry.head_dim
        self._check_geometry(H, D, layer)
        n_exact = min(self.exact_tokens, T)
        raw = np.frombuffer(section, dtype=np.uint8, offset=_SECTION_HEAD.size)
        out, at = [], 0
        for i in range(2):
            kv = "kv"[i]
            nb = self.ckpt.budget[kv] // 8
            packed = raw[at : at + T * nb].reshape(T, nb)
            s = raw[at + T * nb : at + T * nb + 2 * T].view("<f2")
            at += T * (nb + 2)
            if not (np.isfinite(s).all() and (s > 0).all()):
                raise CodecError("linear-ae section has non-finite or non-positive scales")
            y = self.ckpt.decode_vectors(packed, s, kv, layer, first_position, (T, H, D))
            if n_exact:
                idx = raw[at : at + 2 * n_exact].view("<u2")
                exact = raw[at + 2 * n_exact : at + 2 * n_exact + 2 * n_exact * H * D].view("<f2")
                at += 2 * n_exact * (1 + H * D)
                if (
                    (idx >= T).any()
                    or (np.diff(idx.astype(np.int64)) <= 0).any()
                    or not np.isfinite(exact).all()
                ):
                    raise CodecError("linear-ae section has bad exact-token indices or values")
                y[idx] = exact.reshape(n_exact, H, D)
            out.append(y)
        return from_float32(np.stack(out), geometry.dtype)


# -- training (numpy only: closed-form fits, deterministic) ----------------------------------------

# expected squared error of a b-bit uniform quantizer on unit-variance data (Gaussian, high-rate
# approximation), relative to the variance; 0 bits = the whole variance
_DIST = np.array(
    [1.0] + [min(1.0, math.pi * math.sqrt(3) / 2 * 2.0 ** (-2 * b)) for b in range(1, 9)]
)


def allocate_bits(variance: np.ndarray, budget: int) -> np.ndarray:
    """Greedy reverse water-filling: ``budget`` bits over components of ``variance``, 0..8 each."""
    bits = np.zeros(len(variance), dtype=np.int64)
    heap = [(-(v * (_DIST[0] - _DIST[1])), c) for c, v in enumerate(variance)]
    heapq.heapify(heap)
    for _ in range(budget):
        if not heap:
            break
        _, c = heapq.heappop(heap)
        bits[c] += 1
        if bits[c] < 8:
            heapq.heappush(heap, (-(variance[c] * (_DIST[bits[c]] - _DIST[bits[c] + 1])), c))
    return bits


def fit_layer(
    x: np.ndarray, budget: int, sample: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Fit one transform on ``x`` [N, C] float32 (K already derotated if so): PCA encoder, bit
    allocation, per-component clip, least-squares decoder on the quantized latents."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    xc = x64 - mean
    cov = xc.T @ xc / max(len(x) - 1, 1)
    var, vecs = np.linalg.eigh(cov)
    order = np.argsort(-var, kind="stable")
    var, vecs = np.maximum(var[order], 0.0), vecs[:, order]
    # a deterministic sign per axis (eigh's signs are arbitrary): the largest entry positive
    vecs *= np.where(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])] < 0, -1.0, 1.0)
    bits_all = allocate_bits(var, budget)
    keep = bits_all > 0
    enc = vecs[:, keep].astype(np.float32)
    bits = bits_all[keep]
    scale = np.sqrt(np.maximum(var[keep], 1e-20)).astype(np.float32)
    mean32 = mean.astype(np.float32)
    u = ((x - mean32) @ enc) / scale
    s = vector_scales(u)
    # per-component clip: the grid value with the least squared error on the training latents
    errs = []
    for c in _CLIP_GRID:
        clip = np.full(len(bits), c, dtype=np.float32)
        uq = dequantize(quantize(u, s, clip, bits), s, clip, bits)
        errs.append(((uq - u) ** 2).sum(axis=0))
    clip = np.asarray(_CLIP_GRID, dtype=np.float32)[np.argmin(np.stack(errs), axis=0)]
    zq = dequantize(quantize(u, s, clip, bits), s, clip, bits) * scale
    # decoder: least squares from the quantized latents (plus a bias) to x
    a = np.concatenate([zq.astype(np.float64), np.ones((len(zq), 1))], axis=1)
    gram = a.T @ a + 1e-6 * np.eye(a.shape[1]) * np.trace(a.T @ a) / a.shape[1]
    sol = np.linalg.solve(gram, a.T @ x64)
    dec, bias = sol[:-1].astype(np.float32), sol[-1].astype(np.float32)
    return {
        "mean": mean32,
        "enc": enc,
        "dec": dec,
        "bias": bias,
        "scale": scale,
        "clip": clip,
        "bits": bits.astype(np.float32),
    }


def train_linear(
    data: Mapping[tuple[str, int], np.ndarray],
    heldout: Mapping[tuple[str, int], np.ndarray],
    *,
    kv_heads: int,
    head_dim: int,
    k_bits: int,
    v_bits: int,
    derotate: bool,
    rope_theta: float = 10000.0,
    max_vectors: int = 65536,
    seed: int = 0,
    meta: Mapping[str, object] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> LinearCheckpoint:
    """Fit every (K|V, layer) transform.

    ``data[(kv, layer)]`` and ``heldout[(kv, layer)]``: lists of ``(first_position, x [T, H, D])``
    sequences (post-RoPE keys, as stored; derotated here when ``derotate``). At most
    ``max_vectors`` training vectors per transform, sampled with ``seed``. Deterministic given the
    data and the seed. ``progress(done, total, info)`` is called per transform.
    """
    keys = sorted(data)
    n_layers = 1 + max(layer for _, layer in keys)
    info = {
        "format": FORMAT,
        "version": str(VERSION),
        "n_layers": str(n_layers),
        "kv_heads": str(kv_heads),
        "head_dim": str(head_dim),
        "k_bits": str(k_bits),
        "v_bits": str(v_bits),
        "derotate": "true" if derotate else "false",
        "rope_theta": repr(float(rope_theta)),
        "max_vectors": str(max_vectors),
        "seed": str(seed),
        **{k: str(v) for k, v in (meta or {}).items()},
    }
    rng = np.random.default_rng(seed)
    tensors = {}
    for done, (kv, layer) in enumerate(keys):
        x = _flat(data[(kv, layer)], kv == "k" and derotate, rope_theta)
        if len(x) > max_vectors:
            x = x[np.sort(rng.choice(len(x), max_vectors, replace=False))]
        w = fit_layer(x, k_bits if kv == "k" else v_bits)
        for name in _NAMES:
            tensors[f"{kv}{layer}.{name}"] = w[name]
        if progress is not None:
            progress(done + 1, len(keys), f"{kv}{layer}")
    ckpt = LinearCheckpoint(tensors, info)
    errs = _heldout_errors(ckpt, keys, heldout)
    ckpt.meta["heldout_rel_err"] = json.dumps(errs, sort_keys=True)
    return ckpt


def _flat(seqs, derotate: bool, rope_theta: float) -> np.ndarray:
    """``(first_position, x [T, H, D])`` sequences as one [N, H * D] float32 array (keys
    derotated to before RoPE when ``derotate``)."""
    rows = []
    for pos, x in seqs:
        x = np.asarray(x, dtype=np.float32)
        if derotate:
            x = rope_rotate(x, pos, rope_theta, -1)
        rows.append(x.reshape(len(x), -1))
    return np.concatenate(rows)


def _heldout_errors(ckpt: LinearCheckpoint, keys, heldout) -> dict[str, float]:
    """``{"k0": err, ...}``: the stored reconstruction's relative error on the held-out chunks
    (at their positions), per transform that has held-out data."""
    errs = {}
    for kv, layer in keys:
        if (kv, layer) in heldout:
            num = den = 0.0
            for pos, x in heldout[(kv, layer)]:
                x = np.asarray(x, dtype=np.float32)
                y = ckpt.roundtrip(x, kv, layer, pos)
                num += float(((y.astype(np.float64) - x) ** 2).sum())
                den += float((x.astype(np.float64) ** 2).sum())
            errs[f"{kv}{layer}"] = round(math.sqrt(num / max(den, 1e-30)), 5)
    return errs


def linear_rel_error(
    ckpt: LinearCheckpoint, x: np.ndarray, kv: str, layer: int, first_position: int = 0
) -> float:
    """Relative error ``|x - x_hat| / |x|`` of the stored
    (quantized) reconstruction of ``x`` [T, H, D]."""
    y = ckpt.roundtrip(np.asarray(x, dtype=np.float32), kv, layer, first_position)
    return float(np.linalg.norm(y.astype(np.float64) - x) / max(np.linalg.norm(x), 1e-30))
