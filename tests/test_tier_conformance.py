"""One conformance suite, run against every tier with the real backends.

memory and disk are in-process; redis, redis-cluster (3 masters + 3 replicas)
and s3 (every transport) talk to the real Redis, Redis Cluster and SeaweedFS
servers started by conftest.
"""

from __future__ import annotations

import asyncio

import pytest

from kvstrata import format as fmt
from kvstrata.tiers.base import Hit, Miss, Tier
from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.redis import RedisTier
from kvstrata.tiers.s3.tier import S3Tier
from tests.conftest import TIER_KINDS, make_keys, make_object

N_LAYERS = 5
ALL_RANGES = [range(a, b) for a in range(N_LAYERS) for b in range(a + 1, N_LAYERS + 1)]


async def test_round_trip_every_layer_range_is_bit_exact(tier: Tier) -> None:
    keys = make_keys(3)
    objects = [make_object(k, N_LAYERS, seed=i) for i, k in enumerate(keys)]
    result = await tier.put([(k, blob) for k, (blob, _) in zip(keys, objects, strict=True)])
    assert result.stored == 3

    whole = await tier.get(keys)
    for fetched, (_, sections) in zip(whole, objects, strict=True):
        assert isinstance(fetched, Hit)
        assert [bytes(fetched.obj.layers[i]) for i in range(N_LAYERS)] == sections

    for layers in ALL_RANGES:
        fetched = await tier.get(keys, layers=layers)
        for got, (_, sections) in zip(fetched, objects, strict=True):
            assert isinstance(got, Hit), (layers, got)
            assert sorted(got.obj.layers) == list(layers)
            assert all(bytes(got.obj.layers[i]) == sections[i] for i in layers)


async def test_contains_and_delete(tier: Tier) -> None:
    keys = make_keys(4)
    await tier.put([(k, make_object(k)[0]) for k in keys[:3]])
    assert await tier.contains(keys) == [True, True, True, False]
    await tier.delete([keys[0], keys[3]])  # deleting an absent key is fine
    assert await tier.contains(keys) == [False, True, True, False]
    fetched = await tier.get(keys, layers=range(1, 2))
    assert [type(f) for f in fetched] == [Miss, Hit, Hit, Miss]
    assert fetched[0].reason == "absent"
    assert await tier.get([]) == [] and await tier.contains([]) == []


async def test_put_replaces_object_and_its_cached_header(tier: Tier) -> None:
    (key,) = make_keys(1)
    first, _ = make_object(key, N_LAYERS, section_bytes=100, seed=1)
    second, sections = make_object(key, N_LAYERS, section_bytes=300, seed=2)
    await tier.put([(key, first)])
    assert isinstance((await tier.get([key], layers=range(0, 1)))[0], Hit)  # header now cached
    await tier.put([(key, second)])
    (got,) = await tier.get([key], layers=range(2, 4))
    assert isinstance(got, Hit)
    assert [bytes(got.obj.layers[i]) for i in (2, 3)] == sections[2:4]


async def test_concurrent_puts_and_gets_from_many_tasks(tier: Tier) -> None:
    keys = make_keys(96)
    objects = {k: make_object(k, N_LAYERS, section_bytes=4096, seed=i) for i, k in enumerate(keys)}

    async def writer(k):
        await tier.put([(k, objects[k][0])])

    await asyncio.gather(*(writer(k) for k in keys))

    async def reader(i):
        k = keys[i]
        layers = ALL_RANGES[i % len(ALL_RANGES)]
        (got,) = await tier.get([k], layers=layers)
        assert isinstance(got, Hit), got
        return all(bytes(got.obj.layers[j]) == objects[k][1][j] for j in layers)

    assert all(await asyncio.gather(*(reader(i) for i in range(len(keys)))))


