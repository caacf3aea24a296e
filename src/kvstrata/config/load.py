"""The public entry points: a file, a string or the embedded default in, a
:class:`StrataConfig` out, after the three passes (see :mod:`kvstrata.config`)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from kvstrata.config.codecs import build_codecs, check_route_codecs
from kvstrata.config.errors import ConfigError, Problem, Report
from kvstrata.config.schema import FileSpec, StrataConfig
from kvstrata.config.tiers import build_tier, raw_tiers
from kvstrata.config.yaml_reader import MAX_FILE_BYTES, decode_text, read_yaml
from kvstrata.policy.engine import compile_policy, known_tier


def load_config(path: str | os.PathLike[str]) -> StrataConfig:
    """Load and validate the YAML file at ``path``; ConfigError if it cannot be read or is
    invalid."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # a device or a huge file is never read whole
    except OSError as exc:
        raise ConfigError(
            str(path), [Problem(0, "", f"cannot read: {exc.strerror or exc}")]
        ) from None
    return _parse(decode_text(raw, str(path)), str(path), Path(path))


def parse_config(text: str, source: str = "<string>") -> StrataConfig:
    """Validate YAML ``text``; ``source`` names it in error messages."""
    return _parse(text, source, None)


def default_config() -> StrataConfig:
    """The embedded default: a DRAM tier and a local-disk tier, no servers
    (``presets/default.yaml``)."""
    preset = resources.files("kvstrata").joinpath("presets/default.yaml")
    return _parse(preset.read_text(encoding="utf-8"), "kvstrata/presets/default.yaml", None)


def _parse(text: str, source: str, path: Path | None) -> StrataConfig:
    data, lines = read_yaml(text, source)
    report = Report(source, lines)
    spec = report.validate(FileSpec, data)
    tiers = {name: build_tier(name, raw, report) for name, raw in raw_tiers(data).items()}
    codecs = build_codecs(spec.codecs if spec is not None else {}, path, report)
    if spec is not None:
        for tier in spec.bandwidth.links:
            known_tier(tier, ("bandwidth", "links", tier), tiers, report)
        for i, tier in enumerate(spec.documents.tiers):
            known_tier(tier, ("documents", "tiers", i), tiers, report)
    report.raise_if_any()  # so spec and every tier are valid from here on
    policy = compile_policy(spec.policy, tiers, spec.orchestrator.default_budget_ms, report)
    check_route_codecs(spec.policy, codecs, report)
    report.raise_if_any()
    return StrataConfig(
        path=path,
        version=spec.version,
        chunk_tokens=spec.chunk_tokens,
        tiers=tiers,
        engine=spec.engine,
        orchestrator=spec.orchestrator,
        reuse=spec.reuse,
        telemetry=spec.telemetry,
        policy=policy,
        codecs=codecs,
        bandwidth=spec.bandwidth,
        documents=spec.documents,
        auth=spec.auth,
    )
