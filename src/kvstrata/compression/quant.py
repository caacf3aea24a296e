"""Quantization codecs: fp8 (e4m3) and KIVI-style int8 / int4 group quantization.

All three are lossy, deterministic and pure numpy (no torch at serving time).
Input is one layer of one chunk, ``[2, T, H, D]`` canonical KV (float32,
float16 or bf16 as its 16-bit pattern); ``decode`` returns the geometry's
dtype, so the output dtype's own rounding (fp16/bf16) comes on top of the
bounds below. Inputs must be finite.

Sections hold everything needed to decode (codes and scales); their length is
fixed by the geometry and the parameters, and ``decode`` checks it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from kvstrata.compression.base import (
    CodecError,
    Geometry,
    check_params,
    from_float32,
    kv_dtype,
    register,
    to_float32,
)

# -- fp8 e4m3 (the "fn" variant: no infinities, max 448) --------------------------------


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (0x7F/0xFF are NaN)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    normal = (1 + man / 8) * np.exp2(exp - 7.0)
    subnormal = (man / 8) * np.exp2(-6.0)
    values = sign * np.where(exp == 0, subnormal, normal)
    values[[0x7F, 0xFF]] = np.nan
    return values.astype(np.float32)


_E4M3 = _e4m3_table()
_E4M3_MAX = 448.0


def fp8_e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Round float32 values in [-448, 448] to the nearest e4m3fn code (uint8), ties to even.

    Normal range: round the float32 mantissa to 3 bits in the bit pattern and
    re-bias the exponent; below 2**-6 (subnormal): multiples of 2**-9.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    mag = bits & 0x7FFFFFFF
    rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
    exp = (rounded >> 23).astype(np.int32) - 120  # 127 - 7
    normal = (exp << 3) | ((rounded >> 20) & 7).astype(np.int32)
    a = mag.view(np.float32)
    sub = np.rint(a * np.float32(512.0)).astype(np.int32)  # 0..8; 8 is the smallest normal's code
    codes = np.where(a < np.float32(2.0**-6), sub, normal).astype(np.uint8)
    return codes | sign


@register
class Fp8Codec:
    """fp8 e4m3: K and V each scaled by one float32 (``amax / 448``), then cast to e4m3.

    Bytes: 1 per element + 8 per section (4x smaller than fp32, 2x than bf16).

    Error bound, per element: ``|x - x_hat| <= 2**-4 * |x| + 2**-10 * s`` where
    ``s = max|X| / 448`` over the element's tensor (K or V of this layer and
    chunk): 3 mantissa bits give half-ulp relative rounding of ``2**-4``, and
    the subnormal spacing ``2**-9 * s`` gives the absolute term.
    """

    id: ClassVar[str] = "fp8"
    lossless: ClassVar[bool] = False
    local_params: ClassVar[frozenset[str]] = frozenset()

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> Fp8Codec:
        check_params(cls.id, params, {})
        return cls()

    @staticmethod
    def section_bytes(geometry: Geometry) -> int:
        return 8 + 2 * geometry.n_tokens * geometry.kv_heads * geometry.head_dim

    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes:
        x = to_float32(kv, kv_dtype(kv))
        amax = np.abs(x).reshape(2, -1).max(axis=1)
        scales = np.where(amax > 0, amax / _E4M3_MAX, 1.0).astype(np.float32)
        scaled = np.clip(x / scales[:, None, None, None], -_E4M3_MAX, _E4M3_MAX)
        return scales.astype("<f4").tobytes() + fp8_e4m3_encode(scaled).tobytes()

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        if len(section) != self.section_bytes(geometry):
            raise CodecError(
                f"fp8 section is {len(section)} bytes, "
                f"geometry needs {self.section_bytes(geometry)}"
            )
        scales = np.frombuffer(section, dtype="<f4", count=2)
        codes = np.frombuffer(section, dtype=np.uint8, offset=8).reshape(geometry.shape)
        if not np.isfinite(scales).all():
            raise CodecError("fp8 section has non-finite scales")
        x = _E4M3[codes] * scales[:, None, None, None]
        return from_float32(x, geometry.dtype)


# -- integer group quantization (KIVI) ---------------------------------------------------


def _group_quantize(x: np.ndarray, axis: int, group: int, bits: int):
    """Asymmetric min/scale quantization of ``x`` in groups of ``group`` along ``axis``.

    Returns (codes uint8 shaped like x, scales fp16, mins fp16), scales/mins
    shaped like x with ``axis`` reduced to its number of groups. The fp16 min
    is rounded down and the fp16 scale up, so every value is representable
    within half a step.
    """
    g, n = _groups(x, axis, group)
    lo = g.min(axis=-1)
    hi = g.max(axis=-1)
    levels = (1 << bits) - 1
    lo16 = lo.astype(np.float16)
    lo16 = np.where(lo16.astype(np.float32) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
    step = (hi - lo16.astype(np.float32)) / levels
    s16 = step.astype(np.float16)
    s16 = np.where(s16.astype(np.float32) < step, np.nextafter(s16, np.float16(np.inf)), s16)
    if not (np.isfinite(lo16).all() and np.isfinite(s16).all()):
        raise CodecError("KV values out of float16 range for the group scales")
    s32 = s16.astype(np.float32)
    safe = np.where(s32 > 0, s32, 1.0)
    q = np.rint((g - lo16.astype(np.float32)[..., None]) / safe[..., None])
    codes = np.clip(q, 0, levels).astype(np.uint8).reshape(*g.shape[:-2], -1)[..., :n]
    return np.moveaxis(codes, -1, axis), np.moveaxis(s16, -1, axis), np.moveaxis(lo16, -1, axis)


def _group_dequantize(
    codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, axis: int, group: int
):
    s = np.repeat(scales.astype(np.float32), group, axis=axis)
    m = np.repeat(mins.astype(np.float32), group, axis=axis)
    n = codes.shape[axis]
    s = np.take(s, np.arange(n), axis=axis)
    m = np.take(m, np.arange(n), axis=axis)
    return m + codes.astype(np.float32) * s


def _pack4(codes: np.ndarray) -> bytes:
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack4(raw: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(raw.size * 2, dtype=np.uint8)
    out[0::2] = raw & 0x0F
    out[1::2] = raw >> 4
    return out[:n]


class _GroupQuant:
    """KIVI-style asymmetric integer quantization with fp16 scale and min per group.

    Keys are quantized per channel: a group is ``group_size`` consecutive
    tokens of one (head, channel) -- KIVI's observation that key outliers live
    in fixed channels. Values are quantized per token: a group is
    ``group_size`` consecutive channels of one (token, head). A last, shorter
    group takes what is left (the chunk length or head_dim need not be a
    multiple of the group size).

    Section: K codes | K scales | K mins | V codes | V scales | V mins
    (codes bit-packed for 4 bits, low nibble first; scales and mins fp16).
    """

    id: ClassVar[str]
    bits: ClassVar[int]
    lossless: ClassVar[bool] = False
    local_params: ClassVar[frozenset[str]] = frozenset()
    default_group: ClassVar[int] = 32

    def __init__(self, group_size: int | None = None):
        group_size = self.default_group if group_size is None else group_size
        if not 1 <= group_size <= 4096:
            raise CodecError(f"codec {self.id!r}: group_size must be in 1..4096 (got {group_size})")
        self.group_size = group_size

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {"group_size": self.group_size}

    @classmethod
    def from_params(cls, params: Mapping[str, object]):
        check_params(cls.id, params, {"group_size": int})
        return cls(params.get("group_size"))  # type: ignore[arg-type]

    def _layout(self, g: Geometry) -> list[tuple[str, int]]:
        T, H, D, G = g.n_tokens, g.kv_heads, g.head_dim, self.group_size
        n = T * H * D
        code_bytes = n if self.bits == 8 else (n + 1) // 2
        k_groups = -(-T // G) * H * D
        v_groups = T * H * -(-D // G)
        return [
            ("kc", code_bytes),
            ("ks", 2 * k_groups),
            ("km", 2 * k_groups),
            ("vc", code_bytes),
            ("vs", 2 * v_groups),
            ("vm", 2 * v_groups),
        ]

    def section_bytes(self, geometry: Geometry) -> int:
        return sum(size for _, size in self._layout(geometry))

    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes:
        x = to_float32(kv, kv_dtype(kv))
        G = self.group_size
        kc, ks, km = _group_quantize(x[0], axis=0, group=G, bits=self.bits)  # along tokens
        vc, vs, vm = _group_quantize(x[1], axis=2, group=G, bits=self.bits)  # along head_dim
        pack = (lambda c: c.tobytes()) if self.bits == 8 else _pack4
        return b"".join(
            [
                pack(kc),
                ks.astype("<f2").tobytes(),
                km.astype("<f2").tobytes(),
                pack(vc),
                vs.astype("<f2").tobytes(),
                vm.astype("<f2").tobytes(),
            ]
        )

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        layout = self._layout(geometry)
        need = sum(size for _, size in layout)
        if len(section) != need:
            raise CodecError(
                f"{self.id} section is {len(section)} bytes, geometry and "
                f"group_size={self.group_size} need {need}"
            )
        T, H, D, G = geometry.n_tokens, geometry.kv_heads, geometry.head_dim, self.group_size
        parts, offset = {}, 0
        for name, size in layout:
            parts[name] = np.frombuffer(section, dtype=np.uint8, count=size, offset=offset)
            offset += size
        n = T * H * D

        def codes(raw):
            return (raw if self.bits == 8 else _unpack4(raw, n)).reshape(T, H, D)

        def f16(raw, shape):
            values = raw.view("<f2").reshape(shape)
            if not np.isfinite(values).all():
                raise CodecError(f"{self.id} section has non-finite scales")
            return values

        kshape, vshape = (-(-T // G), H, D), (T, H, -(-D // G))
        k = _group_dequantize(
            codes(parts["kc"]), f16(parts["ks"], kshape), f16(parts["km"], kshape), 0, G
        )
        v = _group_dequantize(
            codes(parts["vc"]), f16(parts["vs"], vshape), f16(parts["vm"], vshape), 2, G
        )
        return from_float32(np.stack([k, v]), geometry.dtype)


@register
class Int8Codec(_GroupQuant):
    """int8 group quantization (KIVI-style; see :class:`_GroupQuant` for the grouping).

    Bytes per element: 1 + 4/group_size (fp16 scale and min per group).

    Error bound, per element of a group g with minimum ``min_g`` and maximum
    ``max_g``: ``|x - x_hat| <= 0.5 * step_g + 2**-20 * max(|min_g|, |max_g|) + 2**-24``
    with ``step_g = (max_g - min_g + 2**-9 * |min_g|) / 255 * (1 + 2**-10)``
    (the fp16 scale is rounded up and the fp16 min down; the last terms are
    float32 arithmetic and fp16 subnormals).
    """

    id: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8


@register
class Int4Codec(_GroupQuant):
    """int4 group quantization (KIVI-style; see :class:`_GroupQuant` for the grouping).

    Bytes per element: 0.5 + 4/group_size (fp16 scale and min per group).

    Error bound, per element of a group g: as for int8 with 15 levels:
    ``|x - x_hat| <= 0.5 * step_g + 2**-20 * max(|min_g|, |max_g|) + 2**-24``,
    ``step_g = (max_g - min_g + 2**-9 * |min_g|) / 15 * (1 + 2**-10)``.
    """

    id: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4


def group_error_bound(x: np.ndarray, axis: int, group: int, bits: int) -> np.ndarray:
    """The documented per-element error bound of int8/int4
    for one tensor ``x`` (K: axis 0, V: axis 2)."""
    g, n = _groups(np.asarray(x, dtype=np.float64), axis, group)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    step = (hi - lo + 2.0**-9 * np.abs(lo)) / ((1 << bits) - 1) * (1 + 2.0**-10)
    bound = 0.5 * step + 2.0**-20 * np.maximum(np.abs(lo), np.abs(hi)) + 2.0**-24
    bound = np.repeat(bound, group, axis=-1)[..., :n]
    return np.moveaxis(bound, -1, axis)


def _groups(x: np.ndarray, axis: int, group: int) -> tuple[np.ndarray, int]:
    """``x`` with ``axis`` moved last and split into groups of ``group`` (the last group padded
    by repeating its last value), and that axis's original length."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    n_groups = -(-n // group)
    pad = n_groups * group - n
    if pad:
        x = np.concatenate([x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
    return x.reshape(*x.shape[:-1], n_groups, group), n
