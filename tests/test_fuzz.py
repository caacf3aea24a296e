"""Fuzzing the object format, codec headers and the tiers with corrupted and forged objects.

Example counts: ``KVSTRATA_FUZZ_EXAMPLES`` (default 10,000) for the format and codec-header
properties, a fiftieth of that per tier for the real-server tiers; ``KVSTRATA_FUZZ_LONG=1``
multiplies both by 20. What each property proves is in docs/reliability.md.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstrata import format as fmt
from kvstrata import runtime as rt
from kvstrata.auth import Keyring
from kvstrata.compression.base import (
    CodecError,
    codec_from_config,
    codec_from_header,
    codec_kinds,
    header_params,
)
from kvstrata.tiers.base import Miss, create_tier
from tests.conftest import NAMESPACE, make_keys, s3_settings
from tests.test_codecs import random_checkpoint

EXAMPLES = int(os.environ.get("KVSTRATA_FUZZ_EXAMPLES", "10000")) * (
    20 if os.environ.get("KVSTRATA_FUZZ_LONG") == "1" else 1
)
TIER_EXAMPLES = max(50, EXAMPLES // 50)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

OURS = Keyring(b"the fuzzing deployment's secret key")
THEIRS = Keyring(b"an attacker's guess at the secret")
KEY, OTHER = make_keys(2, seed=11)
N_LAYERS = 4


def _object(key, seed: int, keyring: Keyring = OURS) -> tuple[bytes, list[bytes]]:
    rng = np.random.default_rng(seed)
    sections = [rng.bytes(int(n)) for n in rng.integers(1, 96, size=N_LAYERS)]
    meta = fmt.ObjectMeta(
        "int4", "float16", 16, 2, 8, NAMESPACE.fingerprint, key.digest, {"group_size": 32}
    )
    return fmt.encode(meta, sections, keyring), sections


GOOD, SECTIONS = _object(KEY, 0)
HEADER = fmt.decode_header(GOOD, OURS)


# -- what an adversary or an accident can do to stored bytes ------------------------------------


@st.composite
def damaged(draw) -> tuple[str, bytes]:
    """(kind, bytes): GOOD after bit flips, truncation, extension, a section swap, a forged or
    resealed header, another object, or plain random bytes."""
    kind = draw(
        st.sampled_from(
            ["flip", "truncate", "extend", "swap", "forge", "reseal", "foreign", "random", "v1"]
        )
    )
    buf = bytearray(GOOD)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        buf = buf[: draw(st.integers(0, len(buf) - 1))]
    elif kind == "extend":
        buf += draw(st.binary(min_size=1, max_size=64))
    elif kind == "swap":  # two sections exchanged, the table left as it was
        a, b = draw(
            st.sampled_from([(i, j) for i in range(N_LAYERS) for j in range(i + 1, N_LAYERS)])
        )
        body = list(SECTIONS)
        body[a], body[b] = body[b], body[a]
        buf = bytearray(HEADER.raw + b"".join(body))
    elif kind == "forge":  # a well-formed object written without the secret
        return kind, _object(KEY, draw(st.integers(1, 1 << 30)), THEIRS)[0]
    elif (
        kind == "reseal"
    ):  # header bytes edited, then MAC'd by a key holder: parsing is all that is left
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(fmt._PREAMBLE.size, HEADER.header_len - 33))
            buf[pos] = draw(st.integers(0, 255))
        buf = bytearray(fmt.seal_header(buf, OURS))
    elif kind == "foreign":  # a genuine object of another key
        buf = bytearray(_object(OTHER, draw(st.integers(0, 3)))[0])
    elif kind == "v1":
        meta = fmt.ObjectMeta(
            "int4", "float16", 16, 2, 8, NAMESPACE.fingerprint, KEY.digest, {"group_size": 32}
        )
        buf = bytearray(fmt.encode(meta, SECTIONS, version=1))
    else:
        buf = bytearray(
            draw(st.sampled_from([b"", fmt.MAGIC, GOOD[:16]])) + draw(st.binary(max_size=512))
        )
    return kind, bytes(buf)


LAYER_RANGES = st.one_of(
    st.none(),
    st.integers(0, N_LAYERS - 1).flatmap(
        lambda a: st.integers(a + 1, N_LAYERS).map(lambda b: range(a, b))
    ),
)


def _genuine(obj: fmt.ChunkObject, layers: range | None, key=KEY) -> bool:
    """Whether a decoded object is exactly what the key holder wrote for ``key``."""
    expected = SECTIONS if key == KEY else None
    wanted = layers or range(N_LAYERS)
    return (
        expected is not None
        and obj.meta.key == key.digest
        and all(bytes(obj.layers[i]) == expected[i] for i in wanted)
    )


@FUZZ
@given(case=damaged(), layers=LAYER_RANGES)
def test_decoding_never_serves_bytes_the_key_holder_did_not_write(case, layers) -> None:
    """Any damage or forgery: FormatError (nothing else), or exactly the genuine sections."""
    kind, blob = case
    for decode in (
        lambda: fmt.decode(blob, layers, keyring=OURS),
        lambda: fmt.decode(blob, layers, known=HEADER, keyring=OURS),
        lambda: fmt.Verified(blob, OURS).read(layers),
    ):
        try:
            obj = decode()
        except fmt.FormatError as exc:
            if kind in ("forge", "swap", "v1"):
                assert isinstance(exc, fmt.Unauthenticated), (kind, exc)
            continue
        if kind == "foreign":
            assert obj.meta.key == OTHER.digest  # a genuine object; the tier calls it foreign
            continue
        if (
            kind == "reseal"
        ):  # a key holder may write any well-formed header: only parsing is tested
            continue
        # damage outside the layers read leaves them genuine; nothing else may decode
        assert kind in ("flip", "truncate", "extend", "swap") and _genuine(obj, layers), (
            kind,
            layers,
        )


# -- codec headers: random ids and parameters, never a file, never a foreign exception -------------


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("fuzz-ckpt") / "ae.safetensors"
    random_checkpoint(path)
    return {
        "none": codec_from_config("none", "none", {}),
        "int4": codec_from_config("int4", "int4", {}),
        "q8": codec_from_config("q8", "int8", {"group_size": 16}),
        "ae": codec_from_config("ae", "autoencoder", {"checkpoint": str(path)}),
    }


_OPENED: list[str] = []
_PATHS = ("/dev/zero", "/etc/passwd", "/proc/self/mem")


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and str(args[0]) in _PATHS:
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)

_IDS = st.sampled_from(
    ["none", "int4", "int8", "fp8", "q8", "ae", "autoencoder", "linear-ae", "nosuch", ""]
)
_NAMES = st.sampled_from(
    [
        "kind",
        "checkpoint",
        "sha256",
        "group_size",
        "latent_int8",
        "reuse",
        "exact_tokens",
        "path",
        "file",
        "x",
    ]
)
_VALUES = st.one_of(
    st.sampled_from([*_PATHS, *sorted(codec_kinds()), "0" * 64]),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True),
    st.text(max_size=40),
)


@FUZZ
@given(
    codec_id=st.one_of(_IDS, st.text(max_size=16)),
    params=st.dictionaries(_NAMES, _VALUES, max_size=6),
    use_config=st.booleans(),
    genuine=st.booleans(),
)
def test_codec_headers_only_confirm_the_readers_codec(
    configured, codec_id, params, use_config, genuine
) -> None:
    """Random header codec ids and parameters (paths, kinds, wrong types): a CodecError or the
    reader's own configured codec (only for exactly its parameters), at once, no file opened."""
    if genuine and codec_id in configured:
        params = header_params(codec_id, configured[codec_id])
    started = time.thread_time()  # CPU time: wall time also counts the machine's other load
    try:
        codec = codec_from_header(codec_id, params, configured if use_config else None)
    except CodecError:
        pass
    else:
        if use_config and codec_id in configured:
            assert codec is configured[codec_id] and params == header_params(codec_id, codec)
        else:  # built from the header: only a resource-free registry kind
            assert not type(codec).local_params and codec.id == codec_id
    assert time.thread_time() - started < 0.05
    assert _OPENED == []


