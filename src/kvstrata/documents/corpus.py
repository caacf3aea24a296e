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
also records the model fingerprint and the rotary embedding. Every read and
write goes through the orchestrator (:mod:`kvstrata.orchestrator.whole`), on
the process's background loop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kvstrata import format as fmt
from kvstrata.keys import ChunkKey, Namespace, token_bytes
from kvstrata.model import ModelSpec
from kvstrata.orchestrator.objects import Expected
from kvstrata.orchestrator.whole import WholeObjects

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
    """One corpus of one model in some tiers: reads try ``tiers`` in order, writes go to the first.

    All I/O goes through the orchestrator's whole-object store
    (:class:`~kvstrata.orchestrator.whole.WholeObjects`: the call wrapper's
    breaker, timeout and metrics, its keyring and codecs); ``tiers`` are tier
    names. Coroutines run on the background loop (:mod:`kvstrata.runtime`).
    """

    def __init__(
        self,
        name: str,
        model: ModelSpec,
        store: WholeObjects,
        tiers: Sequence[str],
        rope: dict[str, Any],
    ):
        if not tiers:
            raise ValueError("a corpus needs at least one tier")
        self.name, self.model, self.store, self.tiers, self.rope = (
            name,
            model,
            store,
            list(tiers),
            rope,
        )
        base = model.namespace()
        self.namespace = Namespace(base.model, base.kv_dtype, "none", f"corpus:{name}")
        fp = self.namespace.fingerprint
        m = model
        self._doc = Expected("none", fp, m.dtype, m.kv_heads, m.head_dim, m.n_layers)
        self._manifest = Expected(_MANIFEST_CODEC, fp, "uint8", 1, 1, 1, 1)

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
        (got,) = await self.store.fetch(self.tiers, [self.manifest_key], self._manifest)
        if got is None:
            return self.empty_manifest()
        manifest = Manifest.from_json(bytes(got.layers[0]))
        if (manifest.model, manifest.dtype) != (self.namespace.model, self.model.dtype):
            raise ValueError(f"manifest of corpus {self.name!r} is for {manifest.model}")
        return manifest

    async def save_manifest(self, manifest: Manifest) -> None:
        fp, key = self.namespace.fingerprint, self.manifest_key
        meta = fmt.ObjectMeta(_MANIFEST_CODEC, "uint8", 1, 1, 1, fp, key.digest)
        await self.store.store(self.tiers[0], key, meta, [manifest.to_json()])

    # -- document KV --------------------------------------------------------------

    async def put(self, key: ChunkKey, kv: np.ndarray) -> None:
        """Store one document's KV ``[n_layers, 2, T, H, D]`` (model dtype) under ``key``."""
        await self.store.store_kv(self.tiers[0], key, self.namespace.fingerprint, kv)

    async def contains(self, key: ChunkKey) -> bool:
        return await self.store.holds(self.tiers, key)

    async def get(self, keys: Sequence[ChunkKey]) -> list[fmt.ChunkObject | None]:
        """Whole objects that fit this corpus, each from the first tier holding it; None where
        no tier does."""
        return await self.store.fetch(self.tiers, keys, self._doc)

    def layer(self, obj: fmt.ChunkObject, layer: int) -> np.ndarray:
        """One layer of a document object as a read-only ``[2, T, H, D]`` array."""
        return self.store.layer(obj, layer)


def corpus_tiers(config) -> list[str]:
    """The tiers ``documents:`` names (read order), else the first tier whose kind is a
    ``corpus_home`` (s3), else every tier with the ones that outlive a process (not
    ``process_local``: memory) first, since the first is written."""
    names = list(config.documents.tiers)
    unknown = [n for n in names if n not in config.tiers]
    if unknown:
        raise ValueError(
            f"documents.tiers names unknown tiers {unknown}; defined: {list(config.tiers)}"
        )
    if names:
        return names
    kinds = {n: spec.tier_class for n, spec in config.tiers.items()}
    homes = [n for n, kind in kinds.items() if kind.corpus_home]
    return homes[:1] or sorted(kinds, key=lambda n: kinds[n].process_local)
