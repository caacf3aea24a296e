"""Object format v3: one object per chunk, layer-major, self-describing, authenticated.

::

    preamble  magic "KVSTRATA" | version u16 (3) | flags u16 (0) | header_len u32
    fixed     codec id (16 B, ASCII, NUL-padded) | dtype u8 | reserved u8 |
              n_layers u16 | n_tokens u32 | kv_heads u16 | head_dim u16 |
              namespace (32 B) | chunk key (32 B) | params_len u16
    params    codec parameters: a JSON object of scalars, params_len bytes
    table     n_layers x (offset u64, length u64, tag 16 B)
    body tag  32 B: keyed BLAKE3 of the whole body (v3 only)
    mac       32 B: keyed BLAKE3 of everything above
    body      layer 0 | layer 1 | ... | layer L-1

The tags and the MAC are keyed with the namespace's key, derived from the
deployment's secret (:mod:`kvstrata.auth`): only holders of the secret can
write an object a reader accepts, and they replace v1's xxh3 checksums (a MAC
catches every accident a checksum does). Format v1 -- the same layout with
``(offset, length, xxh3_64 u64)`` entries and an xxh3_64 of the header instead
of the MAC -- is still read, but only by a keyring that allows unauthenticated
reads; otherwise it is :class:`Unauthenticated`. Format v2 -- v3 without the
body tag -- is still read as an authenticated object.

Why a body tag beside the per-layer tags: a whole-object read (the common get)
verifies the body with one keyed hash instead of one per layer. The BLAKE3
binding releases the GIL on every call, and re-taking it costs more than the
hash itself when other threads run (measured: a Redis 1 MiB get with 32 layer
tags at 0.68x of a raw GET, with one body tag at v1's checksum cost; see
docs/storage.md). A ranged read of some layers still verifies their own tags.

All integers are little-endian. Offsets are absolute and the sections are
contiguous and in layer order, so layers [a, b) are the one byte range
``[table[a].offset, table[b-1].offset + table[b-1].length)``: a ranged read
fetches exactly the layers it needs, and verifies them with the header's MAC
and their own tags.

What a section holds is the codec's business (``compression/``); for the
identity codec it is K then V in canonical ``[token][kv_head][head_dim]``
order. The header is untrusted input: no field names a file, a codec kind or
any other local resource that a reader would act on (a reader's configuration
chooses the codec; the header only confirms it).

Decoding trusts nothing: every field and length is checked before use, the
MAC before anything else is parsed. Anything wrong raises :class:`FormatError`
(:class:`Unauthenticated` for a MAC that does not verify or an object without
one, :class:`Unsupported` for a future version), which tiers turn into a miss.
There is no pickle and no code path that evaluates stored data.

Two shortcuts give the same answers for less work: ``decode(buf, known=h)``
skips parsing a header whose exact bytes were verified before (the sections
are still checked), and :class:`Verified` checks immutable ``bytes`` once and
then serves any layer range from them.
"""

from __future__ import annotations

import hmac
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import blake3
import xxhash

from kvstrata import auth
from kvstrata.auth import Keyring

MAGIC = b"KVSTRATA"
VERSION = 3
VERSIONS = (1, 2, 3)
MAX_HEADER_BYTES = 1 << 20
MAX_PARAMS_BYTES = 4096
MAX_LAYERS = 4096
MAX_TOKENS = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_SECTION_BYTES = 1 << 40
# A first read of this many bytes holds the whole header of any realistic
# object (80 layers need ~2 KiB), so a ranged reader usually needs one extra
# round trip at most.
HEADER_PROBE_BYTES = 8192

_PREAMBLE = struct.Struct("<8sHHI")
_FIXED = struct.Struct("<16sBBHIHH32s32sH")
_ENTRY_V1 = struct.Struct("<QQQ")
_CHECKSUM_V1 = struct.Struct("<Q")
_ENTRY = struct.Struct(f"<QQ{auth.SECTION_TAG_BYTES}s")
_MAC_BYTES = auth.HEADER_MAC_BYTES
_BODY_TAG_BYTES = 32
_NAMESPACE_AT = _PREAMBLE.size + 28  # offset of the namespace in the fixed part

