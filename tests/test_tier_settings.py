"""Tier settings: typed, frozen, KVSTRATA_* environment variables override files, secrets hidden."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvstrata.tiers.base import create_tier, tier_class
from kvstrata.tiers.s3.tier import S3Settings


def test_environment_overrides_file_values(monkeypatch) -> None:
    monkeypatch.setenv("KVSTRATA_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("KVSTRATA_S3_SECRET_ACCESS_KEY", "env-secret")
    s = S3Settings(endpoint="http://from-file:1", bucket="b", secret_access_key="file-secret")
    assert s.endpoint == "http://127.0.0.1:9"
    assert s.secret_access_key.get_secret_value() == "env-secret"
    assert s.bucket == "b"


def test_secrets_never_print() -> None:
    s = S3Settings(access_key_id="AKIA-visible", secret_access_key="hush-hush")
    assert "hush-hush" not in repr(s) and "hush-hush" not in str(s.model_dump())


def test_settings_are_frozen_and_strict() -> None:
    s = S3Settings()
    with pytest.raises(ValidationError):
        s.bucket = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="bukket"):
        S3Settings(bukket="typo")
    with pytest.raises(ValidationError, match="transport"):
        S3Settings(transport="ftp")


def test_memory_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("KVSTRATA_MEMORY_CAPACITY_BYTES", "12345")
    tier = create_tier("memory")
    assert tier.capacity_bytes == 12345


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: .*'disk'.*'memory'.*'redis'.*'s3'"):
        tier_class("tape")
