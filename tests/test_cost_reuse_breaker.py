"""Cost model, reuse estimator and circuit breaker, on their own."""

from __future__ import annotations

import pytest

from kvstrata.breaker import Breaker
from kvstrata.keys import Namespace, chunk_keys
from kvstrata.policy.cost import CostModel, Prior
from kvstrata.policy.reuse import ReuseEstimator

MB = 1_000_000


def model(latency_ms: float, mbps: float, tps: float = 1000.0, layers: int = 10) -> CostModel:
    return CostModel({"t": Prior(latency_ms, mbps)}, prefill_tokens_per_s=tps, n_layers=layers)


@pytest.mark.parametrize(
    "latency_ms, mbps, budget_s, expected",
    [
        (1, 100, None, 4),  # 1 MB chunk = 10 ms vs 256 ms of compute: load everything
        (1, 1, None, 0),  # 1 s per chunk vs 0.256 s: recompute
        (1, 4.5, None, 4),  # 0.22 s per chunk: just cheaper than recompute
        (1, 3.5, None, 0),  # 0.29 s per chunk: just dearer
        (1, 100, 0.025, 2),  # the budget allows two chunks' load (21 ms), not three
        (50, 100, 0.01, 0),  # latency alone exceeds the budget
    ],
)
def test_choose_the_best_prefix(latency_ms, mbps, budget_s, expected) -> None:
    choice = model(latency_ms, mbps).choose(["t"] * 4, 256, MB, 4 * 256, budget_s, layerwise=False)
    assert choice.chunks == expected
    if expected:
        assert choice.ttft_s < choice.recompute_all_s
    else:
        assert choice.ttft_s == pytest.approx(choice.recompute_all_s)


def test_a_compressed_tier_costs_the_bytes_its_codec_stores() -> None:
    m = model(1, 3.5)  # 0.29 s per uncompressed chunk vs 0.256 s of compute: recompute
    assert (
        m.choose(["t"] * 4, 256, MB, 4 * 256, None, False, codecs={"t": "int8"}).chunks == 0
    )  # not measured yet
    m.observe_stored("int8", 0.25)
    assert m.stored_fraction("int8") == 0.25 and m.stored_fraction("none") == 1.0
    choice = m.choose(["t"] * 4, 256, MB, 4 * 256, None, False, codecs={"t": "int8"})
    assert choice.chunks == 4 and choice.load_s == pytest.approx(0.001 + 4 * 0.25 / 3.5, rel=1e-6)
    assert (
        m.choose(["t"] * 4, 256, MB, 4 * 256, None, False).chunks == 0
    )  # uncompressed: still dearer


def test_layerwise_hides_transfer_behind_compute() -> None:
    m = model(1, 10)  # 0.1 s per 1 MB chunk
    # load 2 chunks (0.2 s) while computing 2 others (0.512 s): the pipeline hides the transfer
    whole = m.ttft_s(0.2, 0.512, layerwise=False)
    layered = m.ttft_s(0.2, 0.512, layerwise=True)
    assert whole == pytest.approx(0.712)
    assert layered == pytest.approx(0.02 + 9 * 0.0512 + 0.0512)
    assert layered < whole


def test_observations_move_the_estimates() -> None:
    m = model(1, 1000)
    for _ in range(30):
        m.observe_read("t", 1.0 + 0.001, 1 * MB)  # 1 MB/s observed
    latency, bandwidth = m.tier("t")
    assert bandwidth == pytest.approx(1 * MB, rel=0.05)
    assert m.choose(["t"] * 4, 256, MB, 1024, None, False).chunks == 0
    for _ in range(30):
        m.observe_read("t", 0.01, 1 * MB)  # fast again
    assert m.choose(["t"] * 4, 256, MB, 1024, None, False).chunks == 4
    m.observe_prefill(1000, 0.1)
    assert m.prefill_tokens_per_s > 1000


def test_a_stale_estimate_relaxes_back_to_the_prior() -> None:
    now = [0.0]
    m = CostModel({"t": Prior(1, 1000)}, 1000.0, relax_s=60, clock=lambda: now[0])
    m.observe_read("t", 1.001, 1 * MB)  # a blip: 1 MB/s
    assert m.tier("t")[1] == pytest.approx(1 * MB)
    now[0] = 60.0  # one relaxation half-life without news
    assert m.tier("t")[1] == pytest.approx((1 * MB + 1000 * MB) / 2)
    now[0] = 600.0
    assert m.tier("t")[1] == pytest.approx(1000 * MB, rel=0.01)


def test_reuse_estimator_counts_decays_and_respects_hints() -> None:
    now = [0.0]
    est = ReuseEstimator(width=1024, depth=4, half_life_s=10, clock=lambda: now[0])
    keys = chunk_keys(list(range(512)), Namespace("m", "float32"), 256)
    assert est.predict(keys) == 0.0
    est.observe(keys)
    est.observe(keys[:1])
    assert est.count(keys[0]) == pytest.approx(2)
    assert est.predict(keys) == pytest.approx(((1 - 0.1353) + (1 - 0.3679)) / 2, abs=1e-3)
    now[0] = 10.0  # one half-life later
    assert est.count(keys[0]) == pytest.approx(1.0, rel=1e-3)
    assert est.predict(keys, hint=0.9) == 0.9
    assert est.predict(keys, hint=7) == 1.0


def test_breaker_opens_after_failures_and_closes_after_a_good_trial() -> None:
    now = [0.0]
    b = Breaker(failures=2, cooldown_s=5, clock=lambda: now[0])
    assert b.allow()
    assert not b.record(False) and b.allow()
    assert b.record(False)  # opened
    assert b.is_open and not b.allow()
    now[0] = 5.0
    assert b.allow() and not b.allow()  # one trial at a time
    assert b.record(False) is False  # trial failed: open again (state unchanged: still open)
    assert not b.allow()
    now[0] = 10.0
    assert b.allow()
    assert b.record(True)  # closed
    assert b.allow() and not b.is_open
