"""Layer-wise loading from a real S3 server, the pipeline model and the bandwidth scheduler."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from kvstrata.config import parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy import pipeline
from kvstrata.policy.bandwidth import Deadline, Demand, EqualShare, Link, StallAware
from kvstrata.policy.route import RequestContext
from kvstrata.testing.throttle import ThrottledProxy

from .conftest import unique

CHUNK = 64
MODEL = ModelSpec(
    "layerwise-model", n_layers=8, kv_heads=4, head_dim=64, dtype="float32"
)  # 128 KiB/layer/chunk


def orchestrator(
    endpoint: str, server, bandwidth: str = "", retrieval: str = "layerwise"
) -> Orchestrator:
    cfg = parse_config(f"""
version: 1
chunk_tokens: {CHUNK}
tiers:
  cold:
    kind: s3
    endpoint: {endpoint}
    bucket: {server.bucket}
    prefix: lw-{unique()}/
    access_key_id: {server.access_key}
    secret_access_key: {server.secret_key}
    timeout_ms: 30000
{bandwidth}
policy:
  default: {{read: [cold], write: [cold], retrieval: {retrieval}, load: always}}
""")
    return Orchestrator(cfg, MODEL)


def kv_for(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal((MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim)).astype(
        np.float32
    )


def stored_plan(orch: Orchestrator, n_chunks: int, seed: int):
    tokens = np.arange(n_chunks * CHUNK + 1) + seed * 100_000
    plan = orch.lookup(tokens, RequestContext())
    for i in range(n_chunks):
        orch.save(plan, i, kv_for(seed * 10 + i))
    assert orch.flush(60)
    plan = orch.lookup(tokens, RequestContext())
    assert len(plan.chunks) == n_chunks
    return plan


@pytest.mark.parametrize("slow", ["scheduler-link", "throttled-network"])
def test_each_layer_arrives_before_the_next_and_waits_never_wait_for_later_layers(s3_server, slow):
    # 1 chunk x 8 layers x 128 KiB from the real S3 server at 256 KB/s, half a second per layer:
    # paced by kvstrata's own link (two GETs in flight), or by a real throttled TCP link (one GET
    # in flight: concurrent GETs on one link would share it and arrive together).
    url = urlparse(s3_server.endpoint)
    proxy = ThrottledProxy(url.hostname, url.port)
    if slow == "scheduler-link":
        orch = orchestrator(
            s3_server.endpoint, s3_server, "bandwidth: {links: {cold: 256KB/s}, read_window: 2}"
        )
    else:
        orch = orchestrator(
            f"http://127.0.0.1:{proxy.port}", s3_server, "bandwidth: {read_window: 1}"
        )
    try:
        plan = stored_plan(orch, 1, seed=1)
        proxy.set_rate(256e3)
        handle = orch.load(plan, layers_per_read=1)
        for layer in range(MODEL.n_layers):
            got = handle.wait_layer(layer, timeout=60)
            # layer l is usable now, and layer l+1 (let alone the last) has not arrived yet
            later = handle.ready_at[layer + 1 :]
            assert all(t is None for t in later), f"waiting on layer {layer} waited for a later one"
            np.testing.assert_array_equal(got[plan.chunks[0].index], kv_for(10)[layer])
        ready = handle.ready_at
        assert all(ready[i] < ready[i + 1] for i in range(MODEL.n_layers - 1)), ready
        assert ready[-1] - ready[0] > 2.0, "layers were not spread over the transfer"
        assert handle.gets == MODEL.n_layers
        assert not handle.failed
    finally:
        orch.close()
        proxy.close()


def test_adaptive_groups_cut_gets_and_whole_retrieval_is_one_get_per_chunk(s3_server):
    orch = orchestrator(s3_server.endpoint, s3_server)
    whole = orchestrator(s3_server.endpoint, s3_server, retrieval="whole")
    try:
        plan = stored_plan(orch, 3, seed=2)
        # the engine computes 50 ms per layer; a layer's
        # transfer is far shorter: few, growing groups
        handle = orch.load(plan, compute_s_per_layer=0.05)
        assert handle.wait_all(60) and not handle.failed
        assert (
            handle.groups[0] == range(0, len(handle.groups[0]))
            and len(handle.groups) < MODEL.n_layers
        )
        assert sum(len(g) for g in handle.groups) == MODEL.n_layers
        assert handle.gets == 3 * len(handle.groups) <= 3 * MODEL.n_layers // 2
        for c in plan.chunks:
            np.testing.assert_array_equal(handle.chunk_kv(c.index), kv_for(20 + c.index))

        plan = stored_plan(whole, 2, seed=3)
        handle = whole.load(plan)
        assert (
            handle.wait_all(60) and handle.groups == (range(MODEL.n_layers),) and handle.gets == 2
        )
    finally:
        orch.close()
        whole.close()


def test_a_paced_load_through_the_link_is_exact_and_takes_the_links_time(s3_server):
    bandwidth = "bandwidth: {policy: deadline, links: {cold: 4MB/s}}"
    orch = orchestrator(s3_server.endpoint, s3_server, bandwidth=bandwidth)
    try:
        plan = stored_plan(orch, 2, seed=4)  # 2 MiB
        started = time.monotonic()
        handle = orch.load(plan, layers_per_read=2)
        assert handle.wait_all(60) and not handle.failed
        took = time.monotonic() - started
        assert 0.4 < took < 5.0, took  # 2 MiB at 4 MB/s is 0.52 s
        for c in plan.chunks:
            np.testing.assert_array_equal(handle.chunk_kv(c.index), kv_for(40 + c.index))
        assert orch.links["cold"].served_bytes == pytest.approx(
            2 * MODEL.chunk_bytes(CHUNK), rel=1e-3
        )
        assert orch.links["cold"].open_flows == 0
    finally:
        orch.close()


def test_the_link_paces_the_bytes_a_compressed_codec_stores_once_a_read_has_seen_them():
    cfg = parse_config(f"""
