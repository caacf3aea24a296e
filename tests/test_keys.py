"""Chunk keys: stable across processes, prefix-chained, namespace-separated."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvstrata.keys import ChunkKey, Namespace, chunk_keys

NS = Namespace("smollm2-135m", "float32")
TOKENS = list(range(1000, 1000 + 3 * 256 + 100))


def test_only_full_chunks_get_keys() -> None:
    assert len(chunk_keys(TOKENS, NS)) == 3
    assert chunk_keys(TOKENS[:255], NS) == []
    assert len(chunk_keys(TOKENS, NS, chunk_tokens=128)) == 6


def test_keys_chain_the_prefix() -> None:
    keys = chunk_keys(TOKENS, NS)
    assert chunk_keys(TOKENS[:512], NS) == keys[:2]
    changed = list(TOKENS)
    changed[300] += 1  # a change in chunk 1 changes chunk 1 and everything after it
    other = chunk_keys(changed, NS)
    assert other[0] == keys[0] and other[1] != keys[1] and other[2] != keys[2]
    # the same chunk of tokens after a different prefix has a different key
    assert chunk_keys(TOKENS[256:512], NS)[0] != keys[1]


@pytest.mark.parametrize(
    "other",
    [
        Namespace("smollm2-360m", "float32"),
        Namespace("smollm2-135m", "bfloat16"),
        Namespace("smollm2-135m", "float32", codec="int4"),
        Namespace("smollm2-135m", "float32", tenant="tenant-b"),
    ],
)
def test_any_namespace_difference_means_no_shared_key(other: Namespace) -> None:
    assert set(chunk_keys(TOKENS, NS)).isdisjoint(chunk_keys(TOKENS, other))


def test_fields_do_not_run_together() -> None:
    assert Namespace("ab", "c").fingerprint != Namespace("a", "bc").fingerprint


def test_container_type_does_not_matter() -> None:
    expected = chunk_keys(TOKENS, NS)
    assert chunk_keys(np.array(TOKENS, dtype=np.int64), NS) == expected
    assert chunk_keys(np.array(TOKENS, dtype=np.int32), NS) == expected
    assert chunk_keys(tuple(TOKENS), NS) == expected


def test_bad_tokens_are_refused() -> None:
    with pytest.raises(ValueError):
        chunk_keys([-1] * 256, NS)
    with pytest.raises(ValueError):
        chunk_keys(TOKENS, NS, chunk_tokens=0)


def test_same_keys_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from kvstrata.keys import Namespace, chunk_keys;"
        "ns = Namespace('smollm2-135m','float32');"
        f"print(','.join(str(k) for k in chunk_keys({TOKENS!r}, ns)))"
    )
    outputs = set()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout.strip())
    assert outputs == {",".join(str(k) for k in chunk_keys(TOKENS, NS))}


def test_key_hex_round_trip() -> None:
    key = chunk_keys(TOKENS, NS)[0]
    assert ChunkKey.from_hex(str(key)) == key and len(str(key)) == 64
    with pytest.raises(ValueError):
        ChunkKey(b"short")
