"""Authenticated objects: only holders of the secret
write what readers accept (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time

import numpy as np
import pytest

from kvstrata import auth
from kvstrata import format as fmt
from kvstrata import runtime as rt
from kvstrata.auth import Keyring, keyring_from_env
from kvstrata.config import parse_config
from kvstrata.keys import Namespace
from kvstrata.model import ModelSpec
from kvstrata.orchestrator import Orchestrator
from kvstrata.policy.route import RequestContext
from kvstrata.tiers.base import Hit, Miss
from kvstrata.tiers.memory import MemoryTier
from tests.conftest import NAMESPACE, make_keys

SECRET = "a deployment secret, 32+ bytes long"
OURS = Keyring(SECRET.encode())


def _meta(key, namespace: bytes = NAMESPACE.fingerprint) -> fmt.ObjectMeta:
    return fmt.ObjectMeta("none", "float32", 16, 2, 8, namespace, key.digest)


# -- the format ------------------------------------------------------------------------------


def test_objects_verify_only_under_the_key_that_wrote_them() -> None:
    (key,) = make_keys(1, seed=1)
    sections = [b"layer0" * 10, b"layer1" * 10]
    blob = fmt.encode(_meta(key), sections, OURS)
    assert [bytes(fmt.decode(blob, keyring=OURS).layers[i]) for i in (0, 1)] == sections
    for other in (auth.NO_SECRET, Keyring(b"another secret, also long enough")):
        with pytest.raises(fmt.Unauthenticated, match="header MAC"):
            fmt.decode(blob, keyring=other)
        with pytest.raises(fmt.Unauthenticated):
            fmt.decode_header(blob[: fmt.HEADER_PROBE_BYTES], other)


def test_keys_are_derived_per_namespace_and_never_shown() -> None:
    a, b = (
        Namespace("m", "float16", "none", "tenant-a"),
        Namespace("m", "float16", "none", "tenant-b"),
    )
    assert set(OURS.keys(a.fingerprint)).isdisjoint(OURS.keys(b.fingerprint))
    assert set(OURS.keys(a.fingerprint)).isdisjoint(auth.NO_SECRET.keys(a.fingerprint))
    assert SECRET not in repr(OURS) and "authenticated=True" in repr(OURS)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Keyring(b"short")
    # an object of tenant a, relabelled as tenant b and resealed by someone with a's key only
    (key,) = make_keys(1, seed=2)
    buf = bytearray(fmt.encode(_meta(key, a.fingerprint), [b"kv" * 50], OURS))
    at = buf.index(a.fingerprint)
    buf[at : at + 32] = b.fingerprint
    header_len = fmt.header_length(buf)
    buf[header_len - 32 : header_len] = auth.header_mac(
        OURS.keys(a.fingerprint)[1], bytes(buf[: header_len - 32])
    )
    with pytest.raises(fmt.Unauthenticated):
        fmt.decode(bytes(buf), keyring=OURS)


def test_v1_objects_are_read_only_where_unauthenticated_reads_are_allowed() -> None:
    (key,) = make_keys(1, seed=3)
    v1 = fmt.encode(_meta(key), [b"abc", b"defg"], version=1)
    assert fmt.decode_header(v1, Keyring(None, allow_unauthenticated=True)).version == 1
    assert bytes(fmt.decode(v1, keyring=Keyring(SECRET.encode(), True)).layers[1]) == b"defg"
    for keyring in (OURS, auth.NO_SECRET):
        with pytest.raises(fmt.Unauthenticated, match="v1"):
            fmt.decode(v1, keyring=keyring)
    damaged = bytearray(v1)
    damaged[-1] ^= 1
    with pytest.raises(fmt.FormatError, match="checksum"):  # v1 is still integrity-checked
        fmt.decode(bytes(damaged), keyring=Keyring(None, allow_unauthenticated=True))


def _forgeries(
    key, good: bytes, sections: list[bytes], rng: np.random.Generator
) -> list[tuple[str, bytes]]:
    """Well-formed objects an attacker without the secret can write under ``key``."""
    header = fmt.decode_header(good, OURS)
    planted = [rng.bytes(len(s)) for s in sections]
    out = [
        ("no secret", fmt.encode(_meta(key), planted)),
        ("guessed secret", fmt.encode(_meta(key), planted, Keyring(rng.bytes(32)))),
        ("v1 object", fmt.encode(_meta(key), planted, version=1)),
    ]
    # the genuine header with other section bytes (every section's tag must then fail)
    out.append(("genuine header, planted body", header.raw + b"".join(planted)))
    # genuine sections reordered under the genuine header
    out.append(("sections swapped", header.raw + b"".join(reversed(sections))))
    # the genuine header with its tags replaced by the planted sections' tags under a guessed key
    buf = bytearray(good)
    guess = Keyring(rng.bytes(32)).keys(NAMESPACE.fingerprint)[0]
    table = header.header_len - 32 - 32 * len(sections)
    for i, section in enumerate(planted):
        buf[table + 32 * i + 16 : table + 32 * i + 32] = auth.section_tag(guess, section)
        lo, hi = header.sections[i].offset, header.sections[i].end
        buf[lo:hi] = section
    out.append(("retagged", bytes(buf)))
    return out


@pytest.mark.parametrize("kind", ["memory", "redis", "s3-obstore"])
async def test_a_forged_well_formed_object_is_never_served(make_tier, kind: str) -> None:
    """126 tries (the issue's count), each a well-formed object planted without the secret,
    whole and layer-range gets: none is served, each is an 'unauthenticated' miss."""
    tier = make_tier(kind)
    tier.use_keyring(OURS)
    rng = np.random.default_rng(126)
    tries = 0
    keys = make_keys(21, seed=4)
    for key in keys:
        sections = [rng.bytes(int(n)) for n in rng.integers(100, 400, size=4)]
        good = fmt.encode(_meta(key), sections, OURS)
        for name, forged in _forgeries(key, good, sections, rng):
            await tier.put([(key, forged)])
            for layers in (None, range(1, 3)):
                (got,) = await tier.get([key], layers=layers)
                assert isinstance(got, Miss) and got.reason == "unauthenticated", (name, got)
            tries += 1
    assert tries == 126
    # and a genuine object under the same keys is served
    await tier.put([(keys[0], fmt.encode(_meta(keys[0]), [b"x" * 10] * 4, OURS))])
    assert isinstance((await tier.get([keys[0]]))[0], Hit)


async def test_the_memory_tier_verifies_an_object_once_off_the_get_path(monkeypatch) -> None:
    tier = MemoryTier("verify-once")
    tier.use_keyring(OURS)
    (key,) = make_keys(1, seed=5)
    blob = fmt.encode(_meta(key), [b"s" * 4096] * 8, OURS)
    calls = []
    real = fmt._blake3  # what verifies the body tag and a section's tag
    here = threading.current_thread()

    def counted(*a, **k):
        # this tier's verifying thread, or this test's own gets; not another test's tier whose
        # verifying thread is still at work
        me = threading.current_thread()
        if me is here or "verify-once" in me.name:
            calls.append(me.name)
        return real(*a, **k)

    monkeypatch.setattr(fmt, "_blake3", counted)
    await tier.put([(key, blob)])
    for _ in range(500):  # the tier's own thread verifies it soon after the put
        if calls:
            break
        await asyncio.sleep(0.01)
    assert len(calls) == 1 and "verify-once" in calls[0]  # one keyed hash of its body
    assert isinstance((await tier.get([key]))[0], Hit)
    for layers in (None, range(2, 5), range(0, 8)):
        assert isinstance((await tier.get([key], layers=layers))[0], Hit)
    assert len(calls) == 1  # verified once, served many times
    tier.use_keyring(auth.NO_SECRET)  # a verdict is not carried over to another keyring
    assert (await tier.get([key]))[0].reason == "unauthenticated"


# -- configuration and the orchestrator ----------------------------------------------------------

CHUNK = 32
MODEL = ModelSpec("tiny-auth-model", n_layers=2, kv_heads=2, head_dim=16, dtype="float32")


def _config(redis_url: str, extra: str = "") -> str:
    return (
        textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          shared: {{kind: redis, url: "{redis_url}", key_prefix: "auth-{time.time_ns()}:",
                    timeout_ms: 15000}}
        engine: {{prefill_tokens_per_s: 1.0}}
        orchestrator: {{default_budget_ms: 60000}}
        policy:
          default: {{read: [shared], write: [shared], load: always}}
        """)
        + extra
    )


