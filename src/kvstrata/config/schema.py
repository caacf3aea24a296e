"""The configuration's frozen, typed models: what a loaded file *is* (:class:`StrataConfig`
and its sections) and, at the end, the shape a file must have (:class:`FileSpec`,
validated in pass 2; the policy section's shape is in :mod:`kvstrata.policy.engine`).

Every number is finite and bounded (docs/policies.md, "Limits").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from kvstrata.compression.base import builtin_codecs
from kvstrata.policy.engine import Policy, PolicySpec
from kvstrata.sizes import parse_bytes
from kvstrata.tiers.base import Tier, TierSettings, tier_class


class Frozen(BaseModel):
    # no .inf / .nan anywhere: every bound below is finite
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class CostPrior(Frozen):
    """What the cost model assumes about a tier until it has measured it."""

    latency_ms: float = Field(gt=0, le=600_000)  # 10 min
    bandwidth_mbps: float = Field(gt=0, le=10_000_000)  # 10 TB/s


#: One hour: the longest tier timeout or request budget a file may set.
MAX_TIMEOUT_MS = 3_600_000


class TierSpec(Frozen):
    """A named tier: its kind, validated settings, cost prior and per-operation timeout."""

    name: str
    kind: str
    settings: TierSettings
    cost: CostPrior
    timeout_ms: float = Field(gt=0, le=MAX_TIMEOUT_MS)

    @property
    def tier_class(self) -> type[Tier]:
        """The class of this tier's kind: where its per-kind facts are (``shared``,
        ``hit_source``, ...; see docs/extending.md)."""
        return tier_class(self.kind)


class EngineConfig(Frozen):
    prefill_tokens_per_s: float = Field(
        150.0, gt=0, le=1e8, description="prior for recompute cost; learned later"
    )


class BreakerConfig(Frozen):
    failures: int = Field(3, ge=1, le=1_000_000)
    cooldown_s: float = Field(10.0, gt=0, le=86_400)


class OrchestratorConfig(Frozen):
    save_queue_chunks: int = Field(256, ge=1, le=1 << 20)
    breaker: BreakerConfig = BreakerConfig()
    default_budget_ms: float = Field(2000.0, gt=0, le=MAX_TIMEOUT_MS)


class ReuseConfig(Frozen):
    half_life_s: float = Field(600.0, gt=0, le=30 * 86_400)
    sketch_width: int = Field(65536, ge=1, le=1 << 24)  # <= 64 MiB per row (float32)
    sketch_depth: int = Field(4, ge=1, le=8)


class TelemetryConfig(Frozen):
    """Where metrics go besides the in-process registry (see docs/telemetry.md)."""

    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="None: no exporter; 0: any free port"
    )
    prometheus_addr: str = "127.0.0.1"
    snapshot_path: str | None = Field(
        None, description="JSON snapshot file; {role} and {pid} are replaced"
    )


class BandwidthConfig(Frozen):
    """``bandwidth:``: budgets of tiers' read paths and how concurrent loads share them."""

    policy: Literal["equal", "stall_aware", "deadline"] = "deadline"
    sharing: Literal["work_conserving", "fixed"] = Field(
        "work_conserving",
        description=(
            "work_conserving: the split is redone at every event and unused bandwidth goes to "
            "others; fixed: a rate per request, set when a request starts (a per-request rate "
            "limit)"
        ),
    )
    links: dict[str, Annotated[float | Literal["auto"], BeforeValidator(lambda v: _rate(v))]] = {}
    read_window: int = Field(2, ge=1, le=64, description="layer groups in flight per load")
    group_tolerance: float = Field(
        0.005,
        ge=0,
        le=1,
        description=(
            "layer-wise loads read layers in as few GETs as keep the estimated TTFT within this "
            "fraction of the best grouping's"
        ),
    )


class CodecSpec(Frozen):
    """A named codec: its registry kind and the parameters its objects record (normalized by
    the codec)."""

    name: str
    kind: str
    params: Mapping[str, int | float | str | bool]


class DocumentsConfig(Frozen):
    """``documents:`` -- per-document precomputed KV, stitched into prompts (docs/documents.md)."""

    corpus: str = Field("default", min_length=1, max_length=64, description="corpus namespace")
    tiers: tuple[str, ...] = Field(
        (),
        description="read order; `kvstrata corpus add` writes the first. "
        "Empty: the first s3 tier, else every tier, memory last",
    )
    repair: Literal["none", "context", "tail"] = "none"
    detect: bool = Field(
        False,
        description="stitch prompts that start with registered documents "
        "even when the request does not name them",
    )