version: 1
chunk_tokens: {CHUNK}
tiers: {{cold: {{kind: memory}}}}
bandwidth: {{policy: deadline, links: {{cold: 1GB/s}}}}
policy:
  default: {{read: [cold], write: [cold], codec: {{cold: int8}}, retrieval: layerwise,
             load: always}}
""")
    orch = Orchestrator(cfg, MODEL)
    try:
        plan = stored_plan(orch, 2, seed=6)
        link, nominal = orch.links["cold"], 2 * MODEL.chunk_bytes(CHUNK)
        assert orch.load(plan, layers_per_read=1).wait_all(30)
        first = link.served_bytes
        # the first read reserves the uncompressed size for its first layer, then what int8 stores
        assert nominal / 4 < first < nominal / 2, (first, nominal)
        assert orch.cost.stored_fraction("int8") == pytest.approx(
            0.27, abs=0.03
        )  # 1 byte + scales per 4
        handle = orch.load(plan, layers_per_read=1)
        assert handle.wait_all(30) and not handle.failed
        again = link.served_bytes - first
        assert again == pytest.approx(nominal * orch.cost.stored_fraction("int8"), rel=0.01)
        assert orch.cost.stored_fraction("none") == 1.0  # nothing uncompressed was read
    finally:
        orch.close()


# -- the pipeline model -------------------------------------------------------------


def test_simulated_pipeline_matches_the_bound_for_uniform_layers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        x, c = [float(rng.uniform(0, 1))] * n, [float(rng.uniform(0, 1))] * n
        one_per_get = pipeline.uniform(n, 1)
        assert pipeline.simulate(one_per_get, x, c, 0.0, window=n) == pytest.approx(
            pipeline.bound(x, c)
        )
        for g in pipeline.candidates(n):  # no grouping beats it
            assert pipeline.simulate(g, x, c, 0.0, window=n) >= pipeline.bound(x, c) - 1e-9
        # non-uniform layers: back-to-back transfers do at least as well as the lockstep formula,
        # and never beat "all bytes, then the last layer" or "first layer, then all compute"
        x, c = rng.uniform(0, 1, n).tolist(), rng.uniform(0, 1, n).tolist()
        t = pipeline.simulate(one_per_get, x, c, 0.0, window=n)
        assert max(sum(x) + c[-1], x[0] + sum(c)) - 1e-9 <= t <= pipeline.bound(x, c) + 1e-9


def test_plan_groups_trades_gets_for_time_only_within_tolerance():
    n = 32
    x, c = [0.001] * n, [0.01] * n  # transfer hides behind compute: few GETs cost nothing
    groups = pipeline.plan_groups(x, c, overhead_s=0.002, tolerance=0.02)
    assert len(groups) * 4 <= n
    best = min(pipeline.simulate(g, x, c, 0.002) for g in pipeline.candidates(n))
    assert pipeline.simulate(groups, x, c, 0.002) <= best * 1.02
    assert [layer for g in groups for layer in g] == list(range(n))


# -- the policies -------------------------------------------------------------------


def demand(flow, remaining, size=None, no_stall=10.0, behind=True, deadline=None):
    return Demand(flow, remaining, size or remaining, no_stall, behind, deadline)


def test_equal_share_splits_evenly():
    rates = EqualShare().rates([demand(1, 100), demand(2, 5), demand(3, 1)], 30.0, 0.0)
    assert rates == {1: 10.0, 2: 10.0, 3: 10.0}


def test_stall_aware_caps_at_the_no_stall_rate_and_splits_the_rest_by_square_root_of_size():
    ds = [
        demand(1, 100, no_stall=5.0),
        demand(2, 400, no_stall=1000.0),
        demand(3, 1600, no_stall=1000.0),
    ]
    rates = StallAware().rates(ds, 35.0, 0.0)
    assert rates[1] == pytest.approx(5.0)
    assert rates[3] / rates[2] == pytest.approx(2.0)  # sqrt(1600) / sqrt(400)
    assert sum(rates.values()) == pytest.approx(35.0)
    # everyone capped: the spare capacity is spread (work conserving)
    rates = StallAware().rates(
        [demand(1, 100, no_stall=1.0), demand(2, 100, no_stall=2.0)], 13.0, 0.0
    )
    assert rates == pytest.approx({1: 6.0, 2: 7.0})


def test_deadline_policy_serves_least_remaining_work_first_and_urgent_deadlines_before_that():
    ds = [demand(1, 100), demand(2, 10), demand(3, 1000)]
    rates = Deadline().rates(ds, 50.0, 0.0)
    assert rates[2] == pytest.approx(50.0) and rates[1] == rates[3] == 0
    # a request ahead of its compute takes only its no-stall rate; the next one takes the rest
    ds = [demand(1, 100), demand(2, 10, no_stall=4.0, behind=False)]
    assert Deadline().rates(ds, 50.0, 0.0) == pytest.approx({1: 46.0, 2: 4.0})
    # a deadline that full speed meets but waiting behind a shorter request would miss goes first
    ds = [demand(1, 10), demand(2, 1000, deadline=20.1)]
    assert Deadline().rates(ds, 50.0, 0.0)[2] == pytest.approx(50.0)
    ds_late = [demand(1, 10), demand(2, 1000, deadline=19.0)]  # lost anyway: no priority
    assert Deadline().rates(ds_late, 50.0, 0.0)[1] == pytest.approx(50.0)
    # it never jumps a request that would then miss its own deadline
    ds_tight = [demand(1, 10, deadline=0.25), demand(2, 1000, deadline=20.1)]
    assert Deadline().rates(ds_tight, 50.0, 0.0)[1] == pytest.approx(50.0)
    for policy in (EqualShare(), StallAware(), Deadline()):
        assert sum(policy.rates(ds, 50.0, 0.0).values()) <= 50.0 + 1e-9


def test_link_serves_flows_by_policy_and_conserves_bytes():
    async def run(policy: str) -> dict[str, float]:
        link = Link(20e6, policy)
        started = time.monotonic()

        async def request(name: str, nbytes: float) -> tuple[str, float]:
            flow = link.open(nbytes, nbytes / 4, 1e-3)
            for _ in range(4):
                await link.transfer(flow, nbytes / 4)
            link.close(flow)
            return name, time.monotonic() - started

        done = dict(await asyncio.gather(request("small", 1e6), request("large", 4e6)))
        assert link.served_bytes == pytest.approx(5e6, rel=1e-3)
        return done

    equal, srpt = asyncio.run(run("equal")), asyncio.run(run("deadline"))
    # the link runs at capacity either way: 5 MB at 20 MB/s
    assert 0.2 < equal["large"] < 0.6 and 0.2 < srpt["large"] < 0.6
    # equal sharing makes the small request wait for half the link; least-remaining-first does not
    assert srpt["small"] < equal["small"] * 0.75, (srpt, equal)


def test_fixed_sharing_keeps_each_requests_rate_until_another_starts():
    async def finish_times(sharing: str) -> dict[str, float]:
        link = Link(20e6, "equal", sharing=sharing)
        started = time.monotonic()

        async def request(name: str, nbytes: float) -> tuple[str, float]:
            flow = link.open(nbytes, nbytes, 1e-3)
            await link.transfer(flow, nbytes)
            link.close(flow)
            return name, time.monotonic() - started

        return dict(await asyncio.gather(request("small", 1e6), request("large", 3e6)))

    shared, fixed = asyncio.run(finish_times("work_conserving")), asyncio.run(finish_times("fixed"))
    # both start at 10 MB/s; the small one is done at 0.1 s either way
    assert 0.08 < shared["small"] < 0.2 and 0.08 < fixed["small"] < 0.2
    # work conserving, the large one then takes the whole
    # link (4 MB at 20 MB/s); fixed, it keeps 10 MB/s
    assert shared["large"] < 0.26 and fixed["large"] > 0.28, (shared, fixed)
    with pytest.raises(ValueError, match="unknown sharing"):
        Link(1e6, "equal", sharing="fair")


def test_steady_demand_hides_each_read_behind_the_compute_of_the_one_before():
    link = Link(1e9, "stall_aware", sharing="fixed")
    one = link.open(32e6, 1e6, 0.01)  # one layer per read: a layer's bytes per layer of compute
    assert one.steady_demand().no_stall_bps == pytest.approx(1e8)
    growing = link.open(
        32e6, 1e6, 0.01, group_layers=[1, 2, 4, 8, 16, 1]
    )  # each read twice the one before
    assert growing.steady_demand().no_stall_bps == pytest.approx(2e8)
    assert growing.steady_demand().started and not growing.steady_demand().behind


def test_link_close_releases_waiting_transfers():
    async def run() -> None:
        link = Link(1e3, "equal")
        flow = link.open(1e6, 1e5, 1.0)
        pending = asyncio.ensure_future(link.transfer(flow, 1e6))
        await asyncio.sleep(0.02)
        link.close(flow)
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(run())


def test_links_are_configured_by_tier_name_and_policy():
    from kvstrata.config import ConfigError

    text = """