def test_the_secret_comes_from_the_environment_and_is_never_logged(
    redis_server, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("MY_KV_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    config = parse_config(_config(redis_server.url, "auth: {secret_env: MY_KV_SECRET}\n"))
    assert config.auth.secret_env == "MY_KV_SECRET" and not config.auth.allow_unauthenticated_reads
    orch = Orchestrator(config, MODEL)
    try:
        assert orch.keyring.authenticated and orch.tiers["shared"].keyring is orch.keyring
        assert SECRET not in repr(config) and SECRET not in repr(orch.keyring)
        assert SECRET not in caplog.text
    finally:
        orch.close()
    with pytest.raises(ValueError, match="MY_KV_SECRET"):
        keyring_from_env("MY_KV_SECRET", environ={"MY_KV_SECRET": "too short"})


def test_no_secret_means_integrity_only_with_a_warning_for_shared_tiers(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvstrata.auth")
    keyring = keyring_from_env("KVSTRATA_TEST_UNSET", shared_tiers=("shared",), environ={})
    assert not keyring.authenticated and "integrity-checked only" in caplog.text
    caplog.clear()
    keyring_from_env("KVSTRATA_TEST_UNSET", environ={})
    assert caplog.text == ""  # nothing shared: nothing to warn about


def test_an_attackers_object_in_a_shared_tier_is_recomputed_not_served(
    redis_server, monkeypatch
) -> None:
    """The orchestrator's view: an attacker with write access to Redis but no secret replaces a
    chunk with well-formed KV of its choosing; the reader recomputes it and drops the object."""
    monkeypatch.setenv("KVSTRATA_SECRET", SECRET)
    orch = Orchestrator(parse_config(_config(redis_server.url)), MODEL)
    try:
        tokens = np.random.default_rng(0).integers(0, 30000, size=2 * CHUNK + 3)
        plan = orch.lookup(tokens, RequestContext())
        genuine = [np.full((MODEL.n_layers, 2, CHUNK, 2, 16), i, np.float32) for i in range(2)]
        for i in range(2):
            assert orch.save(plan, i, genuine[i])
        assert orch.flush(30)
        key = plan.keys["none"][1]
        planted = np.full_like(genuine[1], 666.0)
        meta = fmt.ObjectMeta(
            "none", "float32", CHUNK, 2, 16, MODEL.namespace("").fingerprint, key.digest
        )
        forged = fmt.encode(
            meta, [planted[layer].tobytes() for layer in range(MODEL.n_layers)]
        )  # no secret
        rt.run(orch.tiers["shared"].put([(key, forged)]))
        handle = orch.load(orch.lookup(tokens, RequestContext()))
        assert handle.wait_all(30)
        assert handle.failed == {1} and handle.chunk_kv(1) is None
        np.testing.assert_array_equal(handle.chunk_kv(0), genuine[0])
        assert (
            orch.telemetry.value(
                "kvstrata_bad_objects_total", tier="shared", reason="unauthenticated"
            )
            == 1
        )
        time.sleep(0.3)
        assert rt.run(orch.tiers["shared"].contains([key])) == [False]
    finally:
        orch.close()
