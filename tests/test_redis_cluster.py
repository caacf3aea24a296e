"""The redis tier on a real Redis Cluster: batches go one pipeline per node, a dead master
is a miss for its slots only, and its replica's promotion brings the objects back.

The conformance suite runs on the session's cluster too (``redis-cluster`` in TIER_KINDS);
here a test that kills a node gets a cluster of its own.
"""

from __future__ import annotations

import redis

from kvstrata.testing import services as svc
from kvstrata.tiers.base import Hit, Miss
from tests.conftest import make_keys, make_object


def _node_clients(cluster: svc.RedisCluster) -> dict[int, redis.Redis]:
    return {p: redis.Redis(host="127.0.0.1", port=p) for p in cluster.master_ports()}


def _owner(clients: dict[int, redis.Redis], name: str) -> int:
    """The port of the master serving ``name``'s slot, as the cluster itself says."""
    client = next(iter(clients.values()))
    slot = int(client.cluster("keyslot", name))
    return next(
        int(master[1]) for lo, hi, master, *_ in client.cluster("slots") if lo <= slot <= hi
    )


def _stats(clients: dict[int, redis.Redis]) -> dict[int, tuple[int, int]]:
    """Per master: (GET calls, read events) since the last CONFIG RESETSTAT."""
    out = {}
    for port, c in clients.items():
        gets = c.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
        out[port] = (gets, c.info("stats")["total_reads_processed"])
    return out


async def test_a_batched_get_is_one_pipeline_per_node(make_tier, redis_cluster) -> None:
    tier = make_tier("redis-cluster")
    keys = make_keys(60)
    await tier.put([(k, make_object(k, 4, seed=i)[0]) for i, k in enumerate(keys)])
    clients = _node_clients(redis_cluster)
    owners = {k: _owner(clients, tier._name(k)) for k in keys}
    assert len(set(owners.values())) == 3  # 60 keys spread over every master
    for c in clients.values():
        c.config_resetstat()
    fetched = await tier.get(keys)
    assert all(isinstance(f, Hit) for f in fetched)
    stats = _stats(clients)
    for port, (gets, reads) in stats.items():
        # every key of the node is one GET, sent in one pipelined write: a handful of read
        # events (the pipeline, plus this test's own INFO calls), never one per key
        assert gets == sum(1 for o in owners.values() if o == port)
        assert reads <= 4, (port, stats)
    print("per master (GET calls, read events):", stats)


async def test_a_killed_master_is_a_miss_for_its_slots_until_failover(make_tier, tmp_path) -> None:
    cluster = svc.start_redis_cluster(tmp_path / "cluster", node_timeout_ms=1000)
    try:
        tier = make_tier("redis-cluster", url=cluster.url)
        keys = make_keys(48)
        objects = {k: make_object(k, 4, seed=i) for i, k in enumerate(keys)}
        await tier.put([(k, objects[k][0]) for k in keys])
        clients = _node_clients(cluster)
        for c in clients.values():
            c.wait(1, 2000)  # each master's replica holds the objects before the kill
        owners = {k: _owner(clients, tier._name(k)) for k in keys}
        victim = cluster.kill_master()
        lost = {k for k in keys if owners[k] == victim.port}
        assert 0 < len(lost) < len(keys)

        fetched = await tier.get(keys)  # no TierError: the other nodes answer
        assert {f.key for f in fetched if isinstance(f, Miss)} == lost
        assert all(f.reason == "absent" for f in fetched if isinstance(f, Miss))
        layer = await tier.get(keys, layers=range(1, 3))
        assert {f.key for f in layer if isinstance(f, Miss)} == lost
        assert await tier.contains(keys) == [k not in lost for k in keys]
        (alone,) = await tier.get(
            [sorted(lost)[0]]
        )  # a batch of one dead key: a miss, not an error
        assert isinstance(alone, Miss)
        fresh = make_keys(30)
        stored = (await tier.put([(k, make_object(k, 4)[0]) for k in fresh])).stored
        assert 0 < stored < len(fresh)

        cluster.wait_failover()  # the replica is promoted and serves the slots again
        assert victim.port not in cluster.master_ports()
        for _ in range(20):  # redis-py learns the new topology from a MOVED or a refresh
            again = await tier.get(keys)
            if all(isinstance(f, Hit) for f in again):
                break
        assert all(isinstance(f, Hit) for f in again)
        assert all(bytes(f.obj.layers[0]) == objects[f.key][1][0] for f in again)
    finally:
        cluster.stop()


async def test_a_whole_cluster_down_is_a_tier_error(make_tier, tmp_path) -> None:
    """Every primary gone: the tier raises (the orchestrator's breaker then skips it)."""
    from kvstrata.tiers.base import TierError

    cluster = svc.start_redis_cluster(tmp_path / "cluster", replicas=0)
    try:
        tier = make_tier("redis-cluster", url=cluster.url, timeout_s=2)
        keys = make_keys(30)
        await tier.put([(k, make_object(k, 2)[0]) for k in keys])
        for port in cluster.master_ports():
            cluster.node(port).kill()
        for call in (
            tier.get(keys),
            tier.contains(keys),
            tier.put([(keys[0], make_object(keys[0], 2)[0])]),
        ):
            try:
                await call
            except TierError:
                continue
            raise AssertionError(f"no TierError with every node down: {call}")
    finally:
        cluster.stop()
