"""The DRAM pool's journal (worker) and index
(scheduler), without an engine: real tiers, real keys."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)")

from kvstrata.connectors.vllm_pool import Journal, PoolChanges, PoolIndex  # noqa: E402
from kvstrata.keys import ChunkKey  # noqa: E402
from kvstrata.tiers.base import Miss  # noqa: E402
from kvstrata.tiers.memory import MemoryTier  # noqa: E402


def key(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32)


def test_journal_reports_puts_evictions_and_deletes_as_net_changes() -> None:
    async def go():
        journal = Journal(MemoryTier("dram", capacity_bytes=250, eviction="lru"))
        await journal.put([(key(1), b"a" * 100), (key(2), b"b" * 100)])
        assert journal.drain() == {key(1).digest: True, key(2).digest: True}
        assert journal.drain() == {}
        result = await journal.put([(key(3), b"c" * 100)])  # evicts the oldest
        assert [e.key for e in result.evicted] == [key(1)]
        await journal.put([(key(4), b"d" * 1000)])  # larger than the pool: never stored
        await journal.delete([key(2)])
        assert journal.drain() == {
            key(1).digest: False,
            key(3).digest: True,
            key(4).digest: False,
            key(2).digest: False,
        }
        assert await journal.contains([key(3)]) == [True]
        assert journal.used_bytes == 100  # the pool's attributes pass through

    asyncio.run(go())


def test_index_follows_the_worker_and_holds_no_bytes() -> None:
    async def go():
        index = PoolIndex(MemoryTier("dram"))
        index.apply(PoolChanges({"dram": {key(1).digest: True, key(2).digest: True}}).pools["dram"])
        assert await index.contains([key(1), key(2), key(3)]) == [True, True, False]
        index.apply({key(1).digest: False})
        assert await index.contains([key(1), key(2)]) == [False, True]
        (fetch,) = await index.get([key(2)])
        assert isinstance(fetch, Miss)  # a stale or fresh entry alike: the scheduler never loads

    asyncio.run(go())


def test_a_pending_save_is_waited_for_then_given_up() -> None:
    async def go():
        index = PoolIndex(MemoryTier("dram"), pending_s=0.3)
        index.expect([key(1).digest, key(2).digest])
        asyncio.get_running_loop().call_later(
            0.05, index.apply, {key(1).digest: True, key(2).digest: False}
        )
        started = time.monotonic()
        assert await index.contains([key(1), key(2)]) == [True, False]
        assert (
            time.monotonic() - started < 0.25
        )  # answered when the worker reported, not at the deadline
        index.expect([key(3).digest])  # never confirmed (the save was dropped)
        started = time.monotonic()
        assert await index.contains([key(3)]) == [False]
        assert 0.25 < time.monotonic() - started < 2

    asyncio.run(go())


def test_worker_changes_aggregate_across_steps() -> None:
    a = PoolChanges({"dram": {key(1).digest: True}})
    b = PoolChanges(
        {"dram": {key(1).digest: False, key(2).digest: True}, "other": {key(3).digest: True}}
    )
    assert a.aggregate(b).pools == {
        "dram": {key(1).digest: False, key(2).digest: True},
        "other": {key(3).digest: True},
    }


def test_journal_of_a_shared_store_notes_puts_without_asking_it_again(tmp_path) -> None:
    from kvstrata.tiers.disk import DiskTier

    class Counting(DiskTier):
        asked = 0

        async def contains(self, keys):
            Counting.asked += 1
            return await super().contains(keys)

    async def go():
        journal = Journal(Counting("local", tmp_path))
        await journal.put([(key(1), b"x" * 10)])
        await journal.delete([key(1)])
        assert journal.drain() == {key(1).digest: False} and Counting.asked == 0
        await journal.put([(key(2), b"y" * 10)])
        assert journal.drain() == {key(2).digest: True}

    asyncio.run(go())


def test_events_name_the_engines_blocks_and_the_tier() -> None:
    from types import SimpleNamespace

    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as external

    from kvstrata.connectors.vllm_events import EventLog

    log = EventLog(block_size=4, enabled=True)
    request = SimpleNamespace(
        block_hashes=[bytes([i]) * 32 for i in range(4)], all_token_ids=list(range(16))
    )
    log.remember({b"chunk-1"}, request, first_block=2, n_blocks=2)
    log.changed({"dram": {b"chunk-1": True, b"unknown": True}, "local": {b"chunk-1": True}})
    log.changed({"dram": {b"chunk-1": False}})
    stored_dram, stored_local, removed = log.take()
    assert isinstance(stored_dram, BlockStored) and isinstance(removed, BlockRemoved)
    assert (stored_dram.medium, stored_local.medium, removed.medium) == ("dram", "local", "dram")
    assert (
        stored_dram.block_hashes
        == removed.block_hashes
        == [external(bytes([i]) * 32) for i in (2, 3)]
    )
    assert stored_dram.parent_block_hash == external(
        bytes([1]) * 32
    )  # vLLM's own hashes, as it publishes them
    assert stored_dram.token_ids == list(range(8, 16))
    assert stored_dram.block_size == 4 and log.take() == []
    off = EventLog(block_size=4, enabled=False)
    off.remember({b"chunk-1"}, request, 0, 2)
    off.changed({"dram": {b"chunk-1": True}})
    assert off.take() == []
