"""kvstrata: a unified multi-tier KV cache for LLM serving."""

from kvstrata.format import ChunkObject, FormatError, ObjectMeta
from kvstrata.keys import ChunkKey, Namespace, chunk_keys
from kvstrata.tiers.base import Hit, Miss, Tier, TierError, create_tier

__version__ = "0.1.0"

__all__ = [
    "ChunkKey",
    "ChunkObject",
    "FormatError",
    "Hit",
    "Miss",
    "Namespace",
    "ObjectMeta",
    "Tier",
    "TierError",
    "chunk_keys",
    "create_tier",
]
