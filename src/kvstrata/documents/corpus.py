"""A corpus: per-document KV objects and their manifest, in a corpus namespace of some tiers.

What is stored, per document (one object, the kvstrata object format, codec
``none``): its KV as the model computes it *alone*, positions from 0 --
``[n_layers][2, n_tokens, kv_heads, head_dim]``, keys after RoPE (exactly what
the engine's pages hold; :mod:`.rope` moves them). Optionally also a variant
computed after a *context* document (typically the system prompt): the
document's part of ``KV(context + document)``, whose keys sit at positions
``len(context)..`` (the ``context`` repair, docs/documents.md).

Names: the corpus namespace is the model's namespace with the tenant
``corpus:<name>``, so corpus objects never collide with prompt chunks or with
another corpus. A document's key is ``H(namespace, "doc", token ids)`` (plus
``"ctx", H(context token ids)`` for a variant): a changed document is a new
key, an unchanged one is found again.

The manifest (one object in the same tiers, key ``H(namespace, "manifest")``,
JSON in a one-section object) maps document id -> content hash, token hash,
head hash (its first tokens, for detection), token count, key, variants; it
also records the model fingerprint and the rotary embedding. Tiers are used
directly (their public API), on the process's background loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kvstrata import format as fmt
from kvstrata.keys import ChunkKey, Namespace, token_bytes
from kvstrata.model import ModelSpec
from kvstrata.tiers.base import Hit, Tier

MANIFEST_VERSION = 1
HEAD_TOKENS = 16  # a document is detected in a prompt by its first tokens, then verified in full
_MANIFEST_CODEC = "corpus-manifest"


def tokens_hash(tokens: Sequence[int] | np.ndarray) -> str:
    return hashlib.sha256(b"kvstrata-doc-tokens" + token_bytes(tokens)).hexdigest()


def head_hash(tokens: Sequence[int] | np.ndarray) -> str:
    return tokens_hash(list(tokens)[:HEAD_TOKENS])


@dataclass(frozen=True)
class DocEntry:
    id: str
    content_hash: str  # of the source text: decides "unchanged"
    tokens_hash: str  # of its token ids: what a prompt is verified against
    head_hash: str
    n_tokens: int
    key: str  # hex ChunkKey of its KV computed alone
    contexts: dict[str, str] = field(
        default_factory=dict
    )  # context tokens_hash -> key of the variant


@dataclass
class Manifest:
    corpus: str
    model: str
    dtype: str
    rope: dict[str, Any]
    documents: dict[str, DocEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {
            "version": MANIFEST_VERSION,
            "corpus": self.corpus,
            "model": self.model,
            "dtype": self.dtype,
            "rope": self.rope,
            "documents": {i: asdict(e) for i, e in sorted(self.documents.items())},
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        doc = json.loads(raw)
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {doc.get('version')} is not {MANIFEST_VERSION}")
        entries = {i: DocEntry(**e) for i, e in doc["documents"].items()}
        return cls(doc["corpus"], doc["model"], doc["dtype"], doc["rope"], entries)

    def by_head(self) -> dict[str, list[DocEntry]]:
        out: dict[str, list[DocEntry]] = {}
        for e in self.documents.values():
            out.setdefault(e.head_hash, []).append(e)
        return out


class Corpus:
    """One corpus of one model over some tiers: reads
    try ``tiers`` in order, writes go to the first.

    Coroutines run on the background loop (:mod:`kvstrata.runtime`); the
    tiers' own contract applies (they may be shared with an orchestrator).
    """

    def __init__(self, name: str, model: ModelSpec, tiers: Sequence[Tier], rope: dict[str, Any]):
        if not tiers:
            raise ValueError("a corpus needs at least one tier")
        self.name, self.model, self.tiers, self.rope = name, model, list(tiers), rope
        base = model.namespace()
        self.namespace = Namespace(base.model, base.kv_dtype, "none", f"corpus:{name}")

    def _key(self, *parts: bytes) -> ChunkKey:
        h = hashlib.sha256(self.namespace.fingerprint)
        for part in parts:
            h.update(len(part).to_bytes(4, "little") + part)
        return ChunkKey(h.digest())

    def doc_key(self, tokens_hash_hex: str, context_hash: str = "") -> ChunkKey:
        parts = [b"doc", bytes.fromhex(tokens_hash_hex)]
        if context_hash:
            parts += [b"ctx", bytes.fromhex(context_hash)]
        return self._key(*parts)

    @property
    def manifest_key(self) -> ChunkKey:
        return self._key(b"manifest")

    def empty_manifest(self) -> Manifest:
        return Manifest(self.name, self.namespace.model, self.model.dtype, self.rope)

    # -- manifest -----------------------------------------------------------------

    async def load_manifest(self) -> Manifest:
        """The stored manifest (from the first tier holding one), or an empty one."""
        for tier in self.tiers:
            (got,) = await tier.get([self.manifest_key])
            if isinstance(got, Hit):
                manifest = Manifest.from_json(bytes(got.obj.layers[0]))
                if (manifest.model, manifest.dtype) != (self.namespace.model, self.model.dtype):
                    raise ValueError(f"manifest of corpus {self.name!r} is for {manifest.model}")
                return manifest
        return self.empty_manifest()

    async def save_manifest(self, manifest: Manifest) -> None:
        raw = manifest.to_json()
        meta = fmt.ObjectMeta(
            _MANIFEST_CODEC, "uint8", 1, 1, 1, self.namespace.fingerprint, self.manifest_key.digest
        )
        await self.tiers[0].put(
            [(self.manifest_key, fmt.encode(meta, [raw], self.tiers[0].keyring))]
        )

    # -- document KV --------------------------------------------------------------

    async def put(self, key: ChunkKey, kv: np.ndarray) -> None:
        """Store one document's KV ``[n_layers, 2, T, H, D]`` (model dtype) under ``key``."""
        m = self.model
        if kv.shape[0] != m.n_layers or kv.shape[3:] != (m.kv_heads, m.head_dim):
            raise ValueError(f"document KV shaped {kv.shape} does not fit {m}")
        kv = np.ascontiguousarray(kv, dtype=m.dtype)
        meta = fmt.ObjectMeta(
            "none",
            m.dtype,
            kv.shape[2],
            m.kv_heads,
            m.head_dim,
            self.namespace.fingerprint,
            key.digest,
        )
        blob = await asyncio.to_thread(
            fmt.encode,
            meta,
            [kv[layer].tobytes() for layer in range(m.n_layers)],
            self.tiers[0].keyring,
        )
        await self.tiers[0].put([(key, blob)])

    async def contains(self, key: ChunkKey) -> bool:
        for tier in self.tiers:
            if (await tier.contains([key]))[0]:
                return True
        return False

    async def get(self, keys: Sequence[ChunkKey]) -> list[fmt.ChunkObject | None]:
        """Whole verified objects, each from the first tier holding it; None where no tier does."""
        out: list[fmt.ChunkObject | None] = [None] * len(keys)
        for tier in self.tiers:
            todo = [i for i, o in enumerate(out) if o is None]
            if not todo:
                break
            got = await tier.get([keys[i] for i in todo])
            for i, result in zip(todo, got, strict=True):
                if isinstance(result, Hit) and self._fits(result.obj):
                    out[i] = result.obj
        return out

    def _fits(self, obj: fmt.ChunkObject) -> bool:
        m, meta = self.model, obj.meta
        return (
            meta.codec,
            meta.dtype,
            meta.kv_heads,
            meta.head_dim,
            obj.header.n_layers,
            meta.namespace,
        ) == ("none", m.dtype, m.kv_heads, m.head_dim, m.n_layers, self.namespace.fingerprint)

    def layer(self, obj: fmt.ChunkObject, layer: int) -> np.ndarray:
        """One layer of a document object as a read-only ``[2, T, H, D]`` array."""
        m = self.model
        return np.frombuffer(obj.layers[layer], dtype=m.dtype).reshape(
            2, obj.meta.n_tokens, m.kv_heads, m.head_dim
        )


def corpus_tiers(config, tiers: dict[str, Tier]) -> list[Tier]:
    """The tiers ``documents:`` names (read order), else the first tier whose kind is a
    ``corpus_home`` (s3), else every tier with the ones that outlive a process (not
    ``process_local``: memory) first, since the first is written."""
    names = list(config.documents.tiers)
    unknown = [n for n in names if n not in tiers]
    if unknown:
        raise ValueError(f"documents.tiers names unknown tiers {unknown}; defined: {list(tiers)}")
    if not names:
        kinds = {n: spec.tier_class for n, spec in config.tiers.items() if n in tiers}
        homes = [n for n, kind in kinds.items() if kind.corpus_home]
        names = homes[:1] or sorted(kinds, key=lambda n: kinds[n].process_local)
    return [tiers[n] for n in names]
