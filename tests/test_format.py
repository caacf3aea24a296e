"""Object format v3: layout, validation, and property-based corruption tests
(MACs: test_auth.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstrata import format as fmt
from tests.conftest import NAMESPACE, make_keys, make_object

KEY = make_keys(1, seed=7)[0]
BLOB, SECTIONS = make_object(KEY, n_layers=4, section_bytes=200, seed=3)


def test_layer_ranges_are_one_contiguous_byte_range() -> None:
    header = fmt.decode_header(BLOB)
    assert header.n_layers == 4 and header.object_len == len(BLOB)
    for a in range(4):
        for b in range(a + 1, 5):
            lo, hi = header.byte_range(range(a, b))
            assert BLOB[lo:hi] == b"".join(SECTIONS[a:b])


def test_read_layers_from_a_ranged_read() -> None:
    header = fmt.decode_header(BLOB[: fmt.HEADER_PROBE_BYTES])
    lo, hi = header.byte_range(range(1, 3))
    obj = fmt.read_layers(header, BLOB[lo:hi], lo, range(1, 3))
    assert [bytes(obj.layers[i]) for i in (1, 2)] == SECTIONS[1:3]
    with pytest.raises(fmt.FormatError, match="truncated body"):
        fmt.read_layers(header, BLOB[lo : hi - 1], lo, range(1, 3))


def test_header_fields_round_trip() -> None:
    meta = fmt.ObjectMeta(
        "int4",
        "bfloat16",
        256,
        8,
        128,
        NAMESPACE.fingerprint,
        KEY.digest,
        {"group": 32, "scheme": "kivi"},
    )
    obj = fmt.decode(fmt.encode(meta, [b"ab", b"", b"cde"]))
    assert obj.meta == fmt.ObjectMeta(
        "int4", "bfloat16", 256, 8, 128, NAMESPACE.fingerprint, KEY.digest, obj.meta.codec_params
    )
    assert dict(obj.meta.codec_params) == {"group": 32, "scheme": "kivi"}
    assert [bytes(obj.layers[i]) for i in range(3)] == [b"ab", b"", b"cde"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(codec=""), "codec"),
        (dict(codec="x" * 17), "codec"),
        (dict(dtype="float64"), "dtype"),
        (dict(n_tokens=0), "n_tokens"),
        (dict(kv_heads=0), "kv_heads"),
        (dict(head_dim=5000), "head_dim"),
        (dict(key=b"short"), "32 bytes"),
        (dict(codec_params={"nested": [1]}), "scalar"),
    ],
)
def test_encode_refuses_bad_metadata(change, message) -> None:
    fields = dict(
        codec="none",
        dtype="float32",
        n_tokens=16,
        kv_heads=2,
        head_dim=8,
        namespace=NAMESPACE.fingerprint,
        key=KEY.digest,
    )
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        fmt.encode(fmt.ObjectMeta(**fields), [b"x"])


def _resign(buf: bytearray) -> bytes:
    """Recompute the header MAC (with the keyring that wrote it), to test validation behind it."""
    return fmt.seal_header(buf)


@pytest.mark.parametrize(
    "offset, value, message",
    [
        (0, b"X", "bad magic"),
        (8, struct.pack("<H", 9), "unsupported format version 9"),
        (10, struct.pack("<H", 1), "unknown flags"),
        (16 + 16, b"\x63", "unknown dtype code 99"),
        (16 + 17, b"\x01", "reserved"),
        (16 + 18, struct.pack("<H", 0), "header length does not match"),
        (16 + 20, struct.pack("<I", 0), "n_tokens=0"),
        (16, b"\xff", "codec id is not ASCII"),
    ],
)
def test_decode_names_what_is_wrong(offset: int, value: bytes, message: str) -> None:
    buf = bytearray(BLOB)
    buf[offset : offset + len(value)] = value
    damaged = _resign(buf) if offset >= 16 else bytes(buf)
    with pytest.raises(fmt.FormatError, match=message):
        fmt.decode(damaged)


def test_sections_must_be_contiguous() -> None:
    buf = bytearray(BLOB)
    header = fmt.decode_header(BLOB)
    table_start = header.header_len - 32 - 32 * header.n_layers
    struct.pack_into("<Q", buf, table_start + 32, header.sections[1].offset + 1)
    with pytest.raises(fmt.FormatError, match="not contiguous"):
        fmt.decode(_resign(buf))


def test_non_json_codec_params_are_rejected() -> None:
    meta = fmt.ObjectMeta("none", "float32", 16, 2, 8, NAMESPACE.fingerprint, KEY.digest, {"a": 1})
    buf = bytearray(fmt.encode(meta, [b"x"]))
    start = buf.index(b'{"a":1}')
    buf[start : start + 7] = b'["a",1]'
    with pytest.raises(fmt.FormatError, match="JSON object"):
        fmt.decode(_resign(buf))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(position=st.integers(min_value=0, max_value=len(BLOB) - 1), flip=st.integers(1, 255))
def test_any_single_byte_corruption_is_detected(position: int, flip: int) -> None:
    buf = bytearray(BLOB)
    buf[position] ^= flip
    with pytest.raises(fmt.FormatError):
        fmt.decode(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(BLOB) - 1))
def test_any_truncation_is_detected(cut: int) -> None:
    with pytest.raises(fmt.FormatError):
        fmt.decode(BLOB[:cut])


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=4096), prefix=st.booleans())
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes, prefix: bool) -> None:
    blob = (BLOB[:16] + data) if prefix else data
    try:
        obj = fmt.decode(blob)
    except fmt.FormatError:
        return
    # the only way to decode is to be a valid object: then it must verify exactly
    assert fmt.encode(obj.meta, [obj.layers[i] for i in range(obj.header.n_layers)]) == blob


@settings(max_examples=200, deadline=None)
@given(
    sections=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    data=st.data(),
)
def test_random_objects_round_trip_any_layer_range(sections: list[bytes], data) -> None:
    meta = fmt.ObjectMeta("none", "float16", 3, 1, 1, NAMESPACE.fingerprint, KEY.digest)
    blob = fmt.encode(meta, sections)
    a = data.draw(st.integers(0, len(sections) - 1))
    b = data.draw(st.integers(a + 1, len(sections)))
    obj = fmt.decode(blob, range(a, b))
    assert [bytes(obj.layers[i]) for i in range(a, b)] == sections[a:b]


# -- verifying with a known header, and verifying once ------------------------

HEADER = fmt.decode_header(BLOB)
RANGES = [None] + [range(a, b) for a in range(4) for b in range(a + 1, 5)]


def _outcome(read) -> tuple[str, object]:
    """What a decode gives, comparable across paths: the sections, or the error message."""
    try:
        obj = read()
    except fmt.FormatError as exc:
        return "error", str(exc)
    return "ok", (obj.header, {i: bytes(v) for i, v in obj.layers.items()})


def test_header_carries_its_exact_bytes_and_heads_only_them() -> None:
    assert HEADER.raw == BLOB[: HEADER.header_len]
    assert HEADER.heads(BLOB) and HEADER.heads(memoryview(BLOB)[: HEADER.header_len])
    assert not HEADER.heads(BLOB[: HEADER.header_len - 1])
    other, _ = make_object(KEY, n_layers=4, section_bytes=200, seed=4)
    assert not HEADER.heads(other)  # same key and shape, other checksums


def test_a_known_header_for_another_object_is_ignored() -> None:
    other, sections = make_object(make_keys(1, seed=9)[0], n_layers=3, section_bytes=50, seed=5)
    obj = fmt.decode(other, known=HEADER)
    assert obj.header != HEADER and [bytes(obj.layers[i]) for i in range(3)] == sections


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(BLOB) - 1),
    flip=st.integers(1, 255),
    cut=st.integers(min_value=0, max_value=len(BLOB)),
    which=st.sampled_from(RANGES),
)
def test_known_header_and_verify_once_agree_with_a_plain_decode(position, flip, cut, which) -> None:
    """Skipping the header parse (``known``) or checksumming once (``Verified``) changes nothing:
    any corruption or truncation gives the same error, any intact range the same sections."""
    buf = bytearray(BLOB)
    buf[position] ^= flip
    damaged = bytes(buf[:cut])
    expected = _outcome(lambda: fmt.decode(damaged, which))
    assert _outcome(lambda: fmt.decode(damaged, which, known=HEADER)) == expected
    try:
        verified = fmt.Verified(damaged)
    except fmt.FormatError as exc:
        assert expected == ("error", str(exc))
    else:
        assert _outcome(lambda: verified.read(which)) == expected
    assert _outcome(lambda: fmt.decode(BLOB, which, known=HEADER)) == _outcome(
        lambda: fmt.decode(BLOB, which)
    )


def test_verified_hands_out_fresh_read_only_views() -> None:
    verified = fmt.Verified(BLOB)
    first, second = verified.read(), verified.read(range(1, 3))
    first.layers[1].release()  # one caller releasing its view ...
    assert bytes(second.layers[1]) == SECTIONS[1]  # ... leaves another's alone
    assert second.layers[2].readonly
    with pytest.raises(TypeError):
        fmt.Verified(bytearray(BLOB))  # type: ignore[arg-type]
