"""KV cache events for prefix-aware routers: which engine blocks kvstrata holds, in which tier.

vLLM publishes ``BlockStored`` / ``BlockRemoved`` events (``--kv-events-config``)
so that a router can send a request where its prefix is cached. kvstrata adds
its own, with the tier's name as ``medium`` (``dram``, ``local``, ...): the
blocks are vLLM's own block hashes (the engine computes them per request), so
a router matches them like the engine's own blocks.

Where they come from: the scheduler remembers, for each chunk it orders saved,
the chunk's blocks (hashes, tokens, parent); the worker's tier journals report
what each tier really gained or lost (:mod:`kvstrata.connectors.vllm_pool`,
worker metadata, every step); each such change becomes an event, handed to
vLLM by ``take_events()`` in the engine core. A chunk stored means
``BlockStored`` for its blocks in that tier; evicted or deleted,
``BlockRemoved``. Only changes the worker saw are reported: a chunk another
engine wrote to a shared store is that engine's event.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

#: chunks whose blocks are remembered for events (oldest forgotten first)
REMEMBER_CHUNKS = 65536


@dataclass(frozen=True)
class _Blocks:
    hashes: tuple
    parent: object
    token_ids: tuple[int, ...]


class EventLog:
    def __init__(self, block_size: int, enabled: bool):
        self.block_size = block_size
        self.enabled = enabled
        self._blocks: collections.OrderedDict[bytes, _Blocks] = collections.OrderedDict()
        self._events: list = []
        self._lock = threading.Lock()

    def remember(self, digests, request, first_block: int, n_blocks: int) -> None:
        """The chunk under ``digests`` (its key in each tier's codec) is blocks
        ``[first_block, first_block + n_blocks)`` of ``request``."""
        if not self.enabled:
            return
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        hashes = list(getattr(request, "block_hashes", ()) or ())[
            first_block : first_block + n_blocks
        ]
        if len(hashes) != n_blocks:  # the engine did not hash these blocks: nothing to name them by
            return
        parent = (
            maybe_convert_block_hash(request.block_hashes[first_block - 1]) if first_block else None
        )
        tokens = request.all_token_ids[
            first_block * self.block_size : (first_block + n_blocks) * self.block_size
        ]
        blocks = _Blocks(tuple(maybe_convert_block_hash(h) for h in hashes), parent, tuple(tokens))
        with self._lock:
            for digest in digests:
                self._blocks[digest] = blocks
                self._blocks.move_to_end(digest)
            while len(self._blocks) > REMEMBER_CHUNKS:
                self._blocks.popitem(last=False)

    def changed(self, pools: dict[str, dict[bytes, bool]]) -> None:
        """Tiers' changes reported by the worker: one event per change of a remembered chunk."""
        if not self.enabled:
            return
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        with self._lock:
            for tier, changes in pools.items():
                for digest, held in changes.items():
                    blocks = self._blocks.get(digest)
                    if blocks is None:
                        continue
                    if held:
                        self._events.append(
                            BlockStored(
                                block_hashes=list(blocks.hashes),
                                parent_block_hash=blocks.parent,
                                token_ids=list(blocks.token_ids),
                                block_size=self.block_size,
                                lora_id=None,
                                medium=tier,
                                lora_name=None,
                            )
                        )
                    else:
                        self._events.append(
                            BlockRemoved(block_hashes=list(blocks.hashes), medium=tier)
                        )

    def take(self) -> list:
        with self._lock:
            events, self._events = self._events, []
        return events


def enabled(vllm_config) -> bool:
    config = getattr(vllm_config, "kv_events_config", None)
    return bool(config is not None and getattr(config, "enable_kv_cache_events", False))
