"""The worker side of StrataConnector: moves KV between engine pages and the orchestrator.

Runs in vLLM's model process. ``start_load_kv`` starts the planned reads;
``wait_for_layer_load(l)`` places layer l of every loaded chunk into its
blocks, waiting only for that layer; ``save_kv_layer`` copies the pages of
chunks completed this step (a raw block copy: the conversion to canonical
order runs later on the orchestrator's threads) and, after the last layer,
hands each chunk to the save queue. Chunks that fail to load are reported
through ``load_errors`` so vLLM recomputes them.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque

import numpy as np
import torch

from kvstrata.connectors.vllm_async import AsyncLoads
from kvstrata.connectors.vllm_meta import LoadSpec, SaveSpec, StrataMetadata
from kvstrata.layout import PageLayout, to_numpy
from kvstrata.orchestrator import Orchestrator
from kvstrata.plan import LoadHandle, Plan

log = logging.getLogger(__name__)

LAYER_WAIT_S = 60.0

#: (blocks, bytes, seconds) of the page copy of each step's loads, all layers (newest last):
#: what placing a hit into vLLM's pages cost, read by benchmarks/vllm_ttft.py
PLACEMENTS: deque[tuple[int, int, float]] = deque(maxlen=256)


class WorkerSide:
    def __init__(self, orchestrator: Orchestrator, block_size: int, documents=None):
        self.orch = orchestrator
        self.chunk = orchestrator.chunk_tokens
        self.block_size = block_size
        self.n_layers = orchestrator.model.n_layers
        self.layout: PageLayout | None = None
        self._kv: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] = {}
        self._layers: list[str] = []
        self._loads: list[tuple[LoadSpec, LoadHandle]] = []
        self._staged: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._errors: set[int] = set()
        self._placed = [0, 0, 0.0]  # this step's loads so far: blocks, bytes, seconds
        self._all_placed = False  # this step's loads were placed whole at its first layer
        self.documents = documents  # a DocumentWorker (kvstrata.documents.connector) or None
        self.async_loads = AsyncLoads(self)  # loads between steps (kvstrata.connectors.vllm_async)

    def register(self, kv_caches: dict[str, torch.Tensor], layout: PageLayout) -> None:
        self._kv = dict(kv_caches)
        self._layers = sorted(kv_caches, key=_layer_number)  # layer index -> layer name
        self._index = {name: i for i, name in enumerate(self._layers)}
        self.layout = layout

    # -- loading ----------------------------------------------------------------

    def start_load(self, meta: StrataMetadata) -> None:
        for spec in meta.loads:
            self._loads.append((spec, self.orch.load(self.plan_of(spec))))
        self.async_loads.start(meta.async_loads)
        if self.documents is not None and meta.documents:
            self.documents.start(meta.documents)

    def plan_of(self, spec: LoadSpec) -> Plan:
        """The plan a load spec from the scheduler stands for, on this worker."""
        return spec.plan(self.orch.route(spec.rule), self.chunk)

    def wait_layer(self, layer_name: str) -> None:
        """Place layer ``layer_name`` of every load; never raises into the engine."""
        if (
            self.documents is not None and self.documents.pending
        ):  # stitched prefixes (documents branch)
            layer = self._index[layer_name]
            self.documents.place(
                layer,
                layer == self.n_layers - 1,
                self._kv[layer_name],
                self.layout,
                self.block_size,
            )
        if not self._loads:
            return
        try:
            self._place_layer(layer_name)
        except Exception:  # a bug or a bad object must cost a recompute, not the request
            log.exception("kvstrata: placing %s failed; its loads will be recomputed", layer_name)
            for spec, _ in self._loads:
                for chunk in spec.chunks:
                    self._errors.update(self._blocks(spec, chunk[0])[0])
            self._loads.clear()

    def _place_layer(self, layer_name: str) -> None:
        layer = self._index[layer_name]
        if layer == 0:
            # everything has arrived (a DRAM or disk hit): every layer in one parallel copy,
            # instead of one hand-off to the copy threads per layer
            self._all_placed = all(handle.done for _, handle in self._loads)
            if self._all_placed:
                self._place_all(self._loads)
        if not self._all_placed:
            self._place_one_layer(layer)
        if layer == self.n_layers - 1:
            blocks, nbytes, seconds = self._placed
            if blocks:
                PLACEMENTS.append((blocks, nbytes, seconds))
            self._placed = [0, 0, 0.0]
            for spec, handle in self._loads:
                for chunk_index in handle.failed:
                    self._errors.update(self._blocks(spec, chunk_index)[0])
            self._loads.clear()

    def _place_one_layer(self, layer: int) -> None:
        """Layer ``layer`` of every load, waiting for it (a layer-wise load still arriving)."""
        writes = _Writes()
        for spec, handle in self._loads:
            try:
                delivered = handle.wait_layer(layer, timeout=LAYER_WAIT_S)
            except TimeoutError:
                log.warning(
                    "kvstrata: layer %d of request %s not loaded in time", layer, spec.req_id
                )
                handle.fail([c[0] for c in spec.chunks])
                delivered = {}
            for chunk_index, kv in delivered.items():
                self._block_writes(writes, spec, chunk_index, kv)
        self._place({self._layers[layer]: writes})

    def place_arrived(self, spec: LoadSpec, handle: LoadHandle) -> set[int]:
        """Write every layer an (async) load has delivered so far into the request's pages, one
        batched copy per layer; the block ids of its chunks that failed. On the engine thread."""
        self._place_all([(spec, handle)])
        failed: set[int] = set()
        for chunk_index in handle.failed:
            failed.update(self._blocks(spec, chunk_index)[0])
        return failed

    def failed_blocks(self, spec: LoadSpec) -> set[int]:
        """Every block a load would have filled (what vLLM recomputes when it fails whole)."""
        return {b for chunk in spec.chunks for b in self._blocks(spec, chunk[0])[0]}

    def _place_all(self, loads: list[tuple[LoadSpec, LoadHandle]]) -> None:
        """Every layer these loads have delivered so far, placed in one call."""
        by_layer: dict[str, _Writes] = {}
        for name, layer in self._index.items():
            writes = by_layer[name] = _Writes()
            for spec, handle in loads:
                for chunk_index, kv in handle.wait_layer(layer, timeout=0).items():
                    self._block_writes(writes, spec, chunk_index, kv)
        self._place(by_layer)

    def _place(self, by_layer: dict[str, _Writes]) -> None:
        """Blocks of one or more layers: engine pages in one parallel copy over all of them,
        canonical KV one batched copy per layer (timed: the hit path's page copy)."""
        started = time.perf_counter()
        layers = [(self._kv[name], writes) for name, writes in by_layer.items()]
        self.layout.place_pages_layers([(target, w.pages) for target, w in layers])
        for target, writes in layers:
            self.layout.place(target, writes.canonical)
            for part in (writes.canonical, writes.pages):
                self._placed[0] += len(part)
                self._placed[1] += sum(kv.nbytes for _, kv in part)
        self._placed[2] += time.perf_counter() - started

    def _block_writes(
        self, writes: _Writes, spec: LoadSpec, chunk_index: int, kv: np.ndarray
    ) -> None:
        """Add (block id, that block's KV) for each block this chunk fills to ``writes``: views of
        canonical KV, or of engine pages for a chunk stored with codec ``pages``."""
        blocks, skip = self._blocks(spec, chunk_index)
        bs = self.block_size
        if self.orch.objects.is_native(spec.chunk_codec(chunk_index)):
            pages = self.layout.split_pages(kv, self.chunk // bs)
            writes.pages.extend((b, pages[skip // bs + i]) for i, b in enumerate(blocks))
        else:
            writes.canonical.extend(
                (b, kv[:, skip + i * bs : skip + (i + 1) * bs]) for i, b in enumerate(blocks)
            )

    def _blocks(self, spec: LoadSpec, chunk_index: int) -> tuple[list[int], int]:
        """The request's blocks this chunk fills beyond
        the engine's own, and how many tokens to skip."""
        per_chunk = self.chunk // self.block_size
        first = max(chunk_index * per_chunk, spec.skip_tokens // self.block_size)
        blocks = spec.block_ids[first : (chunk_index + 1) * per_chunk]
        return blocks, (first - chunk_index * per_chunk) * self.block_size

    def load_errors(self) -> set[int]:
        errors, self._errors = self._errors | self.async_loads.errors(), set()
        if self.documents is not None:
            errors |= self.documents.load_errors()
        return errors

    # -- saving -----------------------------------------------------------------

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor, meta: StrataMetadata) -> None:
        """Stage this layer of every chunk to save; never raises into the engine."""
        if not meta.saves:
            return
        try:
            self._stage_layer(layer_name, kv_layer, meta)
        except Exception:  # a failed save is a future miss, nothing more
            log.exception(
                "kvstrata: staging %s for saving failed; dropping this step's saves", layer_name
            )
            self._staged.clear()

    def _stage_layer(self, layer_name: str, kv_layer: torch.Tensor, meta: StrataMetadata) -> None:
        layer = self._index[layer_name]
        for spec in meta.saves:
            pages = self._staged.setdefault((spec.req_id, spec.chunk_index), [])
            # a copy (the blocks may be reused after this step), in the engine's own layout
            pages.append(self.layout.read_pages(kv_layer, spec.block_ids))
            if layer == self.n_layers - 1:
                self._submit(spec, self._staged.pop((spec.req_id, spec.chunk_index)))

    def _submit(self, spec: SaveSpec, pages: list[torch.Tensor]) -> None:
        if len(pages) != self.n_layers:
            log.warning(
                "kvstrata: chunk %d of %s missed layers; not saved", spec.chunk_index, spec.req_id
            )
            return

        def engine_pages() -> np.ndarray:  # runs on the orchestrator's save thread
            # the objects convert to canonical order for a tier whose codec is not `pages`
            return np.stack([to_numpy(p).reshape(-1) for p in pages])

        self.orch.write(spec.write(self.orch.route(spec.rule), self.chunk), engine_pages)

    def finish_step(self) -> None:
        """End of a step: anything still staged belongs
        to a step that did not reach the last layer."""
        if self._staged:
            log.warning("kvstrata: dropping %d partially staged chunks", len(self._staged))
            self._staged.clear()


class _Writes:
    """One layer's block writes, by what the arrays hold."""

    def __init__(self) -> None:
        self.canonical: list[tuple[int, np.ndarray]] = []  # [2, block_size, H, D] views
        self.pages: list[tuple[int, np.ndarray]] = []  # the layout's own per-block pages


def _layer_number(name: str) -> tuple[int, str]:
    found = re.findall(r"\d+", name)
    return (int(found[-1]) if found else 0, name)
