"""Codec ``pages``: objects that hold the engine's own page layout.

Checked against the page layouts themselves (which test_layout checks against
vLLM's cache-write kernel): what the codec builds from canonical KV is
byte-for-byte what an engine holds, placing it is a plain copy, and the
objects never meet a reader of another layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvstrata import auth
from kvstrata.compression.base import CodecError, Geometry
from kvstrata.compression.pages import PagesCodec
from kvstrata.config import ConfigError, load_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator.objects import ChunkObjects
from kvstrata.plan import ChunkWrite
from kvstrata.policy.route import Route

torch = pytest.importorskip("torch")

from kvstrata.layout import CpuVecLayout, FlashLayout, to_numpy  # noqa: E402

BS, H, D, NB = 128, 3, 64, 5
GEOMETRY = Geometry(2 * BS, H, D, "float32")


def canonical(n_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, n_tokens, H, D)).astype(np.float32)


@pytest.mark.parametrize(
    "layout_cls, shape", [(CpuVecLayout, (NB, H, BS, 2 * D)), (FlashLayout, (2, NB, BS, H, D))]
)
def test_pages_are_what_the_engine_holds(layout_cls, shape) -> None:
    layout, codec = layout_cls(BS, H, D), PagesCodec(layout_cls.name, BS)
    kv, blocks = canonical(2 * BS), [3, 1]
    engine = torch.zeros(shape)
    layout.write(engine, blocks, torch.from_numpy(kv))
    held = to_numpy(layout.read_pages(engine, blocks)).reshape(-1)
    assert np.array_equal(codec.from_canonical(kv), held)  # saving converts to the engine's bytes
    assert np.array_equal(codec.to_canonical(held, GEOMETRY), kv)  # and back, exactly
    placed = torch.zeros(shape)
    layout.place_pages(placed, list(zip(blocks, layout.split_pages(held, 2), strict=True)))
    assert torch.equal(placed, engine)  # loading is a copy of those bytes


def test_place_pages_over_threads_writes_every_block_and_nothing_else() -> None:
    layout, n = CpuVecLayout(BS, H, D), 24  # more than PARALLEL_MIN_BLOCKS
    pages = np.random.default_rng(1).standard_normal((n, H, BS, 2 * D)).astype(np.float32)
    engine = torch.full((n + 8, H, BS, 2 * D), 7.0)
    blocks = list(range(n + 7, 7, -1))  # reversed, skipping 0..7 and the last
    layout.place_pages(engine, list(zip(blocks, pages, strict=True)))
    for i, b in enumerate(blocks):
        assert torch.equal(engine[b], torch.from_numpy(pages[i]))
    assert bool((engine[:8] == 7.0).all())


def test_codec_takes_pages_as_they_are_and_checks_lengths() -> None:
    codec = PagesCodec("cpu-vec", BS)
    pages = codec.from_canonical(canonical(2 * BS))
    section = codec.encode(pages)
    assert section == pages.tobytes() == codec.encode(canonical(2 * BS))
    assert np.array_equal(codec.decode(section, GEOMETRY), pages)
    with pytest.raises(CodecError):
        codec.decode(section[:-4], GEOMETRY)
    with pytest.raises(CodecError):
        codec.from_canonical(canonical(BS + 1))  # not whole blocks
    with pytest.raises(CodecError):
        PagesCodec("cpu-amx", BS)
    with pytest.raises(CodecError):
        PagesCodec.from_params({"layout": "cpu-vec", "block_size": 128, "path": "/etc"})


def test_the_layout_and_block_size_are_part_of_the_namespace() -> None:
    spec = ModelSpec("m", 2, H, D, "float32")
    cpu = ModelSpec("m", 2, H, D, "float32", page_layout="cpu-vec", page_block=128)
    gpu = ModelSpec("m", 2, H, D, "float32", page_layout="flash-nhd", page_block=16)
    cpu64 = ModelSpec("m", 2, H, D, "float32", page_layout="cpu-vec", page_block=64)
    names = {m.namespace(codec="pages").fingerprint for m in (spec, cpu, gpu, cpu64)}
    assert len(names) == 4
    # the canonical codecs' keys do not depend on the engine
    assert (
        cpu.namespace().fingerprint == gpu.namespace().fingerprint == spec.namespace().fingerprint
    )


def _objects(model: ModelSpec, tmp_path) -> ChunkObjects:
    path = tmp_path / "k.yaml"
    path.write_text("version: 1\ntiers: {dram: {kind: memory}}\n")
    return ChunkObjects(load_config(path), model, 2 * BS, auth.Keyring())


def test_objects_convert_engine_pages_for_a_canonical_codec_and_back(tmp_path) -> None:
    model = ModelSpec("m", 2, H, D, "float32", page_layout="cpu-vec", page_block=BS)
    objects = _objects(model, tmp_path)
    kv = np.stack([canonical(2 * BS, seed) for seed in (1, 2)])  # [layers, 2, T, H, D]
    codec = objects.codec("pages")
    pages = np.stack([codec.from_canonical(layer) for layer in kv])  # what a vLLM save hands in
    route = Route(read=("dram",), write=("dram",))
    from kvstrata.keys import chunk_keys

    key = chunk_keys(list(range(2 * BS)), model.namespace(), 2 * BS)[0]
    write = ChunkWrite(route, "", {"none": key, "pages": key}, ("dram",))
    from kvstrata import format as fmt

    as_none = fmt.decode(objects.encode(write, pages, "none"), keyring=objects.keyring)
    assert np.array_equal(
        np.frombuffer(bytes(as_none.layers[1]), np.float32).reshape(kv[1].shape), kv[1]
    )
    as_pages = fmt.decode(objects.encode(write, kv, "pages"), keyring=objects.keyring)
    assert bytes(as_pages.layers[0]) == pages[0].tobytes()
    assert as_pages.meta.codec_params == {"layout": "cpu-vec", "block_size": BS}
    assert objects.expected("", "pages").fits(as_pages)
    other = ModelSpec("m", 2, H, D, "float32", page_layout="flash-nhd", page_block=BS)
    assert not _objects(other, tmp_path).expected("", "pages").fits(as_pages)  # another layout


def test_a_config_cannot_redefine_pages(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "version: 1\ntiers: {dram: {kind: memory}}\n"
        "codecs:\n  fast: {kind: pages, block_size: 16}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "bad.yaml:4" in str(err.value) and "built in" in str(err.value)
    path.write_text("version: 1\ntiers: {dram: {kind: memory}}\ncodecs:\n  pages: {kind: int8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "bad.yaml:4" in str(err.value) and "cannot be redefined" in str(err.value)
