"""The save queue: chunks to store, written on the background loop, never blocking the engine.

:meth:`Writer.submit` is the one way in: every save (the engine's, a
promotion) is a :class:`~kvstrata.plan.ChunkWrite` plus its KV. The queue is
bounded; a full queue drops the chunk (counted). A chunk is *in flight* from
``submit`` until its write finished or failed: a lookup for it waits (see
:mod:`kvstrata.orchestrator.lookup`) instead of missing it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from kvstrata import runtime
from kvstrata.keys import ChunkKey
from kvstrata.orchestrator.calls import Failed, TierCalls
from kvstrata.orchestrator.objects import ChunkObjects
from kvstrata.plan import ChunkWrite
from kvstrata.policy.route import Route
from kvstrata.telemetry.metrics import Telemetry
from kvstrata.tiers.base import Evicted

log = logging.getLogger(__name__)

#: a chunk's canonical KV ``[n_layers, 2, chunk_tokens, kv_heads, head_dim]``, or a callable
#: producing it (run on a worker thread, so a page copy is converted off the engine's path)
KV = np.ndarray | Callable[[], np.ndarray]

Demote = Callable[[Route, str, Sequence[Evicted]], Awaitable[None]]


class Writer:
    def __init__(
        self, calls: TierCalls, objects: ChunkObjects, telemetry: Telemetry, queue_max: int
    ):
        self.calls, self.objects, self.telemetry = calls, objects, telemetry
        self.demote: Demote | None = None  # set by the orchestrator (movement)
        self._queue_max = queue_max
        self._pending = 0
        self._idle = threading.Condition(threading.Lock())
        self._queue: asyncio.Queue[tuple[ChunkWrite, KV]] | None = None
        self._workers: list[asyncio.Task] = []
        #: chunks queued for writing, by logical key: a lookup for them waits instead of missing
        self.inflight: dict[ChunkKey, asyncio.Future] = {}

    async def start(self, n: int) -> None:
        self._queue = asyncio.Queue()
        self._workers = [asyncio.create_task(self._work()) for _ in range(n)]

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()

    def submit(self, write: ChunkWrite, kv: KV) -> bool:
        """Queue one chunk for writing. Never blocks; False if nothing was queued.

        The caller must not modify ``kv`` afterwards.
        """
        if not write.tiers:
            return False
        with self._idle:
            if self._pending >= self._queue_max:
                self.telemetry.dropped("queue_full")
                return False
            self._pending += 1
            self.telemetry.queue_depth(self._pending)
        runtime.loop().call_soon_threadsafe(self._accept, write, kv)
        return True

    def _accept(self, write: ChunkWrite, kv: KV) -> None:
        """On the loop: queue the item and mark its chunk in flight (lookups wait for it)."""
        if write.logical_key not in self.inflight:
            self.inflight[write.logical_key] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((write, kv))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save has been written or dropped (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    async def _work(self) -> None:
        while True:
            write, kv = await self._queue.get()
            try:
                await self._write(write, kv)
            except Exception:  # a save never takes the worker down
                log.exception("save failed")
            finally:
                done = self.inflight.pop(write.logical_key, None)
                if done is not None and not done.done():
                    done.set_result(None)
                with self._idle:
                    self._pending -= 1
                    self.telemetry.queue_depth(self._pending)
                    self._idle.notify_all()

    async def _write(self, write: ChunkWrite, kv: KV) -> None:
        if callable(kv):
            kv = await asyncio.to_thread(kv)
        encoded: dict[str, bytes] = {}
        for tier in write.tiers:
            codec_id = write.route.codec_for(tier)
            if codec_id not in encoded:
                encoded[codec_id] = await asyncio.to_thread(
                    self.objects.encode, write, kv, codec_id
                )
        await asyncio.gather(
            *(self._put(t, write, encoded[write.route.codec_for(t)]) for t in write.tiers)
        )

    async def _put(self, tier: str, write: ChunkWrite, blob: bytes) -> None:
        key = write.key_for(tier)
        present = await self.calls.call(tier, "contains", lambda t: t.contains([key]))
        if isinstance(present, Failed):
            self.telemetry.dropped("tier_error")
            return
        if present.value[0]:
            self.telemetry.op(tier, "put", "present")
            return
        result = await self.calls.put(tier, [(key, blob)], write.route.ttl_s.get(tier))
        if isinstance(result, Failed):
            self.telemetry.dropped("tier_error")
            return
        self.telemetry.moved_bytes(tier, "write", len(blob))
        self.telemetry.evicted(tier, len(result.value.evicted))
        if result.value.evicted and self.demote is not None:
            await self.demote(write.route, tier, result.value.evicted)
