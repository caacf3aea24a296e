"""The lmcache tier beyond the shared conformance suite: LMCache really is the store,
eviction by LMCache's policy hands data back, settings, and the start-up error."""

from __future__ import annotations

import sys

import pytest

from kvstrata.config import load_config
from kvstrata.tiers.base import Hit, TierError, create_tier, tier_class
from tests.conftest import make_keys, make_object

SECTION = 128 << 10  # 2 sections: objects of 256 KiB + header, 260 KiB once LMCache aligns them


def _objects(n: int, seed: int = 0):
    keys = make_keys(n, seed=seed)
    return keys, [
        (k, make_object(k, 2, section_bytes=SECTION, ragged=False, seed=i)[0])
        for i, k in enumerate(keys)
    ]


async def test_objects_live_in_lmcache_under_our_chunk_keys(make_tier) -> None:
    from lmcache.utils import CacheEngineKey

    tier = make_tier("lmcache")
    keys, objects = _objects(2)
    await tier.put(objects)
    backend = tier._backend  # LMCache's LocalCPUBackend
    for key, blob in objects:
        lmc_key = CacheEngineKey(
            "kvstrata", 1, 0, int.from_bytes(key.digest, "big"), tier._lib.torch.uint8
        )
        assert backend.contains(lmc_key)
        obj = backend.get_blocking(lmc_key)
        try:
            assert bytes(obj.byte_array) == blob  # kvstrata's object format, byte for byte
        finally:
            obj.ref_count_down()
    assert tier.used_bytes == sum(len(b) for _, b in objects)
    await tier.delete([keys[0]])
    assert len(backend.get_keys()) == 1 and tier.used_bytes == len(objects[1][1])


@pytest.mark.parametrize("policy", ["lru", "fifo"])
async def test_eviction_follows_lmcaches_policy_and_hands_data_back(make_tier, policy: str) -> None:
    keys, objects = _objects(6)
    tier = make_tier("lmcache", capacity_bytes=4 * 266240, eviction=policy)  # 4 aligned objects
    assert (await tier.put(objects[:4])).evicted == ()
    await tier.get([keys[0]])  # 0 becomes most recently used (LRU only)
    result = await tier.put(objects[4:6])
    assert result.stored == 2
    gone = [keys[1], keys[2]] if policy == "lru" else [keys[0], keys[1]]
    assert [e.key for e in result.evicted] == gone
    assert [e.data for e in result.evicted] == [dict(objects)[k] for k in gone]  # for demotion
    assert await tier.contains(keys) == [k not in gone for k in keys]
    assert tier.used_bytes == 4 * len(objects[0][1])
    survivors = [k for k in keys if k not in gone]
    assert all(isinstance(f, Hit) for f in await tier.get(survivors, layers=range(1, 2)))


async def test_an_object_larger_than_the_pool_is_not_admitted(make_tier) -> None:
    tier = make_tier("lmcache", capacity_bytes=1 << 20)
    (key,) = make_keys(1)
    blob, _ = make_object(key, 4, section_bytes=300_000, ragged=False)
    result = await tier.put([(key, blob)])
    assert result.stored == 0 and await tier.contains([key]) == [False]


def test_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("KVSTRATA_LMCACHE_CAPACITY_BYTES", str(8 << 20))
    monkeypatch.setenv("KVSTRATA_LMCACHE_EVICTION", "lfu")
    settings = tier_class("lmcache").settings_class()
    assert settings.capacity_bytes == 8 << 20 and settings.eviction == "lfu"


def test_a_config_file_names_the_lmcache_tier(tmp_path) -> None:
    path = tmp_path / "strata.yaml"
    path.write_text(
        "version: 1\ntiers:\n  dram: {kind: lmcache, capacity_bytes: 64MiB, eviction: lru}\n"
        "policy:\n  default: {read: [dram], write: [dram]}\n"
    )
    config = load_config(path)
    assert config.tiers["dram"].kind == "lmcache"
    assert config.tiers["dram"].settings.capacity_bytes == 64 << 20


def test_without_lmcache_one_clear_start_up_error(monkeypatch) -> None:
    # As on a machine without the extra: every lmcache module fails to import.
    for name in [m for m in sys.modules if m == "lmcache" or m.startswith("lmcache.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lmcache", None)
    with pytest.raises(TierError) as info:
        create_tier("lmcache", capacity_bytes=1 << 20)
    assert info.value.op == "start" and "kvstrata[lmcache]" in str(info.value)
    assert create_tier("memory").kind == "memory"  # the rest of kvstrata runs


def test_a_vllm_engine_can_still_start_after_lmcache_was_loaded(make_tier) -> None:
    """vLLM's worker start scans every module and calls ``vars(x).get``; LMCache pulls in
    llvmlite, whose library object makes that scan raise unless the tier seeds it a real
    ``__dict__``."""
    dispatcher = pytest.importorskip("vllm.triton_utils.dispatcher")
    make_tier("lmcache")
    assert "llvmlite.binding.ffi" in sys.modules  # the trigger is really there
    dispatcher._rebind_kernels([])  # the scan vLLM 0.32 runs in init_worker