DTYPES: Mapping[int, str] = MappingProxyType(
    {
        1: "float32",
        2: "float16",
        3: "bfloat16",
        4: "float8_e4m3fn",
        5: "float8_e5m2",
        6: "int8",
        7: "uint8",
    }
)
_DTYPE_CODES = {name: code for code, name in DTYPES.items()}


class FormatError(ValueError):
    """A stored object is corrupt, truncated, foreign or from a future version."""

    reason = "corrupt"


class Unauthenticated(FormatError):
    """A MAC that does not verify (a forgery, another secret, damage), or an object without one."""

    reason = "unauthenticated"


class Unsupported(FormatError):
    """A format version this reader does not know (a newer writer's): not damaged, not ours."""

    reason = "unsupported"


_xxh3 = xxhash.xxh3_64_intdigest
_blake3 = blake3.blake3
_compare = hmac.compare_digest


def checksum(data: bytes | memoryview) -> int:
    return _xxh3(data)


class Section(NamedTuple):
    """One layer's entry in the table: absolute byte offset, length, and its check: the 16-byte
    keyed tag (v2) or the xxh3_64 of the bytes (v1)."""

    offset: int
    length: int
    checksum: bytes | int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ObjectMeta:
    """What a writer states about a chunk; the reader gets it back verified."""

    codec: str
    dtype: str
    n_tokens: int
    kv_heads: int
    head_dim: int
    namespace: bytes
    key: bytes
    codec_params: Mapping[str, int | float | str | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Header:
    """A verified header. ``raw`` is its exact bytes (``header_len`` of them), as decoded."""

    meta: ObjectMeta
    sections: tuple[Section, ...]
    header_len: int
    raw: bytes = field(default=b"", repr=False, compare=False)
    #: the namespace's section key, that verifies the sections (None: a v1 object)
    section_key: bytes | None = field(default=None, repr=False, compare=False)
    #: the keyed hash of the whole body (v3; None before)
    body_tag: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def version(self) -> int:
        if self.section_key is None:
            return 1
        return 2 if self.body_tag is None else 3

    def body_ok(self, body: bytes | memoryview) -> bool:
        """Whether ``body`` (every section, contiguous) is what the body tag states. v3 only."""
        assert self.body_tag is not None and self.section_key is not None
        return _compare(_blake3(body, key=self.section_key).digest(_BODY_TAG_BYTES), self.body_tag)

    def section_ok(self, layer: int, section: bytes | memoryview) -> bool:
        """Whether ``section`` is layer ``layer``'s bytes as the header's table states them."""
        expected = self.sections[layer].checksum
        if self.section_key is None:
            return _xxh3(section) == expected
        # the hot path of every get: the tag computed inline, compared in constant time
        return _compare(
            _blake3(section, key=self.section_key).digest(auth.SECTION_TAG_BYTES), expected
        )

    @property
    def n_layers(self) -> int:
        return len(self.sections)

    @property
    def object_len(self) -> int:
        return self.sections[-1].end

    def byte_range(self, layers: range) -> tuple[int, int]:
        """The [start, end) byte range holding ``layers`` (step 1, non-empty)."""
        if layers.step != 1 or not layers or layers.start < 0 or layers.stop > self.n_layers:
            raise ValueError(f"layer range {layers} outside 0..{self.n_layers}")
        return self.sections[layers.start].offset, self.sections[layers.stop - 1].end

    def heads(self, buf: bytes | memoryview) -> bool:
        """Whether ``buf`` starts with exactly this header's bytes.

        If it does, decoding ``buf``'s header would give this header again, so a
        reader that has verified it once only needs to verify the sections.
        """
        n = self.header_len
        # bytes() first: comparing a memoryview to bytes goes element by element.
        return len(self.raw) == n and len(buf) >= n and bytes(buf[:n]) == self.raw


@dataclass(frozen=True)
class ChunkObject:
    """A verified header and the verified sections of the layers that were read."""

    header: Header
    layers: Mapping[int, memoryview]

    @property
    def meta(self) -> ObjectMeta:
        return self.header.meta


# -- encoding ---------------------------------------------------------------


def encode(
    meta: ObjectMeta,
    sections: Sequence[bytes | memoryview],
    keyring: Keyring | None = None,
    *,
    version: int = VERSION,
) -> bytes:
    """Serialize one chunk, MAC'd with ``keyring`` (default: :data:`kvstrata.auth.NO_SECRET`).

    ``sections[l]`` is layer l's codec output. ``version=1`` writes the old,
    unauthenticated format (for tests and migrations; readers accept it only
    where their keyring allows unauthenticated reads).
    """
    _check_meta(meta, len(sections))
    if version not in VERSIONS:
        raise ValueError(f"cannot write format version {version}")
    params = _encode_params(meta.codec_params)
    entry, trailer = _table_entry(version)
    header_len = _PREAMBLE.size + _FIXED.size + len(params) + entry.size * len(sections) + trailer
    head = bytearray(_PREAMBLE.pack(MAGIC, version, 0, header_len))
    head += _FIXED.pack(
        meta.codec.encode("ascii"),
        _DTYPE_CODES[meta.dtype],
        0,
        len(sections),
        meta.n_tokens,
        meta.kv_heads,
        meta.head_dim,
        meta.namespace,
        meta.key,
        len(params),
    )
    head += params
    offset = header_len
    keys = None if version == 1 else (keyring or auth.NO_SECRET).keys(meta.namespace)
    body = None if version < 3 else _blake3(key=keys[0])
    for data in sections:
        check = checksum(data) if keys is None else auth.section_tag(keys[0], data)
        head += entry.pack(offset, len(data), check)
        offset += len(data)
        if body is not None:
            body.update(data)
    if body is not None:
        head += body.digest(_BODY_TAG_BYTES)
    head += _CHECKSUM_V1.pack(checksum(head)) if keys is None else auth.header_mac(keys[1], head)
    return b"".join([bytes(head), *sections])


def seal_header(buf: bytearray, keyring: Keyring | None = None) -> bytes:
    """``buf`` with its header's MAC (v2, v3) or checksum (v1) recomputed after an edit.

    For tests and tools of key holders: sealing needs the keyring, as writing does.
    """
    header_len = header_length(buf, Keyring(None, allow_unauthenticated=True))
    version = _PREAMBLE.unpack_from(buf)[1]
    if version == 1:
        _CHECKSUM_V1.pack_into(buf, header_len - 8, checksum(bytes(buf[: header_len - 8])))
    else:
        namespace = bytes(buf[_NAMESPACE_AT : _NAMESPACE_AT + 32])
        header_key = (keyring or auth.NO_SECRET).keys(namespace)[1]
        buf[header_len - _MAC_BYTES : header_len] = auth.header_mac(
            header_key, bytes(buf[: header_len - _MAC_BYTES])
        )
    return bytes(buf)


def _check_meta(meta: ObjectMeta, n_layers: int) -> None:
    problems = []
    if not 1 <= n_layers <= MAX_LAYERS:
        problems.append(f"n_layers={n_layers}")
    if not (meta.codec.isascii() and meta.codec.isprintable() and 0 < len(meta.codec) <= 16):
        problems.append(f"codec={meta.codec!r}")
    if meta.dtype not in _DTYPE_CODES:
        problems.append(f"dtype={meta.dtype!r}")
    if not 1 <= meta.n_tokens <= MAX_TOKENS:
        problems.append(f"n_tokens={meta.n_tokens}")
    if not 1 <= meta.kv_heads <= MAX_HEADS:
        problems.append(f"kv_heads={meta.kv_heads}")
    if not 1 <= meta.head_dim <= MAX_HEAD_DIM:
        problems.append(f"head_dim={meta.head_dim}")
    if len(meta.namespace) != 32 or len(meta.key) != 32:
        problems.append("namespace and key must be 32 bytes")
    if problems:
        raise ValueError("cannot encode object: " + ", ".join(problems))


def _encode_params(params: Mapping[str, object]) -> bytes:
    for name, value in params.items():
        if not isinstance(name, str) or not isinstance(value, (int, float, str, bool)):
            raise ValueError(f"codec parameter {name!r} must be a scalar")
    raw = json.dumps(dict(params), sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > MAX_PARAMS_BYTES:
        raise ValueError("codec parameters too large")
    return raw


# -- decoding ---------------------------------------------------------------


def header_length(prefix: bytes | memoryview, keyring: Keyring | None = None) -> int:
    """How many leading bytes hold the header, from the first 16 bytes.

    A v1 preamble is :class:`Unauthenticated` unless ``keyring`` allows
    unauthenticated reads; a later version is :class:`Unsupported`.
    """
    if len(prefix) < _PREAMBLE.size:
        raise FormatError(f"truncated: {len(prefix)} bytes is shorter than the preamble")
    magic, version, flags, header_len = _PREAMBLE.unpack_from(prefix)
    if magic != MAGIC:
        raise FormatError("not a kvstrata object (bad magic)")
    if version not in VERSIONS:  # a later version may be a newer writer's; an earlier one is damage
        error = Unsupported if version > VERSION else FormatError
        raise error(f"unsupported format version {version} (this reader knows {VERSIONS})")
    if version == 1 and not (keyring or auth.NO_SECRET).allow_unauthenticated:
        raise Unauthenticated(
            "format v1 object: no MAC, and this reader does not allow unauthenticated reads"
        )
    if flags != 0:
        raise FormatError(f"unknown flags {flags:#x}")
    entry, trailer = _table_entry(version)
    minimum = _PREAMBLE.size + _FIXED.size + entry.size + trailer
    if not minimum <= header_len <= MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_len} out of range")
    return header_len


def decode_header(buf: bytes | memoryview, keyring: Keyring | None = None) -> Header:
    """Parse and verify the header at the start of ``buf`` (the body may be absent).

    The MAC (v2, v3) or checksum (v1) is checked before any other field is parsed.
    """
    view = memoryview(buf)
    header_len = header_length(view, keyring)
    if len(view) < header_len:
        raise FormatError(f"truncated header: need {header_len} bytes, have {len(view)}")
    version = _PREAMBLE.unpack_from(view)[1]
    entry, trailer = _table_entry(version)
    key, body_tag = _verify_header(view, header_len, version, keyring)
    (
        codec,
        dtype,
        reserved,
        n_layers,
        n_tokens,
        kv_heads,
        head_dim,
        namespace,
        key_digest,
        params_len,
    ) = _FIXED.unpack_from(view, _PREAMBLE.size)
    if reserved != 0:
        raise FormatError("reserved header byte is not zero")
    expected_len = _PREAMBLE.size + _FIXED.size + params_len + entry.size * n_layers + trailer
    if expected_len != header_len or params_len > MAX_PARAMS_BYTES:
        raise FormatError("header length does not match its layer table")
    start = _PREAMBLE.size + _FIXED.size
    meta = ObjectMeta(
        codec=_decode_codec_id(codec),
        dtype=_decode_dtype(dtype),
        n_tokens=_in_range("n_tokens", n_tokens, MAX_TOKENS),
        kv_heads=_in_range("kv_heads", kv_heads, MAX_HEADS),
        head_dim=_in_range("head_dim", head_dim, MAX_HEAD_DIM),
        namespace=bytes(namespace),
        key=bytes(key_digest),
        codec_params=_decode_params(view[start : start + params_len]),
    )
    _in_range("n_layers", n_layers, MAX_LAYERS)
    table = start + params_len
    sections = tuple(
        map(Section._make, entry.iter_unpack(view[table : table + n_layers * entry.size]))
    )
    _check_table(sections, header_len)
    return Header(meta, sections, header_len, bytes(view[:header_len]), key, body_tag)


def _verify_header(
    view: memoryview, header_len: int, version: int, keyring: Keyring | None
) -> tuple[bytes | None, bytes | None]:
    """Check the header's checksum (v1) or MAC (v2, v3) before anything else is parsed.

    Returns the namespace's section key (None for v1) and the body tag (v3 only).
    """
    if version == 1:
        (stored,) = _CHECKSUM_V1.unpack_from(view, header_len - _CHECKSUM_V1.size)
        if checksum(view[: header_len - _CHECKSUM_V1.size]) != stored:
            raise FormatError("header checksum mismatch")
        return None, None
    key, header_key = (keyring or auth.NO_SECRET).keys(
        bytes(view[_NAMESPACE_AT : _NAMESPACE_AT + 32])
    )
    expected = auth.header_mac(header_key, view[: header_len - _MAC_BYTES])
    if not auth.same(expected, view[header_len - _MAC_BYTES : header_len]):
        raise Unauthenticated(
            "header MAC does not verify (not written with this deployment's secret, or damaged)"
        )
    if version < 3:
        return key, None
    return key, bytes(view[header_len - _MAC_BYTES - _BODY_TAG_BYTES : header_len - _MAC_BYTES])


def _table_entry(version: int) -> tuple[struct.Struct, int]:
    """A version's table entry and the bytes after the table (checksum, tags, MAC)."""
    if version == 1:
        return _ENTRY_V1, _CHECKSUM_V1.size
    return _ENTRY, _MAC_BYTES + (_BODY_TAG_BYTES if version >= 3 else 0)


def read_layers(header: Header, data: bytes | memoryview, start: int, layers: range) -> ChunkObject:
    """Verify and slice ``layers`` out of ``data``, which holds the object's bytes from ``start``.

    ``data`` must cover ``header.byte_range(layers)``; each section's checksum
    is verified. The returned views point into ``data`` (no copy).
    """
    view = memoryview(data)
    lo, hi = header.byte_range(layers)
    if start > lo or start + len(view) < hi:
        raise FormatError(
            f"truncated body: layers {layers.start}..{layers.stop} need bytes {lo}..{hi}, "
            f"have {start}..{start + len(view)}"
        )
    sections = header.sections
    # every layer of a v3 object: one body tag instead of a tag per layer
    covers_body = header.body_tag is not None and len(layers) == header.n_layers
    body_verified = covers_body and header.body_ok(view[lo - start : hi - start])
    out: dict[int, memoryview] = {}
    for layer in layers:
        offset, length, _ = sections[layer]
        offset -= start
        section = view[offset : offset + length]
        # a body that fails: the layer tags name the damaged layer in the error
        if not body_verified and not header.section_ok(layer, section):
            raise _section_error(header, layer)
        out[layer] = section
    if covers_body and not body_verified:
        raise Unauthenticated("body tag does not verify (forged or damaged)")
    return ChunkObject(header, MappingProxyType(out))


def _section_error(header: Header, layer: int) -> FormatError:
    if header.section_key is None:
        return FormatError(f"layer {layer} checksum mismatch")
    return Unauthenticated(f"layer {layer} tag does not verify (forged or damaged)")


def decode(
    buf: bytes | memoryview,
    layers: range | None = None,
    known: Header | None = None,
    keyring: Keyring | None = None,
) -> ChunkObject:
    """Verify a whole object (or a prefix holding ``layers``) and return its sections.

    ``known`` is a header this reader verified before, typically from an earlier
    read of the same key. If ``buf`` starts with exactly its bytes
    (:meth:`Header.heads`) the header is not parsed again -- it would decode to
    the same thing -- and only the sections are verified. Otherwise ``known``
    is ignored. The result is the same either way, and so is any FormatError.
    ``known`` must have been verified with the same ``keyring``.
    """
    header = known if known is not None and known.heads(buf) else decode_header(buf, keyring)
    if layers is None:
        if len(buf) != header.object_len:
            raise FormatError(f"object is {len(buf)} bytes, header says {header.object_len}")
        layers = range(header.n_layers)
    return read_layers(header, buf, 0, layers)


class Verified:
    """A whole object verified once, that then serves any layer range without checksumming.

    For bytes that cannot change afterwards (``bytes``, never a ``bytearray`` or a
    view of one): an in-process store verifies once and reads many times.
    Construction raises :class:`FormatError` if the header is bad; damaged
    sections are remembered, and :meth:`read` gives the same result as
    ``decode(data, layers)`` -- the same sections or the same FormatError --
    with fresh views each time (a caller releasing its views cannot affect
    another caller's).
    """

    __slots__ = ("data", "header", "_damaged")

    def __init__(self, data: bytes, keyring: Keyring | None = None):
        if not isinstance(data, bytes):
            raise TypeError(f"Verified needs immutable bytes, not {type(data).__name__}")
        self.data = data
        self.header = header = decode_header(data, keyring)
        view = memoryview(data)
        whole = header.body_tag is not None and len(data) == header.object_len
        if whole and header.body_ok(view[header.header_len :]):
            self._damaged: tuple[int, ...] = ()
            return
        # Layers present in full whose checksum fails, in layer order. A layer cut
        # off by truncation is not listed: any range holding it fails the coverage
        # check first, as in read_layers.
        self._damaged = tuple(
            layer
            for layer, (offset, length, _) in enumerate(header.sections)
            if offset + length <= len(data)
            and not header.section_ok(layer, view[offset : offset + length])
        )

    def read(self, layers: range | None = None) -> ChunkObject:
        """The sections of ``layers`` (all if None), as ``decode(self.data, layers)`` gives them."""
        header, size = self.header, len(self.data)
        if layers is None:
            if size != header.object_len:
                raise FormatError(f"object is {size} bytes, header says {header.object_len}")
            layers = range(header.n_layers)
        lo, hi = header.byte_range(layers)
        if hi > size:
            raise FormatError(
                f"truncated body: layers {layers.start}..{layers.stop} need bytes {lo}..{hi}, "
                f"have 0..{size}"
            )
        for layer in self._damaged:
            if layer in layers:
                raise _section_error(header, layer)
        view, sections = memoryview(self.data), header.sections
        out = {}
        for layer in layers:
            offset, length, _ = sections[layer]
            out[layer] = view[offset : offset + length]
        return ChunkObject(header, MappingProxyType(out))


def _decode_codec_id(raw: bytes) -> str:
    name = raw.rstrip(b"\0")
    if not name or b"\0" in name:
        raise FormatError("bad codec id")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("codec id is not ASCII") from None
    if not text.isprintable():
        raise FormatError("codec id is not printable")
    return text


def _decode_dtype(code: int) -> str:
    if code not in DTYPES:
        raise FormatError(f"unknown dtype code {code}")
    return DTYPES[code]


def _in_range(name: str, value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise FormatError(f"{name}={value} out of range 1..{maximum}")
    return value


def _decode_params(raw: memoryview) -> Mapping[str, int | float | str | bool]:
    try:
        params = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError("codec parameters are not valid JSON") from None
    if not isinstance(params, dict) or not all(
        isinstance(v, (int, float, str, bool)) for v in params.values()
    ):
        raise FormatError("codec parameters must be a JSON object of scalars")
    return MappingProxyType(params)


def _check_table(sections: tuple[Section, ...], header_len: int) -> None:
    expected = header_len
    for layer, (offset, length, _) in enumerate(sections):
        if offset != expected:
            raise FormatError(f"layer {layer} section is not contiguous")
        if length > MAX_SECTION_BYTES:
            raise FormatError(f"layer {layer} section too large")
        expected = offset + length