version: 1
tiers: {{cold: {{kind: memory}}}}
bandwidth: {body}
policy: {{default: {{read: [cold], write: [cold]}}}}
"""
    cfg = parse_config(
        text.format(body="{policy: stall_aware, links: {cold: 1.25GB/s}, read_window: 3}")
    )
    assert cfg.bandwidth.links == {"cold": 1.25e9} and cfg.bandwidth.read_window == 3
    with pytest.raises(ConfigError, match=r"x.yaml:4: bandwidth.links.warm: unknown tier 'warm'"):
        parse_config(text.format(body="{links: {warm: 1GB/s}}"), "x.yaml")
    with pytest.raises(ConfigError, match=r"bandwidth.links.cold: .*invalid rate"):
        parse_config(text.format(body="{links: {cold: 1GB}}"), "x.yaml")
    assert cfg.bandwidth.sharing == "work_conserving"
    assert parse_config(text.format(body="{sharing: fixed}")).bandwidth.sharing == "fixed"
    with pytest.raises(ConfigError, match=r"x.yaml:4: bandwidth.sharing: "):
        parse_config(text.format(body="{sharing: fair}"), "x.yaml")
    with pytest.raises(ConfigError, match=r"bandwidth.links.cold: .*must be positive"):
        parse_config(text.format(body="{links: {cold: 0}}"), "x.yaml")
    # "auto": the link's capacity follows the tier's bandwidth as the cost model measures it
    cfg = parse_config(text.format(body="{links: {cold: auto}}"))
    orch = Orchestrator(cfg, MODEL)
    try:
        assert orch.links["cold"].capacity == pytest.approx(orch.cost.tier("cold")[1], rel=1e-3)
        orch.cost.observe_read("cold", 0.01, 10_000_000)  # 10 MB in 10 ms: about 1 GB/s
        assert orch.links["cold"].capacity == pytest.approx(orch.cost.tier("cold")[1], rel=1e-3)
    finally:
        orch.close()
