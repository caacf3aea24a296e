"""A route's ``ttl_s`` takes effect: what the route writes to Redis expires after that many
seconds, whatever the tier's own ``ttl_s``; what other routes write keeps the tier's TTL.

Real Redis (the session's server from tests/conftest.py), the real orchestrator.
"""

from __future__ import annotations

import asyncio
import textwrap
import time

import numpy as np
import pytest
import redis

from kvstrata.config import parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from tests.conftest import make_keys, make_object

CHUNK = 32
MODEL = ModelSpec("tiny-ttl-model", n_layers=2, kv_heads=2, head_dim=16, dtype="float32")


def _config(url: str, prefix: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          shared: {{kind: redis, url: "{url}", key_prefix: "{prefix}", ttl_s: 86400}}
        engine: {{prefill_tokens_per_s: 1.0}}
        orchestrator: {{default_budget_ms: 60000}}
        policy:
          default: {{read: [shared], write: [shared]}}
          rules:
            - name: ephemeral
              match: {{tags: [ephemeral]}}
              route: {{read: [shared], write: [shared], ttl_s: {{shared: 1}}}}
        """)


def _save(orch: Orchestrator, seed: int, ctx: RequestContext) -> list[str]:
    """Save two chunks of a fresh prompt under ``ctx``'s route; the Redis names written."""
    tokens = np.random.default_rng(seed).integers(0, 30000, size=2 * CHUNK)
    plan = orch.lookup(tokens, ctx)
    kv = np.ones((MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim), dtype=np.float32)
    for i in range(2):
        assert orch.save(plan, i, kv * (seed + i))
    assert orch.flush(30)
    return [str(key) for key in plan.keys["none"][:2]]


def test_a_route_ttl_expires_what_the_route_writes(redis_server) -> None:
    prefix = f"ttl-{time.time_ns()}:"
    orch = Orchestrator(parse_config(_config(redis_server.url, prefix)), MODEL)
    client = redis.Redis.from_url(redis_server.url)
    try:
        short = [prefix + n for n in _save(orch, 1, RequestContext(tags=frozenset({"ephemeral"})))]
        kept = [prefix + n for n in _save(orch, 2, RequestContext())]
        assert client.exists(*short) == 2 and client.exists(*kept) == 2
        assert all(0 < client.pttl(n) <= 1000 for n in short)  # the route's 1 s
        assert all(client.pttl(n) > 86_000_000 for n in kept)  # the tier's 24 h
        time.sleep(2.0)
        assert client.exists(*short) == 0
        assert client.exists(*kept) == 2
    finally:
        orch.close()
        client.close()


@pytest.mark.parametrize("tier_ttl", [None, 3600])
async def test_redis_put_ttl_beats_the_tier_ttl(make_tier, redis_server, tier_ttl) -> None:
    tier = make_tier("redis", ttl_s=tier_ttl)
    timed, untimed = make_keys(2)
    await tier.put([(timed, make_object(timed)[0])], ttl_s=1)
    await tier.put([(untimed, make_object(untimed)[0])])
    client = redis.Redis.from_url(redis_server.url)
    try:
        name = tier.settings.key_prefix
        assert 0 < client.pttl(name + str(timed)) <= 1000
        assert client.pttl(name + str(untimed)) == (
            -1 if tier_ttl is None else pytest.approx(tier_ttl * 1000, abs=5000)
        )
    finally:
        client.close()
    await asyncio.sleep(1.6)
    assert await tier.contains([timed, untimed]) == [False, True]
