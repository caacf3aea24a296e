"""StrataConnector end to end: vLLM's CPU build, SmolLM2-135M, every tier for real.

One engine with the connector (a policy that routes by the request's ``tier``
hint to memory, disk, Redis or S3) lives in this process. The reference
greedy tokens come from an engine without the connector in a subprocess
(vLLM keeps one connector per process, so the two cannot share one); a
second engine process checks sharing across engines. Servers: the session's
real Redis and SeaweedFS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvstrata import runtime
from kvstrata.keys import chunk_keys
from kvstrata.offline.convert import prepare_smollm2
from kvstrata.offline.runner import generate, running_llm, text_tokens
from kvstrata.orchestrator import flush_shared, shared_orchestrators
from kvstrata.testing import services as svc

vllm = pytest.importorskip(
    "vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)"
)

PROMPT_TOKENS = 1500
CHUNK = 128  # the default: the CPU build's block size, so a hit covers every full block
HIT = (PROMPT_TOKENS - 1) // CHUNK * CHUNK  # full blocks; vLLM computes the last token itself
assert HIT == 1408  # issue #15: all full 128-token blocks but the one holding the last token
TIERS = {"memory": "dram", "disk": "local", "redis": "shared", "s3": "cold"}


def strata_yaml(tmp: Path, redis_url: str, s3, fragile_url: str) -> str:
    rules = (
        "\n".join(
            f"    - {{name: via-{name}, match: {{hints: {{tier: {name}}}}},"
            f" route: {{read: [{name}], write: [{name}]}}}}"
            for name in ["local", "shared", "cold", "fragile"]
        )
        + "\n    - {name: via-both, match: {hints: {tier: both}},"
        " route: {read: [dram, local], write: [dram, local]}}"
        + "\n    - {name: via-cold-layerwise, match: {hints: {tier: cold-layerwise}},"
        " route: {read: [cold], write: [cold], retrieval: layerwise}}"
        + "".join(
            f"\n    - {{name: pages-{name}, match: {{hints: {{tier: pages-{name}}}}},"
            f" route: {{read: [{name}], write: [{name}], codec: {{{name}: pages}}}}}}"
            for name in ["dram", "local", "shared", "cold"]
        )
        + "\n    - {name: pages-and-canonical, match: {hints: {tier: pages-and-canonical}},"
        " route: {read: [dram, shared], write: [dram, shared], codec: {dram: pages}}}"
    )
    return (
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          dram: {{kind: memory, capacity_bytes: 1GiB}}
          local: {{kind: disk, path: "{tmp / "disk"}"}}
          shared: {{kind: redis, url: "{redis_url}", key_prefix: "e2e:"}}
          fragile: {{kind: redis, url: "{fragile_url}", key_prefix: "e2e:", timeout_ms: 1000,
                     timeout_s: 1}}
          cold:
            kind: s3
            endpoint: "{s3.endpoint}"
            bucket: {s3.bucket}
            prefix: e2e/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
        engine: {{prefill_tokens_per_s: 100}}
        bandwidth: {{policy: deadline, links: {{cold: 400MB/s}}}}
        policy:
          default: {{read: [dram], write: [dram]}}
          rules:
        """)
        + rules
        + "\n"
    )


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_smollm2(progress=False)


