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


# -- per-kind facts: class attributes, read through tier_class / TierSpec.tier_class --------

#: kind -> (latency_ms, bandwidth_mbps, timeout_ms, hit source, shared, process_local,
#: corpus_home, supports_ttl): what the tables these attributes replaced said
FACTS = {
    "memory": (0.02, 20000, 1000, "HOST", False, True, False, False),
    "lmcache": (0.05, 5000, 1000, "EXTERNAL_UNSPECIFIED", False, False, False, False),
    "disk": (0.3, 1500, 2000, "DISK", False, False, False, False),
    "redis": (0.5, 800, 2000, "EXTERNAL_UNSPECIFIED", True, False, False, True),
    "s3": (15, 250, 5000, "EXTERNAL_UNSPECIFIED", True, False, True, False),
}


@pytest.mark.parametrize("kind", sorted(FACTS))
def test_each_kind_declares_its_facts(kind: str) -> None:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    cls = tier_class(kind)
    facts = (
        cls.prior_latency_ms,
        cls.prior_bandwidth_mbps,
        cls.default_timeout_ms,
        cls.hit_source,
        cls.shared,
        cls.process_local,
        cls.corpus_home,
        cls.supports_ttl,
    )
    assert facts == FACTS[kind]
    assert CacheHitSource[cls.hit_source]  # the connector looks the name up in vLLM's enum


def test_the_configuration_reads_facts_from_the_kind_class() -> None:
    from kvstrata.config import parse_config

    cfg = parse_config(
        "version: 1\ntiers:\n"
        "  dram: {kind: memory}\n"
        "  cold: {kind: s3, cost: {latency_ms: 30}}\n"
        "  shared: {kind: redis, timeout_ms: 250}\n"
    )
    assert cfg.tiers["dram"].tier_class is tier_class("memory")
    assert (cfg.tiers["dram"].cost.latency_ms, cfg.tiers["dram"].timeout_ms) == (0.02, 1000)
    assert (cfg.tiers["cold"].cost.latency_ms, cfg.tiers["cold"].cost.bandwidth_mbps) == (30, 250)
    assert cfg.tiers["shared"].timeout_ms == 250
    assert cfg.tiers["shared"].cost.bandwidth_mbps == 800
