"""``kvstrata serve`` end to end: vLLM's OpenAI server, multiprocess (its default), real HTTP.

One server per module, started as docs/serving.md documents it (the
``kvstrata`` console script next to this Python), with vLLM's prefix cache
off so that a repeated prompt can only be served by kvstrata. The embedded
shape of tiers (a DRAM pool, then a local directory), in a temporary
directory.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)")
httpx = pytest.importorskip("httpx")

from kvstrata.offline.convert import prepare_smollm2  # noqa: E402
from kvstrata.offline.runner import text_tokens  # noqa: E402
from kvstrata.testing.http_server import ServerProcess, server_env  # noqa: E402
from kvstrata.testing.services import free_ports  # noqa: E402

# a server start (1-2 minutes here, more on a busy machine) counts towards the first test, a restart
# towards the last
pytestmark = pytest.mark.timeout(900)

PROMPT_TOKENS = 1500
HIT = (PROMPT_TOKENS - 1) // 256 * 256  # whole chunks; vLLM computes the last token itself
START_TIMEOUT_S = 600


def _free_port() -> int:
    return free_ports(1)[0]


class Server(ServerProcess):
    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        super().__init__("kvstrata serve", argv, env, log)

    def start(self) -> None:
        super().start(START_TIMEOUT_S)

    def complete(self, ids: list[int], max_tokens: int = 16) -> dict:
        r = httpx.post(
            f"{self.url}/v1/completions",
            timeout=300,
            json={
                "model": "smollm2",
                "prompt": ids,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "return_token_ids": True,
            },
        )
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> str:
        r = httpx.get(f"{self.url}/metrics", timeout=30)
        assert r.status_code == 200
        return r.text


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_smollm2(progress=False)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "strata.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: 256
        tiers:
          dram: {{kind: memory, capacity_bytes: 1GiB}}
          local: {{kind: disk, path: "{tmp / "kv"}"}}
        policy:
          default: {{read: [dram, local], write: [dram, local]}}
        """)
    )
    kvstrata = Path(sys.executable).with_name("kvstrata")  # the console script setup installs
    env = server_env(VLLM_CPU_KVCACHE_SPACE="1")  # vLLM's defaults, not an offline engine's
    events_port = _free_port()
    srv = Server(
        [
            str(kvstrata),
            "serve",
            str(model_dir),
            "--strata-config",
            str(config),
            "--port",
            str(_free_port()),
            "--served-model-name",
            "smollm2",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "4096",
            "--no-enable-prefix-caching",
            "--seed",
            "0",
            "--kv-events-config",
            json.dumps(
                {
                    "enable_kv_cache_events": True,
                    "publisher": "zmq",
                    "endpoint": f"tcp://127.0.0.1:{events_port}",
                }
            ),
        ],
        env,
        tmp / "server.log",
    )
    # the KV events subscriber binds before the server starts: vLLM's publisher (its endpoint names
    # a host, so it connects) finds it there from its first event on
    import zmq

    context = zmq.Context()
    srv.events = context.socket(zmq.SUB)
    srv.events.bind(f"tcp://127.0.0.1:{events_port}")
    srv.events.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        srv.events.close(linger=0)
        context.term()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _kvstrata(out: dict) -> dict:
    params = out.get("kv_transfer_params") or {}
    assert "kvstrata" in params, out
    return params["kvstrata"]


def test_served_through_the_connector(server, tokenizer) -> None:
    """The documented command starts vLLM's multiprocess server with the connector in it."""
    out = server.complete(text_tokens(tokenizer, 300, offset=1000), max_tokens=4)
    assert out["choices"][0]["text"]
    info = _kvstrata(out)
    assert info["rule"] == "default"
    assert info["loaded_tokens"] == {}  # nothing stored yet


def test_repeated_prompt_is_served_from_dram_in_multiprocess_mode(server, tokenizer) -> None:
    """The worker's DRAM pool is visible to the scheduler (engine core), another process."""
    ids = text_tokens(tokenizer, PROMPT_TOKENS, offset=5000)
    cold = server.complete(ids)
    assert _kvstrata(cold)["loaded_tokens"] == {}
    warm = server.complete(ids)
    assert _kvstrata(warm)["loaded_tokens"] == {"dram": HIT}
    assert (
        warm["choices"][0]["token_ids"] == cold["choices"][0]["token_ids"]
    )  # greedy: identical with a hit


