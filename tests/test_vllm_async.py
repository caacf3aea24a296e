"""Asynchronous loads and a scheduler that does not wait: vLLM's CPU build, SmolLM2, real Redis.

One engine with the connector lives in this process (single-process mode:
the async path -- ``load_async=True``, ``WAITING_FOR_REMOTE_KVS``,
``get_finished``, invalid blocks -- is the same code as in multiprocess mode,
and the engine starts in seconds). Two tiers read the same Redis objects:
``shared`` directly, ``slow`` through the project's throttling proxy
(:mod:`kvstrata.testing.throttle`), made slow for real by a bandwidth cap or
a per-packet delay. The greedy tokens of a cold request of the same engine
are the reference.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from kvstrata.connectors.vllm_async import AsyncSettings, stall_s, wants_async
from kvstrata.keys import Namespace, chunk_keys
from kvstrata.plan import Plan, PlannedChunk
from kvstrata.policy.cost import Choice
from kvstrata.policy.route import Decision, RequestContext, Route
from kvstrata.testing.throttle import ThrottledProxy

PROMPT_TOKENS = 1500
HIT = (PROMPT_TOKENS - 1) // 256 * 256

# -- the decision (no engine) -------------------------------------------------------------


def _plan(load_s: float, compute_s: float, hints: dict | None = None) -> Plan:
    keys = tuple(chunk_keys(list(range(512)), Namespace("model", "float32"), 256))
    choice = Choice(2, load_s, compute_s, load_s + compute_s, 5.0, "test")
    return Plan(
        RequestContext(context_tokens=600, hints=hints or {}),
        Decision("default", Route(read=("shared",), write=("shared",))),
        256,
        0,
        {"none": keys},
        chunks=tuple(PlannedChunk(i, "shared", k, "none") for i, k in enumerate(keys)),
        choice=choice,
    )


def test_the_cost_model_sends_slow_loads_async_only_when_others_run() -> None:
    auto = AsyncSettings()
    slow, fast = _plan(0.8, 0.1), _plan(0.001, 0.1)
    assert stall_s(slow.choice) == pytest.approx(0.8)
    assert wants_async(auto, slow, others_running=3)
    assert not wants_async(auto, slow, others_running=0)  # alone: latency first, layer-wise
    assert not wants_async(auto, fast, others_running=3)  # hides behind compute: stay sync
    assert not wants_async(auto, slow, 3, remote=False)  # DRAM/disk: local work, stays sync
    assert wants_async(auto, _plan(0.001, 0.1, {"load": "async"}), 0)  # the request's own hint
    assert not wants_async(auto, _plan(0.8, 0.1, {"load": "sync"}), 3)
    assert wants_async(AsyncSettings("always"), fast, 0)
    assert not wants_async(AsyncSettings("never"), slow, 3)
    with pytest.raises(ValueError):
        AsyncSettings.from_extra({"async_load": "sometimes"})
    with pytest.raises(ValueError):
        AsyncSettings.from_extra({"async_min_stall_ms": "soon"})
    assert AsyncSettings.from_extra({"async_load": "NEVER"}).mode == "never"


# -- with the engine ----------------------------------------------------------------------

vllm = pytest.importorskip("vllm", reason="needs vLLM's CPU build (scripts/setup.sh installs it)")

from kvstrata.offline.convert import prepare_smollm2  # noqa: E402
from kvstrata.offline.runner import generate, running_llm, text_tokens  # noqa: E402
from kvstrata.orchestrator import flush_shared  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def proxy(redis_server):
    host, port = redis_server.url.rsplit("/", 1)[0].split("//")[1].split(":")
    p = ThrottledProxy(host, int(port))
    yield p
    p.close()


@pytest.fixture(scope="module")
def llm(tmp_path_factory, redis_server, proxy):
    tmp = tmp_path_factory.mktemp("async")
    config = tmp / "strata.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: 256
        tiers:
          dram: {{kind: memory, capacity_bytes: 1GiB}}
          shared: {{kind: redis, url: "{redis_server.url}", key_prefix: "async:"}}
          slow: {{kind: redis, url: "redis://127.0.0.1:{proxy.port}/0", key_prefix: "async:",
                  timeout_ms: 60000, timeout_s: 60}}
        policy:
          default: {{read: [dram], write: [dram]}}
          rules:
            - name: via-shared
              match: {{hints: {{tier: shared}}}}
              route: {{read: [shared], write: [shared]}}
            - name: via-slow
              match: {{hints: {{tier: slow}}}}
              route: {{read: [slow], write: [shared]}}
        """)
    )
    with running_llm(prepare_smollm2(progress=False), Path(config), kv_cache_gib=1) as engine:
        yield engine


