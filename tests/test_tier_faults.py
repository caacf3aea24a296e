"""Remote tiers under real faults: a server killed mid-test, wrong credentials.

Each test starts its own server (not the session's), kills it with SIGKILL,
and checks that every operation fails fast with TierError -- no hang, no
other exception type -- and that the tier works again once the server is back.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from kvstrata.testing import services as svc
from kvstrata.tiers.base import Hit, TierError, create_tier
from tests.conftest import make_keys, make_object, s3_settings

OPS = ["contains", "get", "get-layers", "put", "delete"]


async def _run(tier, op: str, keys) -> None:
    if op == "contains":
        await tier.contains(keys)
    elif op == "get":
        await tier.get(keys)
    elif op == "get-layers":
        await tier.get(keys, layers=range(1, 3))
    elif op == "put":
        await tier.put([(k, make_object(k)[0]) for k in keys])
    else:
        await tier.delete(keys)


async def _check_fails_fast(tier, keys, limit_s: float) -> None:
    for op in OPS:
        started = time.monotonic()
        with pytest.raises(TierError) as info:
            await asyncio.wait_for(_run(tier, op, keys), timeout=limit_s * 3)
        assert info.value.tier == tier.name
        assert time.monotonic() - started < limit_s, f"{op} took too long to fail"


async def test_redis_killed_mid_test_raises_tier_error_then_recovers(tmp_path) -> None:
    server = svc.start_redis(tmp_path / "redis")
    try:
        tier = create_tier("redis", url=server.url, timeout_s=1.0)
        keys = make_keys(4)
        await tier.put([(k, make_object(k)[0]) for k in keys])
        assert all(isinstance(f, Hit) for f in await tier.get(keys, layers=range(0, 2)))
        server.kill()
        await _check_fails_fast(tier, keys, limit_s=5)
        server.restart()  # same port, empty (no persistence): the tier reconnects by itself
        assert await tier.contains(keys) == [False] * 4
        await tier.put([(k, make_object(k)[0]) for k in keys])
        assert all(isinstance(f, Hit) for f in await tier.get(keys))
        await tier.close()
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["obstore", "aioboto3"])
async def test_s3_killed_mid_test_raises_tier_error(tmp_path, transport: str) -> None:
    server = svc.start_seaweedfs(tmp_path / "s3")
    try:
        tier = create_tier("s3", **s3_settings(server, transport, timeout_s=2.0, max_retries=1))
        keys = make_keys(4)
        await tier.put([(k, make_object(k)[0]) for k in keys])
        assert all(isinstance(f, Hit) for f in await tier.get(keys, layers=range(0, 2)))
        server.kill()
        await _check_fails_fast(tier, keys, limit_s=10)
        await tier.close()
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["obstore", "aioboto3", "nixl"])
async def test_s3_wrong_secret_is_a_tier_error_without_the_secret(
    s3_server, transport: str
) -> None:
    settings = s3_settings(s3_server, transport, timeout_s=5.0)
    settings["secret_access_key"] = "not-the-secret-1234"
    tier = create_tier("s3", **settings)
    (key,) = make_keys(1)
    with pytest.raises(TierError) as info:
        await tier.put([(key, make_object(key)[0])])
    assert "not-the-secret-1234" not in str(info.value)
    with pytest.raises(TierError):
        await tier.get([key])
    await tier.close()


async def test_unreachable_redis_fails_fast() -> None:
    port = svc.free_ports(1)[0]  # nothing listens there
    tier = create_tier("redis", url=f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
    await _check_fails_fast(tier, make_keys(2), limit_s=5)
    await tier.close()