@pytest.fixture(scope="module")
def fragile_redis(tmp_path_factory):
    server = svc.start_redis(tmp_path_factory.mktemp("fragile"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, redis_server, s3_server, fragile_redis) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    path = tmp / "strata.yaml"
    path.write_text(strata_yaml(tmp, redis_server.url, s3_server, fragile_redis.url))
    return path


OFFSETS = {
    "memory": 5000,
    "disk": 10000,
    "redis": 15000,
    "s3": 20000,
    "tenant": 40000,
    "fragile": 45000,
    "corrupt": 50000,
    "second-shared": 60000,
    "second-cold": 65000,
    "promote": 70000,
    "layerwise": 75000,
    "pages-memory": 80000,
    "pages-disk": 85000,
    "pages-redis": 90000,
    "pages-s3": 95000,
    "pages-and-canonical": 100000,
}

REFERENCE = (
    f"PROMPT_TOKENS = {PROMPT_TOKENS}\n"
    + """
import json, sys
from kvstrata.offline.runner import generate, make_llm, text_tokens
if __name__ == "__main__":
    llm = make_llm(sys.argv[1], connector=False, kv_cache_gib=1)
    offsets = json.loads(sys.argv[2])
    tok = llm.get_tokenizer()
    out = {
        name: list(generate(llm, text_tokens(tok, PROMPT_TOKENS, offset=o), 16).token_ids)
        for name, o in offsets.items()
    }
    print("RESULT " + json.dumps(out))
"""
)


def run_script(tmp: Path, source: str, *args: str, env: dict | None = None) -> dict:
    script = tmp / "script.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=900, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict[str, tuple[int, ...]]:
    """Greedy tokens of every test prompt from vLLM without the connector (another process)."""
    out = run_script(tmp_path_factory.mktemp("ref"), REFERENCE, str(model_dir), json.dumps(OFFSETS))
    return {name: tuple(ids) for name, ids in out.items()}


@pytest.fixture(scope="module")
def llm(model_dir, config_path, reference):
    with running_llm(model_dir, config_path, kv_cache_gib=1) as engine:
        yield engine


def prompt(llm, name: str) -> list[int]:
    return text_tokens(llm.get_tokenizer(), PROMPT_TOKENS, offset=OFFSETS[name])


@pytest.mark.parametrize("kind", list(TIERS))
def test_repeated_prompt_is_served_from_each_tier(llm, reference, kind: str) -> None:
    tier = TIERS[kind]
    ids = prompt(llm, kind)
    hints = {"tier": tier} if tier != "dram" else None
    expected = reference[kind]
    first = generate(llm, ids, 16, kv_params=hints)
    assert first.num_cached_tokens == 0 and first.token_ids == expected
    assert flush_shared(60)
    second = generate(llm, ids, 16, kv_params=hints)
    assert second.num_cached_tokens == HIT
    assert second.kvstrata["loaded_tokens"] == {tier: HIT}
    assert second.token_ids == expected


@pytest.mark.parametrize("kind", list(TIERS))
def test_engine_pages_are_served_from_each_tier(llm, reference, kind: str) -> None:
    """Codec ``pages`` (vLLM's own page layout, no transpose): same tokens, every full block."""
    tier, name = TIERS[kind], f"pages-{kind}"
    ids = prompt(llm, name)
    hints = {"tier": f"pages-{tier}"}
    first = generate(llm, ids, 16, kv_params=hints)
    assert first.num_cached_tokens == 0 and first.token_ids == reference[name]
    assert flush_shared(60)
    (orch,) = shared_orchestrators()
    keys = chunk_keys(ids, orch.model.namespace(codec="pages"), CHUNK)
    hit = runtime.run(orch.tiers[tier].get(keys[:1]))[0]
    assert hit.obj.meta.codec_params == {"layout": "cpu-vec", "block_size": CHUNK}
    second = generate(llm, ids, 16, kv_params=hints)
    assert second.num_cached_tokens == HIT
    assert second.kvstrata["loaded_tokens"] == {tier: HIT}
    assert second.token_ids == reference[name]


def test_pages_and_canonical_tiers_convert_both_ways(llm, reference) -> None:
    """One save to DRAM as engine pages and to Redis in canonical order (converted); a Redis hit
    (canonical) promoted into DRAM as pages (converted back): the same tokens every time."""
    ids, hints = prompt(llm, "pages-and-canonical"), {"tier": "pages-and-canonical"}
    expected = reference["pages-and-canonical"]
    assert generate(llm, ids, 16, kv_params=hints).token_ids == expected
    assert flush_shared(60)
    (orch,) = shared_orchestrators()
    runtime.run(
        orch.tiers["dram"].delete(chunk_keys(ids, orch.model.namespace("", "pages"), CHUNK))
    )
    from_redis = generate(llm, ids, 16, kv_params=hints)
    assert from_redis.kvstrata["loaded_tokens"] == {"shared": HIT}
    assert from_redis.token_ids == expected
    assert flush_shared(60)
    from_dram = generate(llm, ids, 16, kv_params=hints)
    assert from_dram.kvstrata["loaded_tokens"] == {"dram": HIT}
    assert from_dram.token_ids == expected


def test_tenants_do_not_share(llm) -> None:
    ids = prompt(llm, "tenant")
    generate(llm, ids, 4, cache_salt="tenant-a")
    assert flush_shared(60)
    assert generate(llm, ids, 4, cache_salt="tenant-b").num_cached_tokens == 0
    assert generate(llm, ids, 4, cache_salt="tenant-a").num_cached_tokens == HIT


def test_tier_down_between_save_and_load_recomputes(llm, reference, fragile_redis) -> None:
    ids = prompt(llm, "fragile")
    expected = reference["fragile"]
    generate(llm, ids, 16, kv_params={"tier": "fragile"})
    assert flush_shared(60)
    fragile_redis.kill()
    try:
        again = generate(llm, ids, 16, kv_params={"tier": "fragile"})
        assert again.num_cached_tokens == 0
        assert again.token_ids == expected
    finally:
        fragile_redis.restart()


def test_corrupt_chunk_in_a_shared_store_is_recomputed(llm, reference, redis_server) -> None:
    import redis

    ids = prompt(llm, "corrupt")
    expected = reference["corrupt"]
    generate(llm, ids, 16, kv_params={"tier": "shared"})
    assert flush_shared(60)
    (orch,) = shared_orchestrators()
    keys = chunk_keys(ids, orch.model.namespace(), CHUNK)
    client = redis.Redis.from_url(redis_server.url)
    assert client.setrange(f"e2e:{keys[2]}", 40_000, b"\x00garbage\x00")  # chunk 2's body damaged
    # a damaged body fails its section's tag: an "unauthenticated" miss
    before = orch.telemetry.value(
        "kvstrata_bad_objects_total", tier="shared", reason="unauthenticated"
    )
    again = generate(llm, ids, 16, kv_params={"tier": "shared"})
    assert again.token_ids == expected
    assert (
        orch.telemetry.value("kvstrata_bad_objects_total", tier="shared", reason="unauthenticated")
        == before + 1
    )


def test_a_disk_hit_is_promoted_into_dram(llm, reference) -> None:
    ids = prompt(llm, "promote")
    both = {"tier": "both"}
    generate(llm, ids, 16, kv_params=both)
    assert flush_shared(60)
    (orch,) = shared_orchestrators()
    keys = chunk_keys(ids, orch.model.namespace(), CHUNK)
    runtime.run(orch.tiers["dram"].delete(keys))  # as if DRAM had evicted them
    from_disk = generate(llm, ids, 16, kv_params=both)
    assert from_disk.kvstrata["loaded_tokens"] == {"local": HIT}
    assert from_disk.token_ids == reference["promote"]
    assert flush_shared(60)
    from_dram = generate(llm, ids, 16, kv_params=both)
    assert from_dram.kvstrata["loaded_tokens"] == {"dram": HIT}
    assert from_dram.token_ids == reference["promote"]


def test_an_s3_route_loads_layer_by_layer_through_the_bandwidth_scheduler(llm, reference) -> None:
    ids = prompt(llm, "layerwise")
    hints = {"tier": "cold-layerwise"}
    generate(llm, ids, 16, kv_params=hints)
    assert flush_shared(60)
    (orch,) = shared_orchestrators()

    def gets() -> float:
        return orch.telemetry.value(
            "kvstrata_tier_ops_total", tier="cold", op="read_range", result="issued"
        )

    served = orch.links["cold"].served_bytes
    before = gets()
    again = generate(llm, ids, 16, kv_params=hints)
    assert again.kvstrata["loaded_tokens"] == {"cold": HIT}
    assert again.token_ids == reference["layerwise"]
    chunks = HIT // CHUNK
    # several layer groups per chunk (the engine computes far longer than a layer takes to read),
    # far fewer than one GET per chunk and layer
    assert 2 * chunks <= gets() - before < chunks * orch.model.n_layers
    assert orch.links["cold"].served_bytes - served == pytest.approx(
        chunks * orch.model.chunk_bytes(CHUNK)
    )


SECOND_PROCESS = """
import json, sys
from kvstrata.offline.runner import generate, make_llm
if __name__ == "__main__":
    model, config, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = make_llm(model, config, kv_cache_gib=1)
    out = {tier: generate(llm, ids, 16, kv_params={"tier": tier}) for tier, ids in prompts.items()}
    result = {
        t: [r.num_cached_tokens, r.kvstrata["loaded_tokens"], list(r.token_ids)]
        for t, r in out.items()
    }
    print("RESULT " + json.dumps(result))
"""


def test_a_second_engine_process_hits_redis_and_s3(
    llm, reference, model_dir, config_path, tmp_path
) -> None:
    prompts = {"shared": prompt(llm, "second-shared"), "cold": prompt(llm, "second-cold")}
    for tier, ids in prompts.items():
        generate(llm, ids, 4, kv_params={"tier": tier})
    assert flush_shared(60)
    env = dict(os.environ, PYTHONHASHSEED="12345")  # another hash seed: keys must not depend on it
    result = run_script(
        tmp_path, SECOND_PROCESS, str(model_dir), str(config_path), json.dumps(prompts), env=env
    )
    for tier in prompts:
        cached, loaded, tokens = result[tier]
        assert cached == HIT and loaded == {tier: HIT}
        assert tuple(tokens) == reference[f"second-{tier}"]
