"""StrataConnector end to end through LMCache and NIXL: vLLM's CPU build, SmolLM2-135M.

The DRAM tier is LMCache's CPU backend (``kind: lmcache``), the cold tier is
the real SeaweedFS through NIXL's OBJ plugin (``transport: nixl``). A repeated
prompt must be served from each, with the greedy tokens of an engine without
the connector (run in a subprocess: vLLM keeps one connector per process).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

vllm = pytest.importorskip(
    "vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)"
)

from kvstrata.keys import chunk_keys  # noqa: E402
from kvstrata.offline.convert import prepare_smollm2  # noqa: E402
from kvstrata.offline.runner import generate, running_llm, text_tokens  # noqa: E402
from kvstrata.orchestrator import flush_shared, shared_orchestrators  # noqa: E402
from tests.test_vllm_e2e import HIT, PROMPT_TOKENS, REFERENCE, run_script  # noqa: E402

OFFSETS = {"lmcache": 80000, "nixl": 85000}


def strata_yaml(s3) -> str:
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: 256
        tiers:
          dram:
            kind: lmcache
            capacity_bytes: 256MiB
            # memory's prior, faster than lmcache's default
            cost: {{latency_ms: 0.02, bandwidth_mbps: 20000}}
            timeout_ms: 20000  # generous: this machine is shared, and a timeout here is a miss
          cold:
            kind: s3
            transport: nixl
            timeout_ms: 20000
            endpoint: "{s3.endpoint}"
            bucket: {s3.bucket}
            prefix: lmcache-e2e/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
        engine: {{prefill_tokens_per_s: 100}}
        policy:
          default: {{read: [dram], write: [dram]}}
          rules:
            - {{name: via-cold, match: {{hints: {{tier: cold}}}},
               route: {{read: [cold], write: [cold]}}}}
        """)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_smollm2(progress=False)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict[str, tuple[int, ...]]:
    out = run_script(tmp_path_factory.mktemp("ref"), REFERENCE, str(model_dir), json.dumps(OFFSETS))
    return {name: tuple(ids) for name, ids in out.items()}


@pytest.fixture(scope="module")
def llm(model_dir, s3_server, reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("lmcache-e2e") / "strata.yaml"
    path.write_text(strata_yaml(s3_server))
    with running_llm(model_dir, path, kv_cache_gib=1) as engine:
        yield engine


def test_repeated_prompt_is_served_from_lmcache(llm, reference) -> None:
    ids = text_tokens(llm.get_tokenizer(), PROMPT_TOKENS, offset=OFFSETS["lmcache"])
    first = generate(llm, ids, 16)
    assert first.num_cached_tokens == 0 and first.token_ids == reference["lmcache"]
    assert flush_shared(60)
    (orch,) = shared_orchestrators()
    tier = orch.tiers["dram"]
    assert tier.kind == "lmcache"
    keys = chunk_keys(ids, orch.model.namespace(), 256)
    assert len(keys) == HIT // 256
    from kvstrata import runtime

    assert runtime.run(tier.contains(keys)) == [True] * len(keys)
    assert len(tier._backend.get_keys()) >= len(keys)  # the chunks are LMCache memory objects
    second = generate(llm, ids, 16)
    assert second.num_cached_tokens == HIT
    assert second.kvstrata["loaded_tokens"] == {"dram": HIT}
    assert second.token_ids == reference["lmcache"]


def test_repeated_prompt_is_served_from_s3_through_nixl(llm, reference) -> None:
    ids = text_tokens(llm.get_tokenizer(), PROMPT_TOKENS, offset=OFFSETS["nixl"])
    hints = {"tier": "cold"}
    first = generate(llm, ids, 16, kv_params=hints)
    assert first.num_cached_tokens == 0 and first.token_ids == reference["nixl"]
    assert flush_shared(60)
    second = generate(llm, ids, 16, kv_params=hints)
    assert second.num_cached_tokens == HIT
    assert second.kvstrata["loaded_tokens"] == {"cold": HIT}
    assert second.token_ids == reference["nixl"]
