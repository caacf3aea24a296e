"""Learned codecs' checkpoint files: safetensors, float32 tensors, pinned by sha256, no pickle.

* :func:`write` -- bytes that depend only on the contents (sorted header), so a
  deterministic training run gives the same sha256;
* :func:`read` -- tensors and metadata of a file, checked against an expected sha256;
* :func:`check_format` -- the metadata names this kind of checkpoint and a known version;
* :func:`load_cached` -- a checkpoint object by path and hash: the file is hashed
  on every call (a replaced file is never trusted), parsed once per content.

Every failure is a :class:`~kvstrata.compression.base.CodecError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from kvstrata.compression.base import CodecError

T = TypeVar("T")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> bytes:
    """A safetensors file (float32 tensors) with its header in sorted order, so the bytes -- and the
    checkpoint's sha256 -- depend only on the contents (the safetensors library's own writer orders
    metadata by a hash map)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes; ValueError if the header is not sane."""
    (n,) = struct.unpack_from("<Q", raw)
    if n > len(raw) - 8 or n > 100_000_000:
        raise ValueError("bad header length")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return {str(k): str(v) for k, v in meta.items()}


def write(path: str | Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, object]) -> str:
    """Write atomically (temp file + rename); returns the file's sha256."""
    raw = encode(tensors, {k: str(v) for k, v in meta.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
    return hashlib.sha256(raw).hexdigest()


def read(
    path: str | Path, sha256: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(tensors, metadata, sha256) of a checkpoint file, refused if its sha256 is not ``sha256``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CodecError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    _check(path, digest, sha256)
    try:
        return st_load(raw), metadata(raw), digest
    except (SafetensorError, ValueError, struct.error) as exc:
        raise CodecError(f"checkpoint {path} is not a safetensors file: {exc}") from None


_CACHE: dict[tuple[object, str, str], object] = {}
_CACHE_LOCK = threading.Lock()


def load_cached(path: str, sha256: str | None, parse: Callable[[str, str], T]) -> T:
    """``parse(path, digest)`` once per (parser, path,
    content); the file is hashed on every call."""
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise CodecError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    _check(path, digest, sha256)
    with _CACHE_LOCK:
        found = _CACHE.get((parse, path, digest))
    if found is None:
        found = parse(path, digest)
        with _CACHE_LOCK:
            _CACHE[(parse, path, digest)] = found
    return found  # type: ignore[return-value]


def check_format(meta: Mapping[str, str], fmt: str, version: int, name: str) -> None:
    """Refuse a checkpoint of another kind (``format``)
    or of a version this reader does not know."""
    if meta.get("format") != fmt:
        raise CodecError(f"not a kvstrata {name} checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != str(version):
        raise CodecError(
            f"{name} checkpoint version {meta.get('version')} (this reader knows {version})"
        )


def _check(path, digest: str, sha256: str | None) -> None:
    if sha256 is not None and digest != sha256:
        raise CodecError(
            f"checkpoint {path} has sha256 {digest[:16]}..., the object needs {sha256[:16]}..."
        )
