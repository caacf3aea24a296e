"""Engine page layouts <-> canonical KV, one converter per attention backend.

Canonical KV of a run of tokens is ``[2, tokens, kv_heads, head_dim]`` (K then
V), the order of the object format. Engines store KV in pages whose layout
depends on the backend; a :class:`PageLayout` reads whole blocks out as
canonical KV and writes canonical KV into blocks. Blocks are listed in token
order; block ``i`` holds tokens ``[i*block_size, (i+1)*block_size)``.

* :class:`CpuVecLayout` -- vLLM's CPU backend with the ``vec`` attention ISA
  (x86 AVX2/AVX-512 without AMX; what fp32 uses). Per layer
  ``[num_blocks, kv_heads, block_size, 2*head_dim]``; inside one (block,
  head) page K is stored dimension-major ``[head_dim][block_size]`` and V
  token-major ``[block_size][head_dim]`` (measured against transformers'
  K/V: docs/vllm-cpu.md).
  Objects of the ``pages`` codec hold these pages as they are
  (:mod:`kvstrata.compression.pages`): no transpose on either path.
* :class:`FlashLayout` -- GPU builds (FlashAttention and FlashInfer NHD):
  per layer ``[2, num_blocks, block_size, kv_heads, head_dim]``. Written for
  GPU builds, tested here on CPU tensors of that shape.

:func:`detect` picks a layout from what the engine registered; an unknown
layout returns ``None`` and the connector disables itself rather than place
KV it does not understand.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

# Loaded KV arrives as read-only numpy views of fetched buffers; torch only ever
# reads them (copying into pages), so its "not writable" warning is noise here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class PageLayout(Protocol):
    name: str
    block_size: int

    def read(self, kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        """Copy whole blocks out as canonical ``[2, n*block_size, H, D]`` (a new tensor)."""

    def write(self, kv_layer: torch.Tensor, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write canonical ``[2, n*block_size, H, D]`` into whole blocks."""

    def place(self, kv_layer: torch.Tensor, blocks: Sequence[tuple[int, np.ndarray]]) -> None:
        """Write canonical ``[2, block_size, H, D]`` arrays into their blocks: a load's whole
        layer (every chunk of every request) in one call, the hit path's only copy."""

    def read_pages(self, kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        """Copy whole blocks out in the page layout itself (what codec ``pages`` stores)."""

    def split_pages(self, pages: np.ndarray, n_blocks: int) -> list[np.ndarray]:
        """The flat pages of ``n_blocks`` blocks (from :meth:`read_pages`), one array per block."""

    def place_pages(self, kv_layer: torch.Tensor, blocks: Sequence[tuple[int, np.ndarray]]) -> None:
        """:meth:`place` for arrays from :meth:`split_pages`: a plain copy per block."""

    def place_pages_layers(
        self, layers: Sequence[tuple[torch.Tensor, Sequence[tuple[int, np.ndarray]]]]
    ) -> None:
        """:meth:`place_pages` for several layers in one call (split over threads as a whole)."""


class CpuVecLayout:
    name = "cpu-vec"

    def __init__(self, block_size: int, kv_heads: int, head_dim: int):
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, head_dim

    def read(self, kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        n, h, bs, d = len(block_ids), self.kv_heads, self.block_size, self.head_dim
        pages = kv_layer[block_ids].reshape(n, h, 2, bs * d)
        k = pages[:, :, 0].reshape(n, h, d, bs).permute(0, 3, 1, 2).reshape(n * bs, h, d)
        v = pages[:, :, 1].reshape(n, h, bs, d).permute(0, 2, 1, 3).reshape(n * bs, h, d)
        return torch.stack((k, v))

    def write(self, kv_layer: torch.Tensor, block_ids: list[int], kv: torch.Tensor) -> None:
        n, h, bs, d = len(block_ids), self.kv_heads, self.block_size, self.head_dim
        page = torch.empty(n, h, 2, bs * d, dtype=kv_layer.dtype)
        page[:, :, 0] = kv[0].reshape(n, bs, h, d).permute(0, 2, 3, 1).reshape(n, h, bs * d)
        page[:, :, 1] = kv[1].reshape(n, bs, h, d).permute(0, 2, 1, 3).reshape(n, h, bs * d)
        kv_layer[block_ids] = page.reshape(n, h, bs, 2 * d).to(kv_layer.device)

    def place(self, kv_layer: torch.Tensor, blocks: Sequence[tuple[int, np.ndarray]]) -> None:
        # One copy per block straight from the fetched buffer into the page, no staging tensor:
        # V rows move as they are, K is transposed on the way (numpy's per-call cost is ~1 us,
        # torch's ~5 us; stacking the blocks for one index_copy_ would copy every byte twice).
        # numpy releases the GIL while it copies: a layer's blocks are split over PLACE_THREADS
        # threads (the engine's own threads idle while it waits for this layer).
        if not blocks:
            return
        if kv_layer.device.type != "cpu" or not kv_layer.is_contiguous():
            for block, kv in blocks:
                self.write(kv_layer, [block], from_numpy(np.ascontiguousarray(kv), kv_layer.dtype))
            return
        h, bs, d = self.kv_heads, self.block_size, self.head_dim
        flat = to_numpy(kv_layer)
        k_pages = flat.reshape(-1, h, 2, d, bs)  # views of the same memory (contiguous)
        v_pages = flat.reshape(-1, h, 2, bs, d)

        def copy(part: Sequence[tuple[int, np.ndarray]]) -> None:
            for block, kv in part:
                k_pages[block, :, 0] = kv[0].transpose(1, 2, 0)
                v_pages[block, :, 1] = kv[1].transpose(1, 0, 2)

        _in_parallel(copy, blocks)

    def read_pages(self, kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        return kv_layer[block_ids]  # indexing by a list copies

    def split_pages(self, pages: np.ndarray, n_blocks: int) -> list[np.ndarray]:
        return list(pages.reshape(n_blocks, self.kv_heads, self.block_size, 2 * self.head_dim))

    def place_pages(self, kv_layer: torch.Tensor, blocks: Sequence[tuple[int, np.ndarray]]) -> None:
        self.place_pages_layers([(kv_layer, blocks)])

    def place_pages_layers(
        self, layers: Sequence[tuple[torch.Tensor, Sequence[tuple[int, np.ndarray]]]]
    ) -> None:
        if any(t.device.type != "cpu" or not t.is_contiguous() for t, _ in layers):
            for kv_layer, blocks in layers:
                for block, page in blocks:
                    kv_layer[block] = from_numpy(np.ascontiguousarray(page), kv_layer.dtype)
            return
        copies = [(to_numpy(t), block, page) for t, blocks in layers for block, page in blocks]

        def copy(part: Sequence[tuple[np.ndarray, int, np.ndarray]]) -> None:
            for flat, block, page in part:
                flat[block] = page

        if copies:
            _in_parallel(copy, copies)


class FlashLayout:
    name = "flash-nhd"

    def __init__(self, block_size: int, kv_heads: int, head_dim: int):
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, head_dim

    def read(self, kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        n = len(block_ids)
        pages = kv_layer[:, block_ids]  # [2, n, bs, H, D]
        return pages.reshape(2, n * self.block_size, self.kv_heads, self.head_dim).cpu()

    def write(self, kv_layer: torch.Tensor, block_ids: list[int], kv: torch.Tensor) -> None:
        n = len(block_ids)
        pages = kv.reshape(2, n, self.block_size, self.kv_heads, self.head_dim)
        kv_layer[:, block_ids] = pages.to(kv_layer.device, kv_layer.dtype)

    def place(self, kv_layer: torch.Tensor, blocks: Sequence[tuple[int, np.ndarray]]) -> None:
        # GPU builds: one host->device copy and one scatter per layer (many small copies to a
        # device cost a launch each)
        if not blocks:
            return
        ids = torch.tensor([block for block, _ in blocks], device=kv_layer.device)
        kv = from_numpy(np.stack([kv for _, kv in blocks], axis=1), kv_layer.dtype)
        kv_layer.index_copy_(1, ids, kv.to(kv_layer.device, kv_layer.dtype))

    # a chunk's pages [2, n, block_size, H, D] are the canonical order itself
    def read_pages(self, kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        return kv_layer[:, block_ids].cpu()

    def split_pages(self, pages: np.ndarray, n_blocks: int) -> list[np.ndarray]:
        per_block = pages.reshape(2, n_blocks, self.block_size, self.kv_heads, self.head_dim)
        return [per_block[:, i] for i in range(n_blocks)]

    def place_pages(self, kv_layer: torch.Tensor, blocks: Sequence[tuple[int, np.ndarray]]) -> None:
        self.place(kv_layer, blocks)

    def place_pages_layers(
        self, layers: Sequence[tuple[torch.Tensor, Sequence[tuple[int, np.ndarray]]]]
    ) -> None:
        for kv_layer, blocks in layers:
            self.place(kv_layer, blocks)


#: threads that copy one layer's blocks into pages (the caller's and PLACE_THREADS - 1 more);
#: measured on 2 cores: 183 MB of blocks in 98 ms with 2 threads, 159 ms with one
PLACE_THREADS = max(1, min(4, os.cpu_count() or 1))
PARALLEL_MIN_BLOCKS = 8  # fewer blocks: not worth a hand-off
_pool: ThreadPoolExecutor | None = None


def _in_parallel(copy, blocks: Sequence) -> None:
    """``copy(part)`` over ``blocks`` split in PLACE_THREADS parts, the last on this thread."""
    global _pool
    n = PLACE_THREADS if len(blocks) >= PARALLEL_MIN_BLOCKS else 1
    if n == 1:
        copy(blocks)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="kvstrata-place")
    step = -(-len(blocks) // n)
    parts = [blocks[i : i + step] for i in range(0, len(blocks), step)]
    futures = [_pool.submit(copy, part) for part in parts[:-1]]
    copy(parts[-1])
    for future in futures:
        future.result()


def detect(
    kv_layer: torch.Tensor,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    device_type: str,
    isa: str | None = None,
) -> PageLayout | None:
    """The layout of one registered layer tensor, or None if it is not one we know for sure."""
    shape = tuple(kv_layer.shape)
    if device_type == "cpu":
        if isa not in (None, "vec") or shape[1:] != (kv_heads, block_size, 2 * head_dim):
            return None
        return CpuVecLayout(block_size, kv_heads, head_dim)
    if len(shape) == 5 and shape[0] == 2 and shape[2:] == (block_size, kv_heads, head_dim):
        return FlashLayout(block_size, kv_heads, head_dim)
    return None


def expected_name(device_type: str, isa: str | None) -> str:
    """The name of the layout :func:`detect` finds on this platform (known before any tensor
    exists, so both connector roles key ``pages`` objects alike); "canonical" if none."""
    if device_type == "cpu":
        return CpuVecLayout.name if isa in (None, "vec") else "canonical"
    return FlashLayout.name


def to_numpy(t: torch.Tensor):
    """A CPU tensor as numpy; bfloat16 (which numpy lacks) as its raw uint16 bits."""
    t = t.detach().cpu()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def from_numpy(a, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`to_numpy` for a layer of ``dtype``."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