async def test_corrupt_foreign_and_future_objects_are_misses(tier: Tier) -> None:
    a, b, c, d, e = make_keys(5)
    good_a, _ = make_object(a, N_LAYERS)
    good_b, _ = make_object(b, N_LAYERS)
    body_flip = bytearray(good_a)
    body_flip[-10] ^= 0x01  # last layer's section
    header_flip = bytearray(good_b)
    header_flip[40] ^= 0x80
    future = bytearray(make_object(e, N_LAYERS)[0])
    future[8] = fmt.VERSION + 1  # a version this reader does not know
    await tier.put(
        [
            (a, bytes(body_flip)),
            (b, bytes(header_flip)),
            (c, good_a),  # a valid object, but for another key
            (d, good_b[: len(good_b) // 2]),  # truncated
            (e, bytes(future)),
        ]
    )
    whole = await tier.get([a, b, c, d, e])
    assert [(type(f), getattr(f, "reason", None)) for f in whole] == [
        (Miss, "unauthenticated"),  # a section's tag does not verify
        (Miss, "unauthenticated"),  # the header's MAC does not verify
        (Miss, "foreign"),
        (Miss, "corrupt"),
        (Miss, "unsupported"),
    ]
    # a range that avoids the damaged section is still served, verified
    assert isinstance((await tier.get([a], layers=range(0, 2)))[0], Hit)
    (last,) = await tier.get([a], layers=range(N_LAYERS - 1, N_LAYERS))
    assert isinstance(last, Miss) and last.reason == "unauthenticated"


async def test_garbage_is_a_miss_not_a_crash(tier: Tier) -> None:
    keys = make_keys(3)
    await tier.put(
        [(keys[0], b"x"), (keys[1], b"KVSTRATA\x02\x00" + b"\xff" * 50), (keys[2], bytes(9000))]
    )
    for layers in (None, range(0, 1)):
        fetched = await tier.get(keys, layers=layers)
        assert all(isinstance(f, Miss) and f.reason == "corrupt" for f in fetched), fetched


async def test_large_objects_and_long_headers(tier: Tier) -> None:
    # 400 layers: a header longer than the first probe read, and 4 MiB of body
    (key,) = make_keys(1)
    blob, sections = make_object(key, n_layers=400, section_bytes=10_000, ragged=True)
    assert fmt.header_length(blob) > fmt.HEADER_PROBE_BYTES
    await tier.put([(key, blob)])
    (got,) = await tier.get([key], layers=range(390, 400))
    assert isinstance(got, Hit)
    assert all(bytes(got.obj.layers[i]) == sections[i] for i in range(390, 400))
    (whole,) = await tier.get([key])
    assert isinstance(whole, Hit) and bytes(whole.obj.layers[0]) == sections[0]


@pytest.mark.parametrize("kind", ["memory", "disk"])
async def test_capacity_and_lru_eviction_order(make_tier, kind: str) -> None:
    keys = make_keys(6)
    objects = [(k, make_object(k, 2, section_bytes=1000, ragged=False)[0]) for k in keys]
    size = len(objects[0][1])
    tier = make_tier(
        kind, capacity_bytes=4 * size, **({"eviction": "lru"} if kind == "memory" else {})
    )
    await tier.put(objects[:4])
    await tier.get([keys[0]])  # 0 becomes most recently used
    result = await tier.put(objects[4:6])
    assert [e.key for e in result.evicted] == [keys[1], keys[2]]
    if kind == "memory":  # DRAM hands back the data so it can be demoted
        assert [e.data for e in result.evicted] == [objects[1][1], objects[2][1]]
    assert await tier.contains(keys) == [True, False, False, True, True, True]
    assert tier.used_bytes == 4 * size


async def test_s3fifo_resists_a_scan_that_flushes_lru(make_tier) -> None:
    hot = make_keys(4, seed=1)
    scan = make_keys(40, seed=2)
    survivors = {}
    for policy in ("lru", "s3fifo"):
        objects = {k: make_object(k, 2, section_bytes=1000, ragged=False)[0] for k in hot + scan}
        size = len(next(iter(objects.values())))
        tier = make_tier("memory", capacity_bytes=10 * size, eviction=policy)
        for _ in range(3):  # the hot set is read repeatedly
            for k in hot:
                if not (await tier.contains([k]))[0]:
                    await tier.put([(k, objects[k])])
                await tier.get([k])
        for k in scan:  # a one-off sweep of cold chunks, twice the pool
            await tier.put([(k, objects[k])])
        survivors[policy] = sum(await tier.contains(hot))
    assert survivors["lru"] == 0
    assert survivors["s3fifo"] == len(hot)


async def test_disk_tier_reindexes_after_restart(make_tier, tmp_path) -> None:
    keys = make_keys(3)
    first = make_tier("disk", path=tmp_path / "kv")
    objects = [(k, make_object(k)[0]) for k in keys]
    await first.put(objects)
    await first.close()
    second = make_tier("disk", path=tmp_path / "kv")
    assert await second.contains(keys) == [True] * 3
    assert second.used_bytes == sum(len(b) for _, b in objects)
    assert all(isinstance(f, Hit) for f in await second.get(keys, layers=range(1, 3)))


async def test_disk_tier_sees_objects_written_by_another_process(make_tier, tmp_path) -> None:
    reader = make_tier("disk", path=tmp_path / "shared")
    writer = make_tier("disk", path=tmp_path / "shared")
    (key,) = make_keys(1)
    await writer.put([(key, make_object(key)[0])])
    assert await reader.contains([key]) == [True]
    assert isinstance((await reader.get([key]))[0], Hit)


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_redis_ttl_expires_objects(make_tier, kind: str) -> None:
    tier = make_tier(kind, ttl_s=1)
    (key,) = make_keys(1)
    await tier.put([(key, make_object(key)[0])])
    assert await tier.contains([key]) == [True]
    await asyncio.sleep(1.6)
    assert await tier.contains([key]) == [False]
    assert isinstance((await tier.get([key]))[0], Miss)


async def test_put_keeps_no_reference_to_a_mutable_buffer(tier: Tier) -> None:
    (key,) = make_keys(1)
    blob, sections = make_object(key, N_LAYERS)
    buf = bytearray(blob)
    await tier.put([(key, buf)])  # type: ignore[list-item]
    buf[-10] ^= 0x01  # the caller reuses its buffer
    (got,) = await tier.get([key])
    assert isinstance(got, Hit)
    assert [bytes(got.obj.layers[i]) for i in range(N_LAYERS)] == sections


async def _overwrite_behind_the_tiers_back(tier: Tier, key, data: bytes) -> None:
    """Change a stored object without telling the tier (bit rot, another writer)."""
    if isinstance(tier, DiskTier):
        tier._path(key).write_bytes(data)
    elif isinstance(tier, RedisTier):
        await tier._client.set(tier._name(key), data)
    elif isinstance(tier, S3Tier):
        await tier._transport.write(tier._path(key), data)
    elif tier.kind == "lmcache":  # replace LMCache's memory object, keep the tier's header cache
        with tier._lock:  # type: ignore[attr-defined]
            tier._remove(key)  # type: ignore[attr-defined]
            tier._store(key, data, [])  # type: ignore[attr-defined]
    else:
        raise AssertionError(f"no back door into {tier.kind}")


@pytest.mark.parametrize(
    "kind", [k for k in TIER_KINDS if k != "memory"]
)  # DRAM bytes are immutable
async def test_a_cached_header_never_vouches_for_changed_bytes(make_tier, kind: str) -> None:
    """Whole gets fill the header cache and then skip parsing a header they have seen;
    objects changed behind the tier's back must still miss with the right reason."""
    tier = make_tier(kind)
    key, other = make_keys(2)
    good, sections = make_object(key, N_LAYERS)
    await tier.put([(key, good)])
    assert isinstance((await tier.get([key]))[0], Hit)
    assert key in tier._headers  # type: ignore[attr-defined]  # a whole get filled the cache
    body_flip = bytearray(good)
    body_flip[-10] ^= 0x01
    future = bytearray(good)
    future[8] = fmt.VERSION + 1
    cases = [
        (bytes(body_flip), "unauthenticated"),  # a section tag fails
        (good[:-1], "corrupt"),  # truncated by one byte: the header is still intact
        (good + b"\0", "corrupt"),  # one byte too long
        (make_object(other, N_LAYERS)[0], "foreign"),
        (bytes(future), "unsupported"),
    ]
    for data, reason in cases:
        await _overwrite_behind_the_tiers_back(tier, key, data)
        (got,) = await tier.get([key])
        assert isinstance(got, Miss) and got.reason == reason, (reason, got)
    await _overwrite_behind_the_tiers_back(tier, key, good)
    (got,) = await tier.get([key])
    assert isinstance(got, Hit)
    assert [bytes(got.obj.layers[i]) for i in range(N_LAYERS)] == sections


async def test_whole_gets_of_one_and_of_many_keys_with_absent_ones(tier: Tier) -> None:
    # One key and many keys can take different paths (Redis: GET vs MGET).
    keys = make_keys(3)
    objects = {k: make_object(k, N_LAYERS, seed=i) for i, k in enumerate(keys)}
    await tier.put([(k, objects[k][0]) for k in (keys[0], keys[2])])
    fetched = await tier.get(keys)
    assert [type(f) for f in fetched] == [Hit, Miss, Hit] and fetched[1].reason == "absent"
    assert [bytes(fetched[2].obj.layers[i]) for i in range(N_LAYERS)] == objects[keys[2]][1]
    (alone,) = await tier.get([keys[1]])
    assert isinstance(alone, Miss) and alone.reason == "absent"
