"""Where KV objects live: memory (DRAM), disk, Redis
and S3, behind one small interface (base.py)."""

from kvstrata.tiers.base import (
    Evicted,
    Hit,
    Miss,
    PutResult,
    Tier,
    TierError,
    create_tier,
    register,
)

__all__ = ["Evicted", "Hit", "Miss", "PutResult", "Tier", "TierError", "create_tier", "register"]