class AuthConfig(Frozen):
    """``auth:`` -- object MACs (docs/storage.md, "Authenticated objects"; :mod:`kvstrata.auth`).

    The secret itself is never in the file: it is read from the environment
    variable ``secret_env`` when the orchestrator starts. No secret there means
    the well-known key (integrity only, a warning when a shared tier is configured).
    """

    secret_env: str = Field(
        "KVSTRATA_SECRET",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the deployment's object secret",
    )
    allow_unauthenticated_reads: bool = Field(
        False, description="also serve format v1 objects (no MAC)"
    )


class StrataConfig(Frozen):
    """A whole, validated configuration. ``path`` is the file it came from (None: a string)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    path: Path | None = None
    version: int = 1
    chunk_tokens: int
    tiers: Mapping[str, TierSpec]
    engine: EngineConfig = EngineConfig()
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    reuse: ReuseConfig = ReuseConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    bandwidth: BandwidthConfig = BandwidthConfig()
    policy: Policy
    codecs: Mapping[str, CodecSpec] = MappingProxyType({})
    documents: DocumentsConfig = DocumentsConfig()
    auth: AuthConfig = AuthConfig()

    @field_validator("tiers", "codecs", mode="after")
    @classmethod
    def _freeze_tiers(cls, tiers: Mapping[str, Any]) -> Mapping[str, Any]:
        return MappingProxyType(dict(tiers))

    def codec(self, name: str) -> CodecSpec:
        """The codec a route names (``codecs:`` or a built-in); KeyError if there is none."""
        if name in self.codecs:
            return self.codecs[name]
        if name in builtin_codecs():
            return CodecSpec(name=name, kind=name, params={})
        raise KeyError(name)


# -- the file's shape (pass 2) --------------------------------------------------------


def _tier_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError("invalid tier name: use letters, digits, '_', '.' and '-'")
    return name


class FileSpec(Frozen):
    version: int
    chunk_tokens: int = Field(256, gt=0, le=1 << 16)
    tiers: dict[Annotated[str, AfterValidator(_tier_name)], dict[str, Any]]
    engine: EngineConfig = EngineConfig()
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    reuse: ReuseConfig = ReuseConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    bandwidth: BandwidthConfig = BandwidthConfig()
    policy: PolicySpec = PolicySpec()
    codecs: dict[str, dict[str, Any]] = {}
    documents: DocumentsConfig = DocumentsConfig()
    auth: AuthConfig = AuthConfig()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `engine:` with nothing under it means "all defaults", as an operator would expect;
        # top-level `x-...` keys are free space for YAML anchors (as in docker compose)
        if isinstance(data, dict):
            return {
                k: v
                for k, v in data.items()
                if not (v is None and k in _SECTIONS) and not str(k).startswith("x-")
            }
        return data

    @field_validator("version")
    @classmethod
    def _version(cls, version: int) -> int:
        if version != 1:
            raise ValueError(f"unsupported version {version} (this kvstrata reads version 1)")
        return version

    @field_validator("chunk_tokens")
    @classmethod
    def _chunk(cls, chunk: int) -> int:
        if chunk % 16:
            raise ValueError(f"must be a positive multiple of 16 (got {chunk})")
        return chunk

    @field_validator("tiers")
    @classmethod
    def _some_tiers(cls, tiers: dict) -> dict:
        if not tiers:
            raise ValueError("define at least one tier")
        return tiers


_SECTIONS = (
    "engine",
    "orchestrator",
    "reuse",
    "telemetry",
    "bandwidth",
    "policy",
    "codecs",
    "documents",
    "auth",
)


#: The fastest link a rate may name: 10 TB/s (beyond HBM; anything larger is a typo).
MAX_RATE = 10**13


def _rate(value: Any) -> float | str:
    """A link capacity: bytes/s as a number, ``"1.25GB/s"`` / ``"800 MiB/s"``, or ``"auto"``
    (the tier's read bandwidth as the cost model measures it). Finite, in (0, 10 TB/s]."""
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return text
        if not text.lower().endswith("/s"):
            raise ValueError(
                f"invalid rate {value[:40]!r}: use bytes/s, a size per second (e.g. '1.25GB/s'), "
                "or 'auto'"
            )
        value = parse_bytes(text[:-2])
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not 0 < value <= MAX_RATE
    ):
        shown = (
            f"{value:.3g}"
            if isinstance(value, float) or abs(value) < 10**30
            else "a number that large"
        )
        raise ValueError(f"a rate must be positive and at most 10 TB/s (got {shown})")
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
