"""A store is untrusted input: headers never choose a codec or name a file, and one bad object
is a miss for that object only (docs/reliability.md says what each test here proves)."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvstrata import format as fmt
from kvstrata import runtime as rt
from kvstrata.compression.base import CodecError, codec_from_config, codec_from_header, codec_kinds
from kvstrata.config import parse_config
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from kvstrata.tiers.base import Hit, ReadRequest
from tests.conftest import make_keys, make_object

# -- no header field opens a file -------------------------------------------------------------

_OPENED: list[str] = []
_WATCH: set[str] = set()
_WATCH_LOCK = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    # every open() and os.open() of the process raises the "open" audit event; record only
    # the paths a test planted, so other threads' files cannot make a test fail
    if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        path = str(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace"))
        if path in _WATCH:
            with _WATCH_LOCK:
                _OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def planted(tmp_path: Path):
    """Paths a header might name: /dev/zero (blocks a reader forever) and a readable file."""
    readable = tmp_path / "planted.safetensors"
    readable.write_bytes(b"\0" * 4096)
    paths = ("/dev/zero", str(readable))
    _WATCH.update(paths)
    _OPENED.clear()
    yield paths
    _WATCH.difference_update(paths)


def _headers_naming(kind: str, path: str) -> list[tuple[str, dict]]:
    """(codec id, params) pairs of a header that tries to make a reader open ``path``."""
    return [
        ("none", {"kind": kind, "checkpoint": path}),
        (kind, {"checkpoint": path}),
        (kind, {"checkpoint": path, "sha256": "0" * 64}),
        ("myname", {"kind": kind, "checkpoint": path, "sha256": "0" * 64}),
    ]


@pytest.mark.parametrize("kind", sorted(codec_kinds()))
def test_a_header_naming_a_file_is_refused_without_opening_it(kind: str, planted) -> None:
    """The issue's ``codec_from_header('none', {'kind': 'linear-ae', 'checkpoint': '/dev/zero'})``
    and its variants, for every codec kind, with and without a configured reader: a CodecError
    in < 10 ms, and no planted path opened."""
    configured = {
        "none": codec_from_config("none", "none", {}),
        "int4": codec_from_config("int4", "int4", {}),
    }
    for path in planted:
        for codec_id, params in _headers_naming(kind, path):
            for reader in (None, configured):
                assert _refusal_seconds(codec_id, params, reader) < 0.010, (kind, codec_id, params)
    assert _OPENED == []


def _refusal_seconds(codec_id: str, params: dict, reader) -> float:
    """Wall time of a refusal (CodecError), the best of 5: a stall of this shared machine is
    not the code's time, a blocking read would be there in every try."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        with pytest.raises(CodecError):
            codec_from_header(codec_id, params, reader)
        best = min(best, time.perf_counter() - started)
    return best


def test_the_issues_dev_zero_header_returns_at_once(planted) -> None:
    done = threading.Event()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            codec_from_header("none", {"kind": "linear-ae", "checkpoint": "/dev/zero"})
        except CodecError as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=call, daemon=True).start()  # a hang must not hang the test run
    assert done.wait(5), "codec_from_header blocked on a path from a header"
    assert len(outcome) == 1 and _OPENED == []
    assert _refusal_seconds("none", {"kind": "linear-ae", "checkpoint": "/dev/zero"}, None) < 0.010


# -- the orchestrator: the reader's configuration decodes, the header confirms ------------------

CHUNK = 32
MODEL = ModelSpec("tiny-untrusted-model", n_layers=4, kv_heads=2, head_dim=16, dtype="float32")


