"""The orchestrator against the real Redis and S3 servers: routes, admission, faults, breaker,
queue."""

from __future__ import annotations

import gc
import textwrap
import time

import numpy as np
import pytest

from kvstrata import runtime as rt
from kvstrata.config import parse_config
from kvstrata.keys import ChunkKey
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Failed, Ok, Orchestrator
from kvstrata.orchestrator.objects import Expected
from kvstrata.orchestrator.whole import StoreFailed
from kvstrata.policy.route import RequestContext
from kvstrata.testing import services as svc
from kvstrata.testing.throttle import ThrottledProxy
from kvstrata.tiers.base import ReadRequest

CHUNK = 32
MODEL = ModelSpec("tiny-test-model", n_layers=4, kv_heads=2, head_dim=16, dtype="float32")


# Timeouts are generous: these tests are about what a tier returns, not when (the fault tests
# are about timeouts). A process can stall for many seconds for reasons outside the test (a
# NIXL agent left by another test, freed by the garbage collector, can hold the GIL for ~19 s);
# _settle (below) pays such one-off costs before anything is timed.


def config_text(redis_url: str, s3, tmp_path, policy: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          dram: {{kind: memory, capacity_bytes: 64MiB, timeout_ms: 15000}}
          local: {{kind: disk, path: {tmp_path / "disk"}, timeout_ms: 15000}}
          shared:
            kind: redis
            url: "{redis_url}"
            key_prefix: "orch-{time.time_ns()}:"
            timeout_ms: 15000
            timeout_s: 15
          cold:
            kind: s3
            endpoint: {s3.endpoint}
            bucket: {s3.bucket}
            prefix: orch-{time.time_ns()}/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
            timeout_s: 15
            max_retries: 0
            timeout_ms: 15000
        engine: {{prefill_tokens_per_s: 1.0}}
        orchestrator:
          save_queue_chunks: 64
          breaker: {{failures: 2, cooldown_s: 1.0}}
          default_budget_ms: 60000
        {extra}
        policy:
        """) + textwrap.indent(textwrap.dedent(policy), "  ")


def prompt(n_chunks: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30000, size=n_chunks * CHUNK + 5)


def kv_for(index: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed * 1000 + index)
    return rng.standard_normal(
        (MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim), dtype=np.float32
    )


@pytest.fixture
def make_orch(redis_server, s3_server, tmp_path):
    made = []

    def build(policy: str, redis_url: str | None = None, extra: str = "", **kw) -> Orchestrator:
        cfg = parse_config(
            config_text(redis_url or redis_server.url, s3_server, tmp_path, policy, extra)
        )
        orch = Orchestrator(cfg, MODEL, **kw)
        made.append(orch)
        return orch

    yield build
    for orch in made:
        orch.close()


def save_all(
    orch: Orchestrator,
    tokens,
    seed: int = 0,
    ctx: RequestContext | None = None,
    one_by_one: bool = False,
):
    plan = orch.lookup(tokens, ctx or RequestContext())
    for i in range(len(tokens) // CHUNK):
        assert orch.save(plan, i, kv_for(i, seed))
        if one_by_one:
            assert orch.flush(30)
    assert orch.flush(30)
    return plan


def load_all(orch: Orchestrator, plan) -> dict[int, np.ndarray]:
    handle = orch.load(plan)
    layers = [handle.wait_layer(layer, timeout=30) for layer in range(MODEL.n_layers)]
    return {c: np.stack([layer[c] for layer in layers]) for c in layers[0]}


ONLY = "default: {read: [%s], write: [%s]}\n"


@pytest.fixture(scope="module", autouse=True)
def _settle(redis_server, s3_server, tmp_path_factory):
    """One-off costs (a full garbage collection after the engines of earlier modules, every
    tier's settings built once) paid before any test here times a tier operation."""
    gc.collect()
    parse_config(
        config_text(
            redis_server.url, s3_server, tmp_path_factory.mktemp("settle"), ONLY % ("dram", "dram")
        )
    )


@pytest.mark.parametrize("tier", ["dram", "local", "shared", "cold"])
def test_round_trip_through_each_tier_is_exact(make_orch, tier: str) -> None:
    orch = make_orch(ONLY % (tier, tier))
    tokens = prompt(3, seed=1)
    save_all(orch, tokens, seed=1)
    plan = orch.lookup(tokens, RequestContext())
    assert [c.tier for c in plan.chunks] == [tier] * 3
    assert plan.load_tokens == 3 * CHUNK
    got = load_all(orch, plan)
    assert sorted(got) == [0, 1, 2]
    for i in range(3):
        np.testing.assert_array_equal(got[i], kv_for(i, seed=1))
    t = orch.telemetry
    assert t.value("kvstrata_tokens_total", source=tier) == 3 * CHUNK
    assert t.value("kvstrata_tier_bytes_total", tier=tier, direction="write") > 3 * kv_for(0).nbytes


def test_route_writes_only_its_tiers_and_reads_in_order(make_orch) -> None:
    orch = make_orch(ONLY % ("dram, shared", "shared"))
    tokens = prompt(2, seed=2)
    save_all(orch, tokens, seed=2)
    import kvstrata.runtime as rt

    logical = orch.lookup(tokens, RequestContext()).keys["none"]
    assert rt.run(orch.tiers["dram"].contains(logical)) == [False, False]
    assert rt.run(orch.tiers["local"].contains(logical)) == [False, False]
    assert rt.run(orch.tiers["shared"].contains(logical)) == [True, True]
    # reads go to the first tier holding a chunk; dram is read but not written: no promotion
    plan = orch.lookup(tokens, RequestContext())
    assert [c.tier for c in plan.chunks] == ["shared", "shared"]
    load_all(orch, plan)
    orch.flush(10)
    assert rt.run(orch.tiers["dram"].contains(logical)) == [False, False]


def test_hits_in_a_slower_tier_are_promoted(make_orch) -> None:
    orch = make_orch(ONLY % ("dram, cold", "dram, cold"))
    tokens = prompt(2, seed=3)
    save_all(orch, tokens, seed=3)
    import kvstrata.runtime as rt

    logical = orch.lookup(tokens, RequestContext()).keys["none"]
    rt.run(orch.tiers["dram"].delete(logical))  # as if DRAM had evicted them
    plan = orch.lookup(tokens, RequestContext())
    assert [c.tier for c in plan.chunks] == ["cold", "cold"]
    load_all(orch, plan)
    assert orch.flush(10)
    assert [c.tier for c in orch.lookup(tokens, RequestContext()).chunks] == ["dram", "dram"]
    assert (
        orch.telemetry.value("kvstrata_chunk_moves_total", kind="promote", src="cold", dst="dram")
        == 2
    )


def test_admission_writes_to_s3_only_after_two_sightings(make_orch) -> None:
    orch = make_orch("default: {read: [dram, cold], write: [dram, cold], admission: {cold: 2}}\n")
    tokens = prompt(1, seed=4)
    import kvstrata.runtime as rt

    plan = save_all(orch, tokens, seed=4)  # first sighting
    key = plan.keys["none"][0]
    assert rt.run(orch.tiers["cold"].contains([key])) == [False]
    assert rt.run(orch.tiers["dram"].contains([key])) == [True]
    assert orch.telemetry.value("kvstrata_save_dropped_total", reason="admission") == 1
    save_all(orch, tokens, seed=4)  # second sighting: admitted
    assert rt.run(orch.tiers["cold"].contains([key])) == [True]


def test_demotion_of_dram_evictions_to_disk(make_orch) -> None:
    policy = "default: {read: [dram, local], write: [dram], demote: {dram: local}}\n"
    orch = make_orch(policy)
    cap = MODEL.chunk_bytes(CHUNK) * 2 + 8192  # room for two chunks
    import kvstrata.runtime as rt
    from kvstrata.tiers.memory import MemoryTier

    orch.tiers["dram"] = MemoryTier("dram", capacity_bytes=cap, eviction="lru")
    tokens = prompt(4, seed=5)
    # One chunk at a time: the save workers run concurrently, so chunks saved together may
    # reach the LRU in any order, and this test is about which chunk goes where on eviction.
    plan = save_all(orch, tokens, seed=5, one_by_one=True)
    keys = plan.keys["none"]
    assert rt.run(orch.tiers["dram"].contains(keys)) == [False, False, True, True]
    assert rt.run(orch.tiers["local"].contains(keys)) == [True, True, False, False]
    got = load_all(orch, orch.lookup(tokens, RequestContext()))
    np.testing.assert_array_equal(got[0], kv_for(0, seed=5))


def test_tenants_do_not_share(make_orch) -> None:
    orch = make_orch(ONLY % ("dram", "dram"))
    tokens = prompt(2, seed=6)
    save_all(orch, tokens, seed=6, ctx=RequestContext(tenant="a"))
    assert orch.lookup(tokens, RequestContext(tenant="b")).chunks == ()
    assert len(orch.lookup(tokens, RequestContext(tenant="a")).chunks) == 2


def test_engine_tokens_are_skipped(make_orch) -> None:
    orch = make_orch(ONLY % ("dram", "dram"))
    tokens = prompt(3, seed=7)
    save_all(orch, tokens, seed=7)
    plan = orch.lookup(tokens, RequestContext(), skip_tokens=CHUNK + 16)  # engine holds 1.5 chunks
    assert [c.index for c in plan.chunks] == [1, 2]
    assert plan.load_tokens == 3 * CHUNK - (CHUNK + 16)
    assert orch.telemetry.value("kvstrata_tokens_total", source="engine") == CHUNK + 16


def test_corrupt_object_in_a_tier_is_a_miss_and_dropped(make_orch) -> None:
    orch = make_orch(ONLY % ("shared", "shared"))
    tokens = prompt(2, seed=8)
    plan = save_all(orch, tokens, seed=8)
    import kvstrata.runtime as rt

    key = plan.keys["none"][1]
    (raw,) = rt.run(orch.tiers["shared"]._read([ReadRequest(key)]))  # the stored bytes
    blob = bytearray(raw)
    blob[-3] ^= 0xFF
    rt.run(orch.tiers["shared"].put([(key, bytes(blob))]))
    plan = orch.lookup(tokens, RequestContext())
    handle = orch.load(plan)
    assert handle.wait_all(30)
    assert handle.failed == {1}
    np.testing.assert_array_equal(handle.wait_layer(0)[0], kv_for(0, seed=8)[0])
    assert (
        orch.telemetry.value("kvstrata_bad_objects_total", tier="shared", reason="unauthenticated")
        == 1
    )
    time.sleep(0.5)
    assert rt.run(orch.tiers["shared"].contains([key])) == [False]  # dropped


def test_tier_stopped_mid_run_means_misses_and_breaker_cycle(make_orch, tmp_path) -> None:
    server = svc.start_redis(tmp_path / "own-redis")
    try:
        orch = make_orch(ONLY % ("shared", "shared"), redis_url=server.url)
        tokens = prompt(2, seed=9)
        save_all(orch, tokens, seed=9)
        plan = orch.lookup(tokens, RequestContext())
        assert len(plan.chunks) == 2
        server.kill()
        # the load of a plan made before the fault: chunks fail, nothing raises
        handle = orch.load(plan)
        assert handle.wait_all(30) and handle.failed == {0, 1}
        # lookups recompute; after 2 failures the breaker opens and tier calls are skipped
        for _ in range(3):
            assert orch.lookup(tokens, RequestContext()).chunks == ()
        assert orch.breakers["shared"].is_open
        assert (
            orch.telemetry.value(
                "kvstrata_tier_ops_total", tier="shared", op="contains", result="skipped"
            )
            >= 1
        )
        # saves are dropped and counted, never raised
        assert orch.save(plan, 0, kv_for(0))
        assert orch.flush(10)
        assert orch.telemetry.value("kvstrata_save_dropped_total", reason="tier_error") >= 1
        server.restart()
        time.sleep(1.1)  # cooldown
        orch.lookup(tokens, RequestContext())  # half-open trial succeeds: breaker closes
        assert not orch.breakers["shared"].is_open
        assert orch.telemetry.value("kvstrata_breaker_open", tier="shared") == 0
        save_all(orch, tokens, seed=9)
        plan = orch.lookup(tokens, RequestContext())
        assert len(plan.chunks) == 2, (plan.choice, orch.cost.tier("shared"))
    finally:
        server.stop()


def test_save_queue_never_blocks(make_orch, redis_server) -> None:
    host, port = redis_server.url.split("//")[1].split("/")[0].split(":")
    proxy = ThrottledProxy(host, int(port), bytes_per_s=200_000)  # a very slow link to a real Redis
    try:
        orch = make_orch(ONLY % ("shared", "shared"), redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        tokens = prompt(100, seed=10)
        plan = orch.lookup(tokens, RequestContext())
        kv = kv_for(0)
        started = time.perf_counter()
        results = [orch.save(plan, i, kv) for i in range(100)]
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"100 saves took {elapsed:.2f}s"
        assert results.count(False) > 0  # the queue (64) filled up: the rest were dropped
        assert orch.telemetry.value(
            "kvstrata_save_dropped_total", reason="queue_full"
        ) == results.count(False)
    finally:
        proxy.set_rate(0)  # let the queue drain quickly for teardown
        proxy.close()


def test_lookup_waits_for_chunks_still_being_written(make_orch, redis_server) -> None:
    host, port = redis_server.url.split("//")[1].split("/")[0].split(":")
    proxy = ThrottledProxy(
        host, int(port), bytes_per_s=2_000_000
    )  # each chunk takes ~0.1 s to write
    try:
        orch = make_orch(ONLY % ("shared", "shared"), redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        tokens = prompt(3, seed=11)
        plan = orch.lookup(tokens, RequestContext())
        for i in range(3):
            assert orch.save(plan, i, kv_for(i, seed=11))
        again = orch.lookup(tokens, RequestContext())  # no flush: the writes are in flight
        assert [c.index for c in again.chunks] == [0, 1, 2]
    finally:
        proxy.set_rate(0)
        proxy.close()


def test_tier_calls_answer_values_not_none(make_orch, tmp_path) -> None:
    # a Redis port nothing listens on: a real connection refusal, no mock
    (port,) = svc.free_ports(1)
    orch = make_orch(ONLY % ("shared", "shared"), redis_url=f"redis://127.0.0.1:{port}/0")
    key = ChunkKey(b"\5" * 32)
    answers = [
        rt.run(orch.calls.call("shared", "contains", lambda t: t.contains([key]))) for _ in range(3)
    ]
    assert [a.outcome for a in answers] == ["error", "error", "skipped"]  # breaker: 2 failures
    assert all(isinstance(a, Failed) and a.tier == "shared" for a in answers)
    held = rt.run(orch.calls.call("dram", "contains", lambda t: t.contains([key])))
    assert isinstance(held, Ok) and held.value == [False]


def test_whole_objects_go_through_the_call_wrapper(make_orch) -> None:
    # what a corpus uses: store, fetch with the reader's expectation, holds; tier metrics counted
    (port,) = svc.free_ports(1)
    orch = make_orch(ONLY % ("local", "local"), redis_url=f"redis://127.0.0.1:{port}/0")
    ns, key, other = b"\1" * 32, ChunkKey(b"\2" * 32), ChunkKey(b"\3" * 32)
    kv = np.random.default_rng(5).standard_normal(
        (MODEL.n_layers, 2, 7, MODEL.kv_heads, MODEL.head_dim), dtype=np.float32
    )
    rt.run(orch.whole.store_kv("local", key, ns, kv))
    m = MODEL
    expected = Expected("none", ns, m.dtype, m.kv_heads, m.head_dim, m.n_layers)
    # a tier that fails is a miss for its keys, the next tier answers
    got, missing = rt.run(orch.whole.fetch(["shared", "local"], [key, other], expected))
    assert missing is None
    np.testing.assert_array_equal(orch.whole.layer(got, 2), kv[2])
    ops = "kvstrata_tier_ops_total"
    assert orch.telemetry.value(ops, tier="local", op="put", result="ok") == 1
    assert orch.telemetry.value(ops, tier="local", op="get", result="ok") == 1
    assert orch.telemetry.value(ops, tier="shared", op="get", result="error") == 1
    assert rt.run(orch.whole.holds(["shared", "local"], key))
    # another reader's object under this key (another namespace) is foreign: counted, dropped
    foreign = Expected("none", b"\4" * 32, m.dtype, m.kv_heads, m.head_dim, m.n_layers)
    assert rt.run(orch.whole.fetch(["local"], [key], foreign)) == [None]
    assert orch.telemetry.value("kvstrata_bad_objects_total", tier="local", reason="foreign") == 1
    deadline = time.monotonic() + 10
    while rt.run(orch.whole.holds(["local"], key)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rt.run(orch.whole.holds(["local"], key))
    # a write that a tier does not take raises (a corpus build must not report success)
    with pytest.raises(StoreFailed, match="shared"):
        rt.run(orch.whole.store_kv("shared", key, ns, kv))
