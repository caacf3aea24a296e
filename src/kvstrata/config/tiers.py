"""Pass 2 for ``tiers:``: each entry built into a :class:`TierSpec`.

``kind``, ``cost`` and ``timeout_ms`` are the configuration's (defaults from the
kind's class: ``prior_latency_ms``, ``prior_bandwidth_mbps``,
``default_timeout_ms``); every other key belongs to the kind's settings class,
which also reads ``KVSTRATA_<KIND>_<FIELD>`` environment variables (they beat
the file). Values of secret fields never reach a message.
"""

from __future__ import annotations

import os
import typing
from typing import Any

from pydantic import Field, SecretStr, ValidationError

from kvstrata.config.errors import Report, shown
from kvstrata.config.schema import MAX_TIMEOUT_MS, CostPrior, Frozen, TierSpec
from kvstrata.policy.engine import FieldPath
from kvstrata.sizes import parse_bytes
from kvstrata.tiers.base import BUILTIN_KINDS, TierSettings, tier_class


def raw_tiers(data: dict) -> dict[str, dict]:
    """The tier entries that are worth validating (the section's shape is reported by FileSpec)."""
    tiers = data.get("tiers")
    if not isinstance(tiers, dict):
        return {}
    return {k: v for k, v in tiers.items() if isinstance(k, str) and isinstance(v, dict)}


_TIER_KEYS = ["kind", "cost", "timeout_ms"]


def build_tier(name: str, raw: dict, report: Report) -> TierSpec | None:
    """One tier entry: ``kind``, ``cost`` and ``timeout_ms`` are ours, the rest its settings
    class's."""
    at: FieldPath = ("tiers", name)
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if not isinstance(kind, str):
        report.add(
            (*at, "kind"),
            "required key missing"
            if kind is None
            else f"input should be a valid string (got {shown(kind)})",
        )
        return None
    try:
        settings_class = tier_class(kind).settings_class
    except ValueError:
        report.add(
            (*at, "kind"),
            f"unknown tier kind {shown(kind)} (known: {', '.join(sorted(BUILTIN_KINDS))})",
        )
        return None
    except ImportError as exc:
        report.add((*at, "kind"), f"tier kind {shown(kind)} cannot be loaded: {exc}")
        return None
    cost = _cost(kind, raw.pop("cost", {}), (*at, "cost"), report)
    timeout = _timeout(kind, raw.pop("timeout_ms", None), (*at, "timeout_ms"), report)
    settings = _settings(settings_class, raw, at, report)
    if cost is None or timeout is None or settings is None:
        return None
    return TierSpec(name=name, kind=kind, settings=settings, cost=cost, timeout_ms=timeout)


def _cost(kind: str, raw: Any, at: FieldPath, report: Report) -> CostPrior | None:
    cls = tier_class(kind)
    prior = CostPrior(latency_ms=cls.prior_latency_ms, bandwidth_mbps=cls.prior_bandwidth_mbps)
    if not isinstance(raw, dict):
        report.add(
            at,
            f"must be a mapping like {{latency_ms: 0.5, bandwidth_mbps: 800}} (got {shown(raw)})",
        )
        return None
    try:
        return CostPrior.model_validate({**prior.model_dump(), **raw})
    except ValidationError as exc:
        report.pydantic(exc, at, lambda loc: list(CostPrior.model_fields))
        return None


class _Timeout(Frozen):
    timeout_ms: float = Field(gt=0, le=MAX_TIMEOUT_MS)


def _timeout(kind: str, raw: Any, at: FieldPath, report: Report) -> float | None:
    if raw is None:
        return float(tier_class(kind).default_timeout_ms)
    try:
        return _Timeout(timeout_ms=raw).timeout_ms
    except ValidationError as exc:
        report.pydantic(exc, at[:-1], lambda loc: [])
        return None


def _settings(
    cls: type[TierSettings], raw: dict, at: FieldPath, report: Report
) -> TierSettings | None:
    """``cls(**raw)`` with sizes parsed; errors reported per field, secrets never shown."""
    secrets = {n for n, f in cls.model_fields.items() if _is_secret(f.annotation)}
    report.secrets |= {
        str(v)
        for k, v in raw.items()
        if k in secrets and isinstance(v, str | int | float) and len(str(v)) >= 3
    }
    ok = True
    for key, value in list(raw.items()):
        if not isinstance(key, str):
            report.add((*at, key), "invalid key: must be a string")
            ok = False
        elif key.endswith("_bytes") and isinstance(value, str):
            try:
                raw[key] = parse_bytes(value)
            except ValueError as exc:
                report.add((*at, key), str(exc))
                ok = False
    if not ok:
        return None
    try:
        return cls(**raw)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        report.pydantic(
            exc,
            at,
            lambda loc: [*_TIER_KEYS, *cls.model_fields],
            secret=lambda loc: bool(loc) and loc[0] in secrets,
            env=lambda loc: _from_env(prefix, loc),
        )
        return None


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def _from_env(prefix: str, loc: FieldPath) -> str:
    if not prefix or not loc:
        return ""
    name = f"{prefix}{loc[0]}".upper()
    return f" (from environment variable {name})" if name in os.environ else ""