def kv_for(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    return rng.standard_normal(
        (MODEL.n_layers, 2, CHUNK, MODEL.kv_heads, MODEL.head_dim), dtype=np.float32
    )


def _config(s3, tier: str, retrieval: str = "whole") -> str:
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          dram: {{kind: memory, capacity_bytes: 64MiB, timeout_ms: 15000}}
          cold:
            kind: s3
            endpoint: {s3.endpoint}
            bucket: {s3.bucket}
            prefix: untrusted-{time.time_ns()}/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
            timeout_s: 15
            max_retries: 0
            timeout_ms: 15000
        engine: {{prefill_tokens_per_s: 1.0}}
        orchestrator:
          save_queue_chunks: 64
          breaker: {{failures: 1, cooldown_s: 60}}
          default_budget_ms: 60000
        policy:
          default: {{read: [{tier}], write: [{tier}], retrieval: {retrieval}, load: always}}
        """)


@pytest.fixture
def orch_with(s3_server):
    made: list[Orchestrator] = []

    def build(tier: str, retrieval: str = "whole") -> Orchestrator:
        orch = Orchestrator(parse_config(_config(s3_server, tier, retrieval)), MODEL)
        made.append(orch)
        return orch

    yield build
    for orch in made:
        orch.close()


def _save(orch: Orchestrator, n_chunks: int):
    tokens = np.random.default_rng(n_chunks).integers(0, 30000, size=n_chunks * CHUNK + 5)
    plan = orch.lookup(tokens, RequestContext())
    for i in range(n_chunks):
        assert orch.save(plan, i, kv_for(i))
    assert orch.flush(30)
    return tokens, plan


def _forge_codec_header(orch: Orchestrator, key, path: str) -> bytes:
    """An object a key holder could write: well-formed, MAC'd, whose header names a file."""
    meta = fmt.ObjectMeta(
        "none",
        MODEL.dtype,
        CHUNK,
        MODEL.kv_heads,
        MODEL.head_dim,
        MODEL.namespace("").fingerprint,
        key.digest,
        {"kind": "linear-ae", "checkpoint": path},
    )
    sections = [kv_for(0)[layer].tobytes() for layer in range(MODEL.n_layers)]
    return fmt.encode(meta, sections, orch.keyring)


def test_orchestrator_misses_a_header_naming_a_file_without_opening_it(orch_with, planted) -> None:
    orch = orch_with("dram")
    tokens, plan = _save(orch, 2)
    key = plan.keys["none"][1]
    rt.run(orch.tiers["dram"].put([(key, _forge_codec_header(orch, key, "/dev/zero"))]))
    plan = orch.lookup(tokens, RequestContext())
    started = time.perf_counter()
    handle = orch.load(plan)
    assert handle.wait_all(10)
    assert handle.failed == {1}  # chunk 0 still served
    assert time.perf_counter() - started < 1.0
    np.testing.assert_array_equal(handle.wait_layer(0)[0], kv_for(0)[0])
    assert orch.telemetry.value("kvstrata_bad_objects_total", tier="dram", reason="codec") == 1
    assert _OPENED == []
    time.sleep(0.3)
    assert rt.run(orch.tiers["dram"].contains([key])) == [False]  # dropped: a save can replace it


# -- one bad object in a batch is a miss for that object only ------------------------------------

N_BATCH = 16
N_LAYERS = 4


async def _truncate_behind_the_tiers_back(tier, key, data: bytes) -> None:
    """Another writer replaces the object: the reader's header cache still holds the old header."""
    if tier.kind == "s3":
        await tier._transport.write(tier._path(key), data)
    else:
        await tier._client.set(tier._name(key), data)


@pytest.mark.parametrize("kind", ["s3-obstore", "s3-aioboto3", "redis"])
async def test_one_truncated_object_in_a_batch_of_16_loses_exactly_that_object(
    make_tier, kind: str
) -> None:
    tier = make_tier(kind)
    keys = make_keys(N_BATCH)
    objects = {k: make_object(k, N_LAYERS, section_bytes=2000, seed=i) for i, k in enumerate(keys)}
    await tier.put([(k, blob) for k, (blob, _) in objects.items()])
    late = range(2, N_LAYERS)
    assert all(isinstance(f, Hit) for f in await tier.get(keys, layers=late))  # headers cached
    victim = keys[5]
    header = fmt.decode_header(objects[victim][0])
    cut = header.sections[1].end  # layers 0-1 intact, the range of layers 2-3 starts past the end
    await _truncate_behind_the_tiers_back(tier, victim, objects[victim][0][:cut])
    for fresh in (False, True):  # with the stale cached header, then parsing the header afresh
        if fresh:
            tier._forget(victim)
        fetched = await tier.get(keys, layers=late)
        assert [k for k, f in zip(keys, fetched, strict=True) if not isinstance(f, Hit)] == [victim]
        assert fetched[5].reason == "corrupt" and "truncated" in fetched[5].detail
        for k, f in zip(keys, fetched, strict=True):
            if k != victim:
                assert [bytes(f.obj.layers[i]) for i in late] == objects[k][1][2:]
    # layers still present are still served; a whole get is the same single miss
    assert isinstance((await tier.get([victim], layers=range(0, 2)))[0], Hit)
    whole = await tier.get(keys)
    assert [k for k, f in zip(keys, whole, strict=True) if not isinstance(f, Hit)] == [victim]


def test_a_truncated_s3_object_costs_one_chunk_not_the_batch_or_the_breaker(orch_with) -> None:
    """Real S3, through the orchestrator: 16 chunks read layer-wise, one truncated by another
    writer after its header was cached. Exactly that chunk is recomputed, it is counted and
    deleted, and the tier's breaker (opens after 1 failure here) counts nothing."""
    orch = orch_with("cold", "layerwise")
    tokens, plan = _save(orch, N_BATCH)
    first = orch.load(orch.lookup(tokens, RequestContext()), layers_per_read=2)
    assert first.wait_all(30) and not first.failed  # headers of every chunk now cached
    tier = orch.tiers["cold"]
    victim = plan.keys["none"][7]
    (blob,) = rt.run(tier._read([ReadRequest(victim)]))
    cut = fmt.decode_header(blob, orch.keyring).sections[1].end
    rt.run(tier._transport.write(tier._path(victim), bytes(blob[:cut])))
    handle = orch.load(orch.lookup(tokens, RequestContext()), layers_per_read=2)
    assert handle.wait_all(30)
    assert handle.failed == {7}
    for c in range(N_BATCH):
        if c != 7:
            np.testing.assert_array_equal(handle.chunk_kv(c), kv_for(c))
    assert orch.telemetry.value("kvstrata_bad_objects_total", tier="cold", reason="corrupt") == 1
    assert (
        orch.telemetry.value("kvstrata_tier_ops_total", tier="cold", op="get", result="error") == 0
    )
    assert not orch.breakers["cold"].is_open
    time.sleep(0.5)
    assert rt.run(tier.contains([victim])) == [False]  # deleted: the next save rewrites it
