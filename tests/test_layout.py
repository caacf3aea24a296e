"""Page layouts: checked against vLLM's own CPU cache-write kernel, and by round trips."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvstrata.layout import CpuVecLayout, FlashLayout, detect, from_numpy, to_numpy  # noqa: E402

BS, H, D, NB = 128, 3, 64, 6


def canonical(n_blocks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n_blocks * BS, H, D, generator=g)


def test_cpu_layout_matches_vllms_cache_write_kernel() -> None:
    ops = pytest.importorskip("vllm._custom_ops", reason="needs vLLM's CPU build")
    blocks = [4, 1, 3]  # any order: block i of the list holds tokens [i*BS, (i+1)*BS)
    kv = canonical(len(blocks))
    by_kernel = torch.zeros(NB, H, BS, 2 * D)
    key_cache, value_cache = by_kernel.view(NB, H, 2 * BS, D).chunk(2, dim=2)
    slots = torch.tensor([b * BS + o for b in blocks for o in range(BS)], dtype=torch.int64)
    ops.cpu_attn_reshape_and_cache(
        kv[0].contiguous(), kv[1].contiguous(), key_cache, value_cache, slots, "vec"
    )
    layout = CpuVecLayout(BS, H, D)
    assert torch.equal(layout.read(by_kernel, blocks), kv)  # reading what vLLM wrote
    ours = torch.zeros(NB, H, BS, 2 * D)
    layout.write(ours, blocks, kv)
    assert torch.equal(ours, by_kernel)  # writing what vLLM would write


@pytest.mark.parametrize(
    "layout_cls, shape",
    [
        (CpuVecLayout, (NB, H, BS, 2 * D)),
        (FlashLayout, (2, NB, BS, H, D)),  # GPU builds; a CPU tensor of the same shape here
    ],
)
def test_round_trip_touches_only_its_blocks(layout_cls, shape) -> None:
    layout = layout_cls(BS, H, D)
    pages = torch.full(shape, 7.0)
    kv = canonical(2, seed=1)
    layout.write(pages, [5, 2], kv)
    assert torch.equal(layout.read(pages, [5, 2]), kv)
    untouched = [b for b in range(NB) if b not in (5, 2)]
    rest = pages[untouched] if layout_cls is CpuVecLayout else pages[:, untouched]
    assert torch.all(rest == 7.0)


def test_flash_layout_places_token_head_dim_where_flash_attention_reads_it() -> None:
    layout = FlashLayout(BS, H, D)
    pages = torch.zeros(2, NB, BS, H, D)
    kv = canonical(2, seed=2)
    layout.write(pages, [3, 0], kv)
    t, h, d = BS + 5, 2, 7  # token 133 -> second listed block (0), offset 5
    assert pages[0, 0, 5, h, d] == kv[0, t, h, d] and pages[1, 0, 5, h, d] == kv[1, t, h, d]


def test_detect_refuses_what_it_does_not_know() -> None:
    assert isinstance(detect(torch.zeros(NB, H, BS, 2 * D), BS, H, D, "cpu", "vec"), CpuVecLayout)
    assert detect(torch.zeros(NB, H, BS, 2 * D), BS, H, D, "cpu", "amx") is None
    assert detect(torch.zeros(NB, H, BS, D), BS, H, D, "cpu", "vec") is None
    assert isinstance(detect(torch.zeros(2, NB, BS, H, D), BS, H, D, "cuda"), FlashLayout)
    assert detect(torch.zeros(NB, 2, BS, H, D), BS, H, D, "cuda") is None


def test_bfloat16_travels_as_raw_bits() -> None:
    t = torch.randn(4, 8).to(torch.bfloat16)
    a = to_numpy(t)
    assert a.dtype.name == "uint16"
    assert torch.equal(from_numpy(a, torch.bfloat16), t)


@pytest.mark.parametrize(
    "layout_cls, shape",
    [(CpuVecLayout, (NB, H, BS, 2 * D)), (FlashLayout, (2, NB, BS, H, D))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_place_writes_what_write_writes_block_by_block(layout_cls, shape, dtype) -> None:
    """The hit path's batched ``place`` (numpy block views, as loads deliver them) puts every
    byte where ``write`` would, and nothing anywhere else."""
    layout = layout_cls(BS, H, D)
    kv = canonical(3, seed=3).to(dtype)
    by_write, by_place = torch.full(shape, 7.0, dtype=dtype), torch.full(shape, 7.0, dtype=dtype)
    layout.write(by_write, [4, 0, 2], kv)
    arr = to_numpy(kv)  # [2, 3*BS, H, D], sliced per block like the worker does
    layout.place(by_place, [(b, arr[:, i * BS : (i + 1) * BS]) for i, b in enumerate([4, 0, 2])])
    assert torch.equal(by_place, by_write)
    layout.place(by_place, [])  # nothing to place: nothing changes
    assert torch.equal(by_place, by_write)


def test_place_into_a_non_contiguous_layer_falls_back_to_write() -> None:
    layout = CpuVecLayout(BS, H, D)
    strided = torch.zeros(NB, H, 2 * BS, 2 * D)[:, :, ::2]
    assert not strided.is_contiguous()
    kv = canonical(1, seed=4)
    layout.place(strided, [(3, to_numpy(kv))])
    assert torch.equal(layout.read(strided, [3]), kv)


def test_place_splits_many_blocks_over_threads_and_still_writes_every_one() -> None:
    from kvstrata import layout as layout_module

    n, total = 12, 20
    assert n >= layout_module.PARALLEL_MIN_BLOCKS
    layout = CpuVecLayout(BS, H, D)
    kv = canonical(n, seed=5)
    order = [19, 0, 7, 3, 12, 5, 17, 1, 9, 14, 2, 11]
    by_write, by_place = torch.zeros(total, H, BS, 2 * D), torch.zeros(total, H, BS, 2 * D)
    layout.write(by_write, order, kv)
    arr = to_numpy(kv)
    layout.place(by_place, [(b, arr[:, i * BS : (i + 1) * BS]) for i, b in enumerate(order)])
    assert torch.equal(by_place, by_write)