def _samples(text: str, name: str) -> dict[str, float]:
    """``{source or tier label: value}`` of one family
    on vLLM's /metrics (summed over other labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                label = s.labels.get("source") or s.labels.get("tier") or ""
                out[label] = out.get(label, 0) + s.value
    return out


def test_kvstrata_metrics_are_on_vllms_metrics(server, tokenizer) -> None:
    ids = text_tokens(tokenizer, PROMPT_TOKENS, offset=5000)  # stored by the test above, or now
    server.complete(ids, max_tokens=2)
    server.complete(ids, max_tokens=2)
    deadline = time.monotonic() + 30  # vLLM forwards stats with its engine steps
    while True:
        text = server.metrics()
        tokens = _samples(text, "kvstrata_tokens_total")
        if tokens.get("dram", 0) >= 2 * HIT or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert tokens.get("dram", 0) >= 2 * HIT, tokens
    assert tokens.get("recompute", 0) >= PROMPT_TOKENS  # the first, cold request
    assert _samples(text, "kvstrata_requests_total").get("dram", 0) >= 2
    assert _samples(text, "kvstrata_tier_bytes_total").get("dram", 0) > 0
    assert _samples(text, "kvstrata_tier_bytes_total").get("local", 0) > 0  # written through
    assert _samples(text, "kvstrata_tier_latency_seconds_count").get("dram", 0) > 0
    lookups = [
        line
        for line in text.splitlines()
        if line.startswith("kvstrata_tier_ops_total{")
        and 'op="lookup"' in line
        and 'tier="dram"' in line
        and 'result="hit"' in line
    ]
    assert lookups and 'model_name="smollm2"' in lookups[0], (
        lookups
    )  # vLLM's labels on kvstrata's families


def test_kv_events_name_kvstratas_tier_as_medium(server, tokenizer) -> None:
    """BlockStored events for the prompt's blocks, one
    per chunk and tier, with vLLM's block hashes."""
    import msgspec
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    ids = text_tokens(tokenizer, PROMPT_TOKENS, offset=13000)
    sub = server.events
    while sub.poll(0):  # what earlier tests caused
        sub.recv_multipart()
    server.complete(ids, max_tokens=2)
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    blocks: dict[str, list] = {}
    seen: list = []  # every event received (for the failure message)
    block_size = 128  # vLLM's CPU build; checked against the events below
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and min(len(blocks.get(t, ())) for t in ("dram", "local")) < HIT // 128
    ):
        if not sub.poll(1000):
            server.complete(ids[:8], max_tokens=1)  # an engine step carries the worker's report
            continue
        _, _, payload = sub.recv_multipart()
        for event in decoder.decode(payload).events:
            seen.append(
                (
                    type(event).__name__,
                    getattr(event, "medium", None),
                    list(event.token_ids[:3]) if isinstance(event, BlockStored) else None,
                )
            )
            if isinstance(event, BlockStored) and _is_slice(event.token_ids, ids, block_size):
                blocks.setdefault(event.medium, []).extend(event.block_hashes)
                assert event.block_size == block_size
                assert len(event.token_ids) == block_size * len(event.block_hashes)
    assert {t: len(b) for t, b in blocks.items()} == {
        "dram": HIT // block_size,
        "local": HIT // block_size,
    }, (ids[:3], seen[:20], server.tail(2000))
    assert (
        set(blocks["dram"]) == set(blocks["local"])
        and len(set(blocks["dram"])) == HIT // block_size
    )


def _is_slice(part: list[int], whole: list[int], step: int) -> bool:
    """``part`` is ``whole[i:i + len(part)]`` for a block boundary ``i``."""
    n = len(part)
    return any(whole[i : i + n] == part for i in range(0, len(whole) - n + 1, step))


def _puts(server, tier: str) -> float:
    text = server.metrics()
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kvstrata_tier_ops_total"
        and s.labels.get("tier") == tier
        and s.labels.get("op") == "put"
        and s.labels.get("result") == "ok"
    )


def test_a_restarted_server_is_served_from_disk(server, tokenizer) -> None:
    """DRAM is gone after a restart; the chunks written through to the local directory are not."""
    ids = text_tokens(tokenizer, PROMPT_TOKENS, offset=9000)
    before = _puts(server, "local")
    cold = server.complete(ids)
    deadline = time.monotonic() + 60
    while _puts(server, "local") < before + HIT // 256 and time.monotonic() < deadline:
        server.complete(ids[:8], max_tokens=1)  # an engine step carries the worker's latest stats
        time.sleep(0.5)
    assert _puts(server, "local") >= before + HIT // 256
    server.stop()
    server.start()
    warm = server.complete(ids)
    assert _kvstrata(warm)["loaded_tokens"] == {"local": HIT}
    assert warm["choices"][0]["token_ids"] == cold["choices"][0]["token_ids"]
