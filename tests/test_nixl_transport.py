"""The S3 tier's NIXL transport beyond the shared conformance suite (which runs it as
``s3-nixl``): interoperation with obstore on the same bucket, ranges at the object's
edges, registrations made once, real faults, and the start-up error."""

from __future__ import annotations

import sys

import pytest

from kvstrata.testing import services as svc
from kvstrata.tiers.base import Hit, TierError, create_tier
from tests.conftest import make_keys, make_object, s3_settings, unique
from tests.test_tier_faults import _check_fails_fast


def _pair(s3_server, **extra):
    """A NIXL tier and an obstore tier over the same bucket and prefix."""
    prefix = f"nixl-{unique()}/"
    nixl = create_tier("s3", name="nixl", **s3_settings(s3_server, "nixl", prefix=prefix, **extra))
    obstore = create_tier("s3", name="obstore", **s3_settings(s3_server, "obstore", prefix=prefix))
    return nixl, obstore


async def test_objects_are_interchangeable_with_obstore(s3_server) -> None:
    nixl, obstore = _pair(s3_server)
    try:
        a, b = make_keys(2)
        blob_a, sections_a = make_object(a, 6, section_bytes=50_000)
        blob_b, sections_b = make_object(b, 6, section_bytes=50_000)
        await obstore.put([(a, blob_a)])  # NIXL has never seen a: its size comes from a HEAD
        await nixl.put([(b, blob_b)])
        assert await nixl.contains([a, b]) == [True, True]
        for reader, (key, sections) in ((nixl, (a, sections_a)), (obstore, (b, sections_b))):
            (got,) = await reader.get([key], layers=range(2, 5))
            assert (
                isinstance(got, Hit)
                and [bytes(got.obj.layers[i]) for i in range(2, 5)] == sections[2:5]
            )
        await nixl.delete([a, b])  # NIXL's OBJ plugin has no DELETE: obstore does it
        assert await obstore.contains([a, b]) == [False, False]
        assert await nixl.contains([a, b]) == [False, False]
    finally:
        await nixl.close()
        await obstore.close()


async def test_ranges_at_and_past_the_end_of_an_object(make_tier) -> None:
    tier = make_tier("s3-nixl")
    transport = tier._transport
    path = tier._path(make_keys(1)[0])
    data = bytes(range(256)) * 10
    await transport.write(path, data)
    assert await transport.read(path, 0, None) == data
    assert await transport.read(path, 2000, 9000) == data[2000:]  # cut at the end, as S3 does
    assert await transport.read(path, 100, 356) == data[100:356]
    assert await transport.read(path, len(data), None) == b""
    assert await transport.read(tier._path(make_keys(1)[0]), 0, 10) is None  # absent


async def test_buffers_and_registrations_are_made_once_and_reused(make_tier) -> None:
    tier = make_tier("s3-nixl")
    transport = tier._transport
    keys = make_keys(20)
    objects = [
        (k, make_object(k, 4, section_bytes=20_000, ragged=False, seed=i)[0])
        for i, k in enumerate(keys)
    ]
    await tier.put(objects[:2])
    await tier.get(keys[:2])
    before = len(transport._registered)
    for _ in range(3):
        await tier.put(objects)
        assert all(isinstance(f, Hit) for f in await tier.get(keys))
    assert len(transport._dev_ids) == len(keys)  # one OBJ registration per key, kept
    # staging buffers: bounded by the requests in flight, not by the requests made
    assert len(transport._registered) <= before + tier.settings.max_concurrency
    assert sum(len(v) for v in transport._free.values()) == len(transport._registered)


async def test_killed_server_fails_fast_with_tier_error(tmp_path) -> None:
    server = svc.start_seaweedfs(tmp_path / "s3")
    try:
        tier = create_tier("s3", **s3_settings(server, "nixl", timeout_s=2.0, max_retries=1))
        keys = make_keys(4)
        await tier.put([(k, make_object(k)[0]) for k in keys])
        assert all(isinstance(f, Hit) for f in await tier.get(keys, layers=range(0, 2)))
        server.kill()
        await _check_fails_fast(tier, keys, limit_s=15)
        await tier.close()
    finally:
        server.stop()


def test_without_nixl_one_clear_start_up_error(monkeypatch, s3_server) -> None:
    monkeypatch.setitem(sys.modules, "nixl_cu12", None)  # as on a machine without the extra
    monkeypatch.delitem(sys.modules, "nixl_cu12._api", raising=False)
    with pytest.raises(TierError) as info:
        create_tier("s3", name="cold", **s3_settings(s3_server, "nixl"))
    assert info.value.tier == "cold" and info.value.op == "start"
    assert "kvstrata[nixl]" in str(info.value)
    assert create_tier("s3", **s3_settings(s3_server, "obstore")).kind == "s3"  # the rest runs
