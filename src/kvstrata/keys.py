"""Chunk keys: token ids -> fixed-size chunks, each named by a chained stable hash.

Key of chunk i = H(key of chunk i-1 || token ids of chunk i), and the chain is
seeded by the namespace fingerprint = H(model, kv dtype, codec, tenant salt).
So equal keys mean "same model, same dtype, same codec, same tenant, same
tokens from position 0 up to the end of this chunk" -- a prefix, not a bag of
tokens.

H is SHA-256 from the standard library: stable across processes, hosts and
Python versions (never ``hash()``; no PYTHONHASHSEED needed). Token ids are
hashed as little-endian uint32, so the key does not depend on how the caller
holds them (list, numpy, torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_BYTES = 32
DEFAULT_CHUNK_TOKENS = 128  # vLLM CPU build's block size: a hit covers every full block


@dataclass(frozen=True, order=True)
class ChunkKey:
    """The 32-byte name of one chunk of KV. ``str(key)`` is its hex form."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(self.digest)}")

    def __str__(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> ChunkKey:
        return cls(bytes.fromhex(text))


@dataclass(frozen=True)
class Namespace:
    """What must match for two engines to share KV.

    ``model`` is a fingerprint of the model and its KV geometry (name or
    weights hash, layers, kv heads, head dim); ``tenant`` is the request's
    cache salt ("" for none). Two namespaces that differ in any field share
    no key.
    """

    model: str
    kv_dtype: str
    codec: str = "none"
    tenant: str = ""

    @property
    def fingerprint(self) -> bytes:
        h = hashlib.sha256(b"kvstrata-namespace-v1")
        for part in (self.model, self.kv_dtype, self.codec, self.tenant):
            raw = part.encode()
            # length-prefixed, so ("ab", "c") and ("a", "bc") differ
            h.update(len(raw).to_bytes(4, "little"))
            h.update(raw)
        return h.digest()

    def with_tenant(self, tenant: str) -> Namespace:
        return Namespace(self.model, self.kv_dtype, self.codec, tenant)


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes, whatever container holds them."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("token ids must be one-dimensional")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**32):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4", copy=False).tobytes()


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    namespace: Namespace,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[ChunkKey]:
    """Keys of every *full* chunk of ``tokens``, in order.

    A trailing partial chunk has no key: it is never cached, because the
    engine only shares whole blocks and a partial chunk's KV would change as
    the sequence grows.
    """
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    raw = token_bytes(tokens)
    step = chunk_tokens * 4
    keys: list[ChunkKey] = []
    prev = namespace.fingerprint
    for start in range(0, len(raw) - step + 1, step):
        prev = hashlib.sha256(prev + raw[start : start + step]).digest()
        keys.append(ChunkKey(prev))
    return keys