def _ids(llm, offset: int) -> list[int]:
    return text_tokens(llm.get_tokenizer(), PROMPT_TOKENS, offset=offset)


def test_an_async_load_gives_the_same_greedy_tokens(llm) -> None:
    ids = _ids(llm, 21000)
    cold = generate(llm, ids, 16, kv_params={"tier": "shared"})
    assert cold.kvstrata["loaded_tokens"] == {}
    assert flush_shared(60)
    warm = generate(llm, ids, 16, kv_params={"tier": "shared", "load": "async"})
    assert warm.kvstrata["load"] == "async", warm.kvstrata
    assert warm.kvstrata["loaded_tokens"] == {"shared": HIT}
    assert warm.num_cached_tokens == HIT
    assert warm.token_ids == cold.token_ids


def test_auto_loads_a_slow_tier_async_while_others_decode(llm, proxy) -> None:
    """Three requests decoding, a fourth whose prefix sits behind a slow link: loaded async."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = _ids(llm, 26000)
    cold = generate(llm, ids, 16, kv_params={"tier": "shared"})
    assert flush_shared(60)
    proxy.set_rate(20e6)  # 20 MB/s: the 5 chunks (59 MB) take about 3 s, a step about 0.1 s
    try:
        others = [
            (TokensPrompt(prompt_token_ids=_ids(llm, 30000 + 500 * i)[:64]), 48) for i in range(3)
        ]
        slow = (TokensPrompt(prompt_token_ids=ids), 16)
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, extra_args=extra)
            for (_, n), extra in zip(
                [*others, slow],
                [None] * 3 + [{"kv_transfer_params": {"tier": "slow", "budget_ms": 60000}}],
                strict=True,
            )
        ]
        # the cost model learns the slow tier's latency from the lookup; the load goes async
        outs = llm.generate([p for p, _ in [*others, slow]], params, use_tqdm=False)
    finally:
        proxy.set_rate(0)
    info = (outs[3].kv_transfer_params or {}).get("kvstrata")
    assert info["loaded_tokens"] == {"slow": HIT}, info
    assert info["load"] == "async", info
    assert tuple(outs[3].outputs[0].token_ids) == cold.token_ids
    assert all(len(o.outputs[0].token_ids) == 48 for o in outs[:3])


def test_a_slow_async_load_is_abandoned_and_the_request_completes(llm, proxy) -> None:
    ids = _ids(llm, 35000)
    cold = generate(llm, ids, 16, kv_params={"tier": "shared"})
    assert flush_shared(60)
    proxy.set_rate(200e3)  # 200 kB/s: the 59 MB would take five minutes
    try:
        started = time.monotonic()
        again = generate(
            llm, ids, 16, kv_params={"tier": "slow", "load": "async", "budget_ms": 1500}
        )
        elapsed = time.monotonic() - started
    finally:
        proxy.set_rate(0)
    assert again.kvstrata["reason"] == "async load abandoned: recomputed", again.kvstrata
    assert again.kvstrata["loaded_tokens"] == {}
    assert again.token_ids == cold.token_ids
    assert elapsed < 120, elapsed  # abandoned at 1.5 s, then recomputed: not five minutes


def test_a_lookup_behind_a_slow_tier_is_abandoned_at_its_budget(llm, proxy) -> None:
    """The scheduler answers "ask again" while the lookup runs, a miss at the budget; a request
    on a fast tier in the same batch is served meanwhile."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    fast_ids = _ids(llm, 40000)
    generate(llm, fast_ids, 4, kv_params={"tier": "shared"})
    assert flush_shared(60)
    slow_ids = _ids(llm, 45000)
    proxy.delay_s = 4.0  # every packet through the proxy waits 4 s: a round trip takes 8 s or more
    try:
        started = time.monotonic()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=slow_ids), TokensPrompt(prompt_token_ids=fast_ids)],
            [
                SamplingParams(
                    temperature=0.0,
                    max_tokens=4,
                    extra_args={"kv_transfer_params": {"tier": "slow", "budget_ms": 1000}},
                ),
                SamplingParams(
                    temperature=0.0,
                    max_tokens=4,
                    extra_args={"kv_transfer_params": {"tier": "shared"}},
                ),
            ],
            use_tqdm=False,
        )
        elapsed = time.monotonic() - started
    finally:
        proxy.delay_s = 0.0
    slow, fast = (o.kv_transfer_params["kvstrata"] for o in outs)
    assert slow["reason"] == "lookup over budget", slow
    assert slow["loaded_tokens"] == {}
    assert len(outs[0].outputs[0].token_ids) == 4
    assert fast["loaded_tokens"] == {"shared": HIT}, fast
    assert elapsed < 60, elapsed