# -- the same damage in real tiers ---------------------------------------------------------------


def _tier(kind: str, redis_server, s3_server):
    if kind == "memory":
        tier = create_tier("memory")
    elif kind == "redis":
        tier = create_tier(
            "redis", url=redis_server.url, key_prefix=f"fuzz-{uuid.uuid4().hex[:8]}:"
        )
    else:
        tier = create_tier("s3", **s3_settings(s3_server, prefix=f"fuzz-{uuid.uuid4().hex[:8]}/"))
    tier.use_keyring(OURS)
    return tier


@pytest.mark.parametrize("kind", ["memory", "redis", "s3"])
def test_damaged_and_forged_objects_in_tiers_are_misses_never_wrong_kv(kind, request) -> None:
    """Every kind of damage, stored in a real tier and read whole and by layer range: a Miss
    (corrupt, unauthenticated, foreign or unsupported)
    or the genuine sections; never an exception."""
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    s3_server = request.getfixturevalue("s3_server") if kind == "s3" else None
    tier = _tier(kind, redis_server, s3_server)
    seen: set[str] = set()

    @settings(
        max_examples=TIER_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=damaged(), layers=LAYER_RANGES)
    def check(case, layers) -> None:
        kind_of_damage, blob = case
        if not blob:
            return  # a store never holds an empty object (Redis reads it as absent)
        seen.add(kind_of_damage)
        rt.run(tier.put([(KEY, blob)]))
        (got,) = rt.run(tier.get([KEY], layers=layers))
        if isinstance(got, Miss):
            # "unsupported": a flipped version bit reads as a newer writer's object
            assert got.reason in ("corrupt", "unauthenticated", "foreign", "unsupported"), got
        else:
            assert _genuine(got.obj, layers), (kind_of_damage, layers)

    try:
        check()
    finally:
        rt.run(tier.close())
    assert len(seen) >= 5  # the strategy reached most kinds of damage
