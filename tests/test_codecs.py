"""Codecs: registry, error bounds, every codec through
every tier, config and orchestrator wiring."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kvstrata import format as fmt
from kvstrata import runtime as rt
from kvstrata.compression.autoencoder import AutoencoderCodec, Checkpoint, rel_error, train
from kvstrata.compression.base import (
    CodecError,
    Geometry,
    codec_from_config,
    codec_from_header,
    codec_kinds,
    from_float32,
    header_params,
    to_float32,
)
from kvstrata.compression.linear import (
    LinearAECodec,
    LinearCheckpoint,
    Packer,
    allocate_bits,
    linear_rel_error,
    rope_rotate,
    train_linear,
)
from kvstrata.compression.quant import fp8_e4m3_encode, group_error_bound
from kvstrata.config import ConfigError, parse_config
from kvstrata.keys import Namespace
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from kvstrata.tiers.base import Hit, Tier
from tests.conftest import make_keys

# chunk length and head_dim that are not multiples of the group size: last groups are partial
GEOM = Geometry(n_tokens=40, kv_heads=2, head_dim=48, dtype="float32")
N_LAYERS = 3


def realistic_kv(seed: int, geometry: Geometry = GEOM) -> np.ndarray:
    """[2, T, H, D] float32: keys with a few large outlier
    channels (as real keys have), values plain."""
    rng = np.random.default_rng(seed)
    T, H, D = geometry.n_tokens, geometry.kv_heads, geometry.head_dim
    k = rng.standard_normal((T, H, D)) * rng.uniform(0.2, 2.0, size=(1, H, D))
    k[:, :, :3] += rng.choice([-25.0, 18.0, 40.0], size=(1, H, 3))
    v = rng.standard_normal((T, H, D)) * 0.7
    v[5] = 0.0  # a constant group
    v[6] *= 1e-6  # tiny values
    return np.stack([k, v]).astype(np.float32)


def random_checkpoint(
    path: Path,
    n_layers: int = N_LAYERS,
    head_dim: int = GEOM.head_dim,
    latent: int = 16,
    hidden: int = 24,
    seed: int = 0,
) -> str:
    rng = np.random.default_rng(seed)
    D, L, Hd = head_dim, latent, hidden
    shapes = {
        "mean": (D,),
        "std": (D,),
        "w1": (D, Hd),
        "b1": (Hd,),
        "w2": (Hd, L),
        "b2": (L,),
        "w3": (L, Hd),
        "b3": (Hd,),
        "w4": (Hd, D),
        "b4": (D,),
    }
    tensors = {}
    for kv in "kv":
        for layer in range(n_layers):
            for name, shape in shapes.items():
                t = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[0])
                if name == "std":
                    t = np.abs(t) + 0.5
                tensors[f"{kv}{layer}.{name}"] = t
    meta = {
        "format": "kvstrata-autoencoder",
        "version": "1",
        "n_layers": str(n_layers),
        "head_dim": str(D),
        "latent": str(L),
        "hidden": str(Hd),
    }
    return Checkpoint(tensors, meta).save(path)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    random_checkpoint(path)
    return path


THETA = 10000.0
LAE_BITS = {"k": 8 * 40, "v": 8 * 56}  # of 96 elements per vector: 3.3 and 4.7 bits per element


def lae_training_data(seeds, geometry: Geometry = GEOM) -> dict:
    """``{(kv, layer): [(first_position, x [T, H, D])]}``:
    :func:`realistic_kv` as stored KV of chunks at
    positions ``40 * seed`` (the fixture derotates
    these keys: harmless, they are not RoPE'd data)."""
    out: dict = {}
    for seed in seeds:
        for layer in range(N_LAYERS):
            x = realistic_kv(1000 * layer + seed, geometry)
            out.setdefault(("k", layer), []).append((40 * seed, x[0]))
            out.setdefault(("v", layer), []).append((40 * seed, x[1]))
    return out


def train_lae(seed: int = 0, derotate: bool = True, **kw) -> LinearCheckpoint:
    return train_linear(
        lae_training_data(range(12)),
        lae_training_data(range(20, 24)),
        kv_heads=GEOM.kv_heads,
        head_dim=GEOM.head_dim,
        k_bits=LAE_BITS["k"],
        v_bits=LAE_BITS["v"],
        derotate=derotate,
        rope_theta=THETA,
        seed=seed,
        **kw,
    )


@pytest.fixture(scope="module")
def lae_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lae") / "lae.safetensors"
    train_lae().save(path)
    return path


CODECS = {
    "none": ("none", {}),
    "fp8": ("fp8", {}),
    "int8": ("int8", {}),
    "int4": ("int4", {}),
    "int4-g16": ("int4", {"group_size": 16}),
    "int8-g7": ("int8", {"group_size": 7}),
    "ae-int8": ("autoencoder", {"latent_int8": True}),
    "ae-fp16": ("autoencoder", {"latent_int8": False}),
    "lae": ("linear-ae", {}),  # exact_tokens 1 (the default)
    "lae-x0": ("linear-ae", {"exact_tokens": 0}),
    "lae-x3": ("linear-ae", {"exact_tokens": 3}),
}


def make_codec(name: str, ckpt: Path, lae: Path | None = None):
    kind, params = CODECS[name]
    if kind == "autoencoder":
        params = {**params, "checkpoint": str(ckpt)}
    if kind == "linear-ae":
        params = {**params, "checkpoint": str(lae)}
    return codec_from_config(name, kind, params)


# the linear-ae fixture's relative error on realistic_kv
# data (measured: K <= 0.066, V <= 0.091), with margin
LAE_MAX_REL_ERR = {"k": 0.08, "v": 0.12}


def check_within_bound(
    codec, x: np.ndarray, y: np.ndarray, layer: int = 0, first_position: int = 0
) -> None:
    """Hold ``y = decode(encode(x))`` to the codec's documented bound."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    err = np.abs(y64 - x64)
    if codec.lossless:
        np.testing.assert_array_equal(y, x)
    elif codec.id == "fp8":
        s = np.abs(x64).reshape(2, -1).max(axis=1) / 448
        bound = 2.0**-4 * np.abs(x64) + 2.0**-10 * s[:, None, None, None]
        assert (err <= bound * (1 + 1e-6) + 1e-12).all(), float((err - bound).max())
    elif codec.id in ("int8", "int4"):
        bits = 8 if codec.id == "int8" else 4
        kb = group_error_bound(x[0], 0, codec.group_size, bits)
        vb = group_error_bound(x[1], 2, codec.group_size, bits)
        assert (err[0] <= kb).all() and (err[1] <= vb).all(), (
            float((err[0] - kb).max()),
            float((err[1] - vb).max()),
        )
    elif codec.id == "autoencoder":
        # no a-priori bound: the result is the autoencoder's own reconstruction up to latent storage
        T, H, D = x.shape[1:]
        for i, kv in enumerate("kv"):
            ref = codec.ckpt.decode(codec.ckpt.encode(x[i].reshape(-1, D), kv, 0), kv, 0).reshape(
                T, H, D
            )
            rel = np.linalg.norm(y[i] - ref) / np.linalg.norm(ref)
            assert rel < (0.05 if codec.latent_int8 else 2e-3), rel
    elif codec.id == "linear-ae":
        # exactly the checkpoint's quantized transform but for up to exact_tokens tokens, which are
        # x in fp16; and within the error measured on this data
        recorded = json.loads(codec.ckpt.meta["heldout_rel_err"])
        for i, kv in enumerate("kv"):
            ref = codec.ckpt.roundtrip(x[i], kv, layer, first_position)
            exact = np.flatnonzero((y[i] != ref).any(axis=(1, 2)))
            assert len(exact) <= codec.exact_tokens
            np.testing.assert_array_equal(
                y[i][exact], x[i][exact].astype(np.float16).astype(np.float32)
            )
            rel = np.linalg.norm(y[i] - x[i].astype(np.float64)) / np.linalg.norm(x[i])
            assert rel <= max(1.5 * recorded[f"{kv}{layer}"], LAE_MAX_REL_ERR[kv]), (kv, rel)
    else:  # pragma: no cover
        raise AssertionError(codec.id)


# -- codec level ------------------------------------------------------------------------------


def test_registry_declares_lossless_and_lossy() -> None:
    kinds = codec_kinds()
    assert {"none", "fp8", "int8", "int4", "autoencoder", "linear-ae"} <= set(kinds)
    assert kinds["none"].lossless and not any(
        kinds[k].lossless for k in ("fp8", "int8", "int4", "autoencoder", "linear-ae")
    )
    for k in ("fp8", "int8", "int4"):
        assert "Error bound" in kinds[k].__doc__
    import kvstrata.compression.autoencoder as ae
    import kvstrata.compression.linear as lae

    assert "Error bound" in ae.__doc__ and "Error bound" in lae.__doc__


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_within_stated_bound(name: str, seed: int, ckpt_path, lae_path) -> None:
    codec = make_codec(name, ckpt_path, lae_path)
    x = realistic_kv(seed)
    section = codec.encode(x, layer=0)
    assert section == codec.encode(x, layer=0)  # pure
    y = codec.decode(section, GEOM)
    assert y.shape == GEOM.shape and y.dtype == np.float32
    check_within_bound(codec, x, y)
    # the header confirms the reader's configured codec
    again = codec_from_header(name, header_params(name, codec), {name: codec})
    np.testing.assert_array_equal(again.decode(section, GEOM), y)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "lae"])
def test_half_precision_inputs(name: str, dtype: str, ckpt_path, lae_path) -> None:
    geom = Geometry(GEOM.n_tokens, GEOM.kv_heads, GEOM.head_dim, dtype)
    canonical = from_float32(realistic_kv(3), dtype)
    codec = make_codec(name, ckpt_path, lae_path)
    y = codec.decode(codec.encode(canonical), geom)
    assert y.dtype == canonical.dtype
    x32, y32 = to_float32(canonical, dtype), to_float32(y, dtype)
    # the bound on the float32 result, then the output dtype's rounding (half an ulp, relative)
    z = codec.decode(
        codec.encode(canonical), Geometry(geom.n_tokens, geom.kv_heads, geom.head_dim, "float32")
    )
    check_within_bound(codec, x32, z)
    ulp = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    assert (np.abs(y32 - z) <= ulp * np.abs(z) + 2.0**-24).all()


def test_fp8_matches_torch_cast() -> None:
    torch = pytest.importorskip("torch")
    x = np.concatenate(
        [np.random.default_rng(0).standard_normal(20000) * s for s in (300, 1, 1e-2, 1e-3)]
    )
    x = np.clip(x, -448, 448).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fp8_e4m3_encode(x), ref)


def test_sizes() -> None:
    x = realistic_kv(0)
    g = GEOM
    n = g.n_tokens * g.kv_heads * g.head_dim
    assert len(codec_from_header("fp8", {}).encode(x)) == 8 + 2 * n
    int8 = codec_from_header("int8", {"group_size": 32})
    k_groups, v_groups = 2 * g.kv_heads * g.head_dim, g.n_tokens * g.kv_heads * 2
    assert len(int8.encode(x)) == 2 * n + 4 * (k_groups + v_groups)
    assert len(codec_from_header("int4", {"group_size": 32}).encode(x)) == n + 4 * (
        k_groups + v_groups
    )


def test_bad_sections_and_params_are_codec_errors(ckpt_path) -> None:
    x = realistic_kv(0)
    int4 = codec_from_header("int4", {"group_size": 32})
    section = int4.encode(x)
    with pytest.raises(CodecError, match="codec 'nosuch' is not configured"):
        codec_from_header("nosuch", {})
    with pytest.raises(
        CodecError, match="codec 'myname' is not configured"
    ):  # a header cannot name a kind
        codec_from_header("myname", {"kind": "int4"})
    with pytest.raises(CodecError, match="unknown codec kind 'nosuch'"):
        codec_from_config("myname", "nosuch", {})
    with pytest.raises(CodecError, match="does not understand parameter 'bits'"):
        codec_from_header("int4", {"bits": 3})
    with pytest.raises(CodecError, match="must be int"):
        codec_from_header("int4", {"group_size": "32"})
    with pytest.raises(
        CodecError, match="group_size=16 need"
    ):  # params that do not match the section
        codec_from_header("int4", {"group_size": 16}).decode(section, GEOM)
    with pytest.raises(CodecError):
        int4.decode(section[:-1], GEOM)
    with pytest.raises(CodecError, match="section is"):
        codec_from_header("fp8", {}).decode(section, GEOM)
    bad_scales = bytearray(codec_from_header("fp8", {}).encode(x))
    bad_scales[0:4] = np.float32(np.nan).tobytes()
    with pytest.raises(CodecError, match="non-finite"):
        codec_from_header("fp8", {}).decode(bytes(bad_scales), GEOM)
    ae = make_codec("ae-int8", ckpt_path)
    configured = {"ae": ae}
    with pytest.raises(CodecError, match="sha256"):
        codec_from_header("ae", {**header_params("ae", ae), "sha256": "0" * 64}, configured)
    with pytest.raises(
        CodecError, match="checkpoint"
    ):  # a path in a header is refused, never opened
        codec_from_header(
            "ae",
            {**header_params("ae", ae), "checkpoint": "/nonexistent/ae.safetensors"},
            configured,
        )
    with pytest.raises(CodecError, match="reuse"):
        codec_from_header("ae", {**header_params("ae", ae), "reuse": True}, configured)
    with pytest.raises(CodecError, match="checkpoint from this reader's configuration"):
        codec_from_header("autoencoder", {k: v for k, v in ae.params.items()})
    with pytest.raises(CodecError, match="head_dim"):
        ae.encode(x[..., :24])
    with pytest.raises(CodecError, match="flags"):  # int8-latent section read as fp16-latent object
        AutoencoderCodec(str(ckpt_path), latent_int8=False).decode(
            ae.encode(x)[:4]
            + bytes(len(AutoencoderCodec(str(ckpt_path), latent_int8=False).encode(x)) - 4),
            GEOM,
        )


def test_autoencoder_sections_carry_their_layer(ckpt_path) -> None:
    ae = make_codec("ae-fp16", ckpt_path)
    x = realistic_kv(0)
    a, b = ae.encode(x, layer=0), ae.encode(x, layer=2)
    assert a != b  # different layers' autoencoders
    for layer, section in ((0, a), (2, b)):
        y = ae.decode(section, GEOM)
        ref = ae.ckpt.decode(ae.ckpt.encode(x[0].reshape(-1, 48), "k", layer), "k", layer).reshape(
            x[0].shape
        )
        assert np.linalg.norm(y[0] - ref) / np.linalg.norm(ref) < 2e-3
    with pytest.raises(CodecError, match="no layer 3"):
        ae.encode(x, layer=3)


def test_training_is_deterministic_and_meets_its_recorded_error(tmp_path) -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    D, rank = 16, 4

    def data(n, seed):
        r = np.random.default_rng(seed)
        return {
            (kv, layer): (
                r.standard_normal((n, rank)) @ basis[(kv, layer)] + 0.01 * r.standard_normal((n, D))
            ).astype(np.float32)
            for kv in "kv"
            for layer in range(2)
        }

    basis = {(kv, layer): rng.standard_normal((rank, D)) for kv in "kv" for layer in range(2)}
    train_set, held = data(2048, 1), data(512, 2)
    a = train(train_set, held, latent=8, hidden=32, steps=100, batch=256, seed=7, lr=3e-2)
    b = train(train_set, held, latent=8, hidden=32, steps=100, batch=256, seed=7, lr=3e-2)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert a.save(pa) == b.save(pb)  # same seed: identical checkpoint bytes
    recorded = json.loads(a.meta["heldout_rel_err"])
    assert max(recorded.values()) < 0.1
    codec = AutoencoderCodec(str(pa), latent_int8=True)
    test = data(256, 3)
    for (kv, layer), x in test.items():
        assert rel_error(codec.ckpt, x, kv, layer) <= 2 * recorded[f"{kv}{layer}"]


# -- the learned linear codec (linear-ae) --------------------------------------------------------


def test_lae_packing_round_trips_any_bit_widths() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        bits = rng.integers(1, 9, size=int(rng.integers(1, 120)))
        codes = (rng.integers(0, 256, size=(9, len(bits))) % (1 << bits)).astype(np.uint8)
        packer = Packer(bits)
        packed = packer.pack(codes)
        assert packed.shape == (9, (int(bits.sum()) + 7) // 8)
        ref = np.packbits(
            np.unpackbits(codes[:, :, None], axis=2, bitorder="little")[
                :, np.arange(8) < bits[:, None]
            ],
            axis=1,
            bitorder="little",
        )  # the bit layout, spelled out
        np.testing.assert_array_equal(packed, ref)
        np.testing.assert_array_equal(packer.unpack(packed), codes)


def test_lae_bit_allocation_spends_the_budget_on_the_largest_variances() -> None:
    var = np.array([100.0, 10.0, 1.0, 0.1, 1e-4])
    bits = allocate_bits(var, 16)
    assert (
        bits.sum() == 16
        and list(bits) == sorted(bits, reverse=True)
        and bits[0] >= 5
        and bits[-1] == 0
    )
    assert allocate_bits(var, 100).sum() == 40  # at most 8 bits each


def test_lae_rope_derotation_is_exact_and_matters() -> None:
    x = realistic_kv(4)[0]
    back = rope_rotate(rope_rotate(x, 300, THETA, -1), 300, THETA, 1)
    assert np.abs(back - x).max() <= 1e-5 * np.abs(x).max()
    # keys that are low-rank before RoPE: a derotating codec needs their true position
    rng = np.random.default_rng(0)
    T, H, D = GEOM.n_tokens, GEOM.kv_heads, GEOM.head_dim
    basis = rng.standard_normal((6, H * D))

    def pre(seed: int) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal((T, 6)) @ basis
        return x.reshape(T, H, D).astype(np.float32)

    data = {
        ("k", 0): [(p, rope_rotate(pre(p), p, THETA, 1)) for p in range(0, 4000, 200)],
        ("v", 0): [(0, pre(1))],
    }
    ckpt = train_linear(
        data,
        {},
        kv_heads=H,
        head_dim=D,
        k_bits=8 * 12,
        v_bits=8 * 12,
        derotate=True,
        rope_theta=THETA,
    )
    x = rope_rotate(pre(12345), 1000, THETA, 1)
    assert linear_rel_error(ckpt, x, "k", 0, first_position=1000) < 0.05
    assert (
        linear_rel_error(ckpt, x, "k", 0, first_position=0) > 0.3
    )  # the wrong position: not the trained structure


def test_lae_section_records_its_position_and_decodes_on_its_own(lae_path) -> None:
    codec = make_codec("lae", None, lae_path)
    x = realistic_kv(5)
    a, b = codec.encode(x, 1, first_position=0), codec.encode(x, 1, first_position=4096)
    assert a != b and len(a) == len(b) == codec.section_bytes(GEOM)
    C = GEOM.kv_heads * GEOM.head_dim
    assert len(a) == 8 + GEOM.n_tokens * ((LAE_BITS["k"] + LAE_BITS["v"]) // 8 + 4) + 2 * (
        2 + 2 * C
    )
    # exact tokens (fp16): the sequence's first token when the chunk holds it, else the token with
    # the largest relative error -- here a tiny key unlike the training data
    odd = x.copy()
    odd[0, 7] = 1e-3 * np.random.default_rng(0).standard_normal(odd[0, 7].shape)

    def fp16(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float16).astype(np.float32)

    y = codec.decode(codec.encode(odd, 1, first_position=0), GEOM)
    np.testing.assert_array_equal(y[:, 0], fp16(odd[:, 0]))
    assert not np.array_equal(y[0, 7], fp16(odd[0, 7]))
    y = codec.decode(codec.encode(odd, 1, first_position=40), GEOM)
    np.testing.assert_array_equal(y[0, 7], fp16(odd[0, 7]))
    for pos, section in ((0, a), (4096, b)):
        check_within_bound(codec, x, codec.decode(section, GEOM), 1, pos)
    assert codec.encode(x, 1) == a  # default position 0; pure


def test_lae_training_is_deterministic_and_meets_its_recorded_error(tmp_path) -> None:
    a, b = train_lae(seed=3, max_vectors=300), train_lae(seed=3, max_vectors=300)
    assert a.save(tmp_path / "a.safetensors") == b.save(tmp_path / "b.safetensors")
    assert (
        train_lae(seed=4, max_vectors=300).save(tmp_path / "c.safetensors") != a.sha256
    )  # the seed samples
    full = train_lae()
    recorded = json.loads(full.meta["heldout_rel_err"])
    assert max(recorded[f"k{i}"] for i in range(N_LAYERS)) < LAE_MAX_REL_ERR["k"]
    assert max(recorded[f"v{i}"] for i in range(N_LAYERS)) < LAE_MAX_REL_ERR["v"]
    for (kv, layer), seqs in lae_training_data(
        range(40, 43)
    ).items():  # unseen data, same distribution
        for pos, x in seqs:
            assert linear_rel_error(full, x, kv, layer, pos) <= 1.5 * recorded[f"{kv}{layer}"]


def test_lae_refuses_what_it_cannot_decode(lae_path, ckpt_path, tmp_path) -> None:
    codec = make_codec("lae", None, lae_path)
    x = realistic_kv(0)
    section = codec.encode(x, 0)
    configured = {"lae": codec}
    with pytest.raises(CodecError, match="latent_int8"):
        codec_from_header("lae", {**header_params("lae", codec), "latent_int8": True}, configured)
    with pytest.raises(CodecError, match="exact_tokens"):  # another exact_tokens than the writer's
        codec_from_header("lae", {**header_params("lae", codec), "exact_tokens": 2}, configured)
    with pytest.raises(CodecError, match="sha256"):
        codec_from_header("lae", {**header_params("lae", codec), "sha256": "0" * 64}, configured)
    with pytest.raises(
        CodecError, match="differ"
    ):  # a header naming a checkpoint: refused, not opened
        codec_from_header("lae", {"kind": "linear-ae", "checkpoint": str(ckpt_path)}, configured)
    with pytest.raises(CodecError, match="section is"):
        codec.decode(section[:-1], GEOM)
    with pytest.raises(CodecError, match="KV heads"):
        codec.decode(section, Geometry(GEOM.n_tokens * 2, 1, GEOM.head_dim, "float32"))
    with pytest.raises(CodecError, match="KV heads"):
        codec.encode(x[:, :, :1])
    with pytest.raises(CodecError, match="no layer 3"):
        codec.encode(x, 3)
    flipped = bytearray(section)
    flipped[2] ^= 1  # the derotation flag
    with pytest.raises(CodecError, match="flags"):
        codec.decode(bytes(flipped), GEOM)
    bad = bytearray(section)
    k_codes = GEOM.n_tokens * LAE_BITS["k"] // 8
    bad[8 + k_codes : 8 + k_codes + 2] = np.float16(np.inf).tobytes()
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(bytes(bad), GEOM)
    bad = bytearray(section)
    at = 8 + k_codes + 2 * GEOM.n_tokens  # K's exact-token index
    bad[at : at + 2] = np.uint16(GEOM.n_tokens).tobytes()
    with pytest.raises(CodecError, match="exact-token"):
        codec.decode(bytes(bad), GEOM)
    ckpt = LinearCheckpoint.load(lae_path)
    newer = tmp_path / "v2.safetensors"
    from kvstrata.compression.checkpoint_file import encode as _safetensors_bytes

    newer.write_bytes(_safetensors_bytes(ckpt.tensors(), {**ckpt.meta, "version": "2"}))
    with pytest.raises(CodecError, match="version 2"):
        LinearAECodec(str(newer))
    short = tmp_path / "short.safetensors"
    short.write_bytes(
        _safetensors_bytes({k: v for k, v in ckpt.tensors().items() if k != "v2.clip"}, ckpt.meta)
    )
    with pytest.raises(CodecError, match="v2.clip missing"):
        LinearAECodec(str(short))


def test_cli_show_prints_a_linear_checkpoint(lae_path) -> None:
    from typer.testing import CliRunner

    from kvstrata.cli.codec import codec_app

    result = CliRunner().invoke(codec_app, ["show", str(lae_path)])
    assert result.exit_code == 0, result.output
    assert "kvstrata-linear-ae" in result.output and "k_bits" in result.output


# -- every codec through every tier ---------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
async def test_every_codec_through_every_tier(tier: Tier, name: str, ckpt_path, lae_path) -> None:
    codec = make_codec(name, ckpt_path, lae_path)
    keys = make_keys(2)
    data = {
        k: np.stack([realistic_kv(10 * i + layer) for layer in range(N_LAYERS)])
        for i, k in enumerate(keys)
    }
    ns = Namespace("test-model", "float32", name)
    blobs = []
    for i, k in enumerate(keys):
        meta = fmt.ObjectMeta(
            name,
            "float32",
            GEOM.n_tokens,
            GEOM.kv_heads,
            GEOM.head_dim,
            ns.fingerprint,
            k.digest,
            header_params(name, codec),
        )
        # chunk i starts at position 40 * i (codecs other than linear-ae ignore it)
        blobs.append(
            (
                k,
                fmt.encode(
                    meta,
                    [
                        codec.encode(data[k][layer], layer, first_position=40 * i)
                        for layer in range(N_LAYERS)
                    ],
                ),
            )
        )
    await tier.put(blobs)
    for layers in (None, range(1, 3)):
        fetched = await tier.get(keys, layers=layers)
        for k, got in zip(keys, fetched, strict=True):
            assert isinstance(got, Hit), got
            m = got.obj.meta
            reader = codec_from_header(
                m.codec, m.codec_params, {name: codec}
            )  # confirmed by the header
            for layer in layers or range(N_LAYERS):
                y = reader.decode(got.obj.layers[layer], GEOM)
                if codec.id == "autoencoder":
                    np.testing.assert_array_equal(
                        y, codec.decode(codec.encode(data[k][layer], layer), GEOM)
                    )
                    ref = codec.ckpt.decode(
                        codec.ckpt.encode(data[k][layer][1].reshape(-1, 48), "v", layer), "v", layer
                    )
                    assert np.linalg.norm(y[1].reshape(-1, 48) - ref) / np.linalg.norm(ref) < 0.05
                else:
                    check_within_bound(codec, data[k][layer], y, layer, 40 * keys.index(k))


# -- configuration ------------------------------------------------------------------------


def cfg(codecs: str, route_codec: str, tmp_path: Path | None = None) -> str:
    disk = f"  local: {{kind: disk, path: {tmp_path / 'disk'}}}\n" if tmp_path else ""
    return (
        "version: 1\nchunk_tokens: 32\ntiers:\n  dram: {kind: memory, capacity_bytes: 64MiB}\n"
        + disk
        + (f"codecs:\n{textwrap.indent(textwrap.dedent(codecs), '  ')}" if codecs else "")
        + f"policy:\n  default: {{read: [dram], write: [dram], codec: {{dram: {route_codec}}}}}\n"
    )


def test_config_unknown_route_codec_has_file_and_line() -> None:
    text = cfg("q4: {kind: int4, group_size: 16}\n", "q5")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "strata.yaml")
    line = (
        text.splitlines().index(next(s for s in text.splitlines() if "codec: {dram: q5}" in s)) + 1
    )
    assert str(info.value).startswith(
        f"strata.yaml:{line}: policy.default.codec.dram: unknown codec 'q5'"
    )
    assert "q4" in str(info.value)


def test_config_codec_section_errors() -> None:
    text = cfg(
        """\
        ok: {kind: int4}
        nokind: {group_size: 4}
        badkind: {kind: zstd}
        badparam: {kind: int8, bits: 3}
        badvalue: {kind: int8, group_size: 0}
        this-name-is-too-long-for-a-header: {kind: int8}
        noae: {kind: autoencoder, checkpoint: /nonexistent.safetensors}
        none: {kind: int8}
        """,
        "ok",
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml")
    msg = str(info.value)
    for expected in (
        "s.yaml:7: codecs.nokind.kind: required key missing",
        "s.yaml:8: codecs.badkind.kind: unknown codec kind 'zstd'",
        "s.yaml:9: codecs.badparam: codec 'int8' does not understand parameter 'bits'",
        "s.yaml:10: codecs.badvalue: codec 'int8': group_size must be in 1..4096",
        "s.yaml:11: codecs.this-name-is-too-long-for-a-header: invalid codec name",
        "s.yaml:12: codecs.noae: cannot read checkpoint",
        "s.yaml:13: codecs.none: 'none' is a built-in lossless codec and cannot be redefined",
    ):
        assert expected in msg, msg


def test_config_builtins_and_relative_checkpoint(tmp_path, ckpt_path) -> None:
    c = parse_config(cfg("", "int8"))
    assert c.codec("int8").kind == "int8" and not c.codecs
    (tmp_path / "ae.safetensors").write_bytes(ckpt_path.read_bytes())
    path = tmp_path / "strata.yaml"
    path.write_text(
        cfg("ae: {kind: autoencoder, checkpoint: ae.safetensors, latent_int8: false}\n", "ae")
    )
    from kvstrata.config import load_config

    spec = load_config(path).codec("ae")
    assert spec.kind == "autoencoder" and spec.params["checkpoint"] == str(
        tmp_path / "ae.safetensors"
    )
    assert len(spec.params["sha256"]) == 64 and spec.params["latent_int8"] is False


# -- the orchestrator -------------------------------------------------------------------------

MODEL = ModelSpec("tiny-codec-model", n_layers=N_LAYERS, kv_heads=2, head_dim=48, dtype="float32")


@pytest.fixture
def orch_for(tmp_path):
    made = []

    def build(codecs: str, route_codec: str) -> Orchestrator:
        o = Orchestrator(parse_config(cfg(codecs, route_codec, tmp_path)), MODEL)
        made.append(o)
        return o

    yield build
    for o in made:
        o.close()


def chunk_kv(i: int) -> np.ndarray:
    return np.stack(
        [realistic_kv(100 * i + layer, Geometry(32, 2, 48, "float32")) for layer in range(N_LAYERS)]
    )


def save_and_load(orch: Orchestrator, tokens) -> tuple:
    plan = orch.lookup(tokens, RequestContext())
    for i in range(len(tokens) // 32):
        assert orch.save(plan, i, chunk_kv(i))
    assert orch.flush(30)
    plan = orch.lookup(tokens, RequestContext())
    handle = orch.load(plan)
    assert handle.wait_all(30)
    return plan, handle


def test_orchestrator_encodes_with_the_named_codecs_params(orch_for) -> None:
    orch = orch_for("q4: {kind: int4, group_size: 16}\n", "q4")
    tokens = np.arange(2 * 32 + 3)
    plan, handle = save_and_load(orch, tokens)
    assert set(plan.keys) >= {"none", "q4"} and [c.codec for c in plan.chunks] == ["q4", "q4"]
    assert not handle.failed
    (got,) = rt.run(orch.tiers["dram"].get([plan.chunks[0].key]))
    meta = got.obj.meta
    assert meta.codec == "q4" and dict(meta.codec_params) == {"group_size": 16, "kind": "int4"}
    assert meta.namespace == MODEL.namespace("", "q4").fingerprint  # the name is in the namespace
    codec = codec_from_header("int4", {"group_size": 16})
    for c in range(2):
        got = handle.chunk_kv(c)
        for layer in range(N_LAYERS):
            check_within_bound(codec, chunk_kv(c)[layer], got[layer])


@pytest.mark.parametrize("case", ["nosuch", "bad-param", "mismatched-params"])
def test_undecodable_object_is_a_counted_miss(orch_for, case: str) -> None:
    orch = orch_for("", "int8")
    tokens = np.arange(2 * 32 + 3) + 7
    plan, handle = save_and_load(orch, tokens)
    assert not handle.failed
    key = plan.chunks[1].key
    (got,) = rt.run(orch.tiers["dram"].get([key]))
    obj = got.obj
    params = {
        "nosuch": {"kind": "nosuch"},
        "bad-param": {"bits": 7},
        "mismatched-params": {"group_size": 16},
    }[case]
    meta = fmt.ObjectMeta(**{**obj.meta.__dict__, "codec_params": params})
    blob = fmt.encode(meta, [obj.layers[i] for i in range(N_LAYERS)])
    rt.run(orch.tiers["dram"].put([(key, blob)]))
    before = orch.telemetry.value("kvstrata_bad_objects_total", tier="dram", reason="codec")
    plan = orch.lookup(tokens, RequestContext())
    handle = orch.load(plan)
    assert handle.wait_all(30)
    assert handle.failed == {1}  # a miss: the engine recomputes chunk 1
    assert handle.chunk_kv(0) is not None
    assert (
        orch.telemetry.value("kvstrata_bad_objects_total", tier="dram", reason="codec")
        == before + 1
    )


def test_object_of_a_replaced_checkpoint_is_a_miss(orch_for, tmp_path) -> None:
    path = tmp_path / "ae.safetensors"
    random_checkpoint(path, seed=1)
    orch = orch_for(f"ae: {{kind: autoencoder, checkpoint: {path}}}\n", "ae")
    tokens = np.arange(32 + 3) + 11
    plan, handle = save_and_load(orch, tokens)
    assert not handle.failed
    random_checkpoint(path, seed=2)  # same path, other weights
    orch.objects.codecs.clear()  # as a new reader process would start
    plan = orch.lookup(tokens, RequestContext())
    handle = orch.load(plan)
    assert handle.wait_all(30) and handle.failed == {0}
    assert orch.telemetry.value("kvstrata_bad_objects_total", tier="dram", reason="codec") == 1


def test_cli_show_prints_a_checkpoint(ckpt_path) -> None:
    from typer.testing import CliRunner

    from kvstrata.cli.codec import codec_app

    result = CliRunner().invoke(codec_app, ["show", str(ckpt_path)])
    assert result.exit_code == 0, result.output
    assert "kvstrata-autoencoder" in result.output and "sha256" in result.output
    bad = ckpt_path.parent / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert CliRunner().invoke(codec_app, ["show", str(bad)]).exit_code == 1


def test_orchestrator_gives_codecs_each_chunks_position(orch_for, lae_path) -> None:
    # a codec that undoes RoPE must know where a chunk sits in the prompt: the orchestrator
    # passes chunk_index * chunk_tokens, and the section records it for the reader
    import struct

    orch = orch_for(f"lae: {{kind: linear-ae, checkpoint: {lae_path}}}\n", "lae")
    plan, handle = save_and_load(orch, np.arange(3 * 32 + 3) + 11)
    assert not handle.failed and [c.index for c in plan.chunks] == [0, 1, 2]
    codec = orch.objects.codec("lae")
    for c in plan.chunks:
        (got,) = rt.run(orch.tiers["dram"].get([c.key]))
        loaded = handle.chunk_kv(c.index)
        for layer in range(N_LAYERS):
            assert struct.unpack_from("<HBBI", got.obj.layers[layer])[3] == c.index * 32
            for i, kv in enumerate("kv"):
                ref = codec.ckpt.roundtrip(chunk_kv(c.index)[layer][i], kv, layer, c.index * 32)
                differ = np.flatnonzero((loaded[layer][i] != ref).any(axis=(1, 2)))
                assert len(differ) <= codec.exact_tokens  # only the tokens kept exact
