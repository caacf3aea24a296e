"""The S3 tier's settings (``tiers: {x: {kind: s3, ...}}``; ``KVSTRATA_S3_*`` beats the file)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from kvstrata.tiers.base import TierSettings


class S3Settings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_S3_", frozen=True, extra="forbid")

    endpoint: str | None = Field(default=None, description="None means AWS's own endpoint")
    bucket: str = "kvstrata"
    prefix: str = "kv/"
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    addressing: Literal["path", "virtual"] = "path"
    transport: Literal["obstore", "aioboto3", "nixl"] = "obstore"
    timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_retries: int = Field(default=2, ge=0, le=100)
    max_concurrency: int = Field(
        default=32, gt=0, le=100_000, description="requests in flight per tier"
    )
