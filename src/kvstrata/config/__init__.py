"""Configuration: one YAML file in, a frozen, typed :class:`StrataConfig` out.

Loading runs three passes; the first pass that finds problems raises one
:class:`ConfigError` listing all of that pass's problems, sorted by line,
each as ``file:line: field.path: message``:

1. YAML: UTF-8, syntax, duplicate keys (PyYAML's safe composer; plain scalars only) and
   limits -- 1 MiB of text, 32 levels of nesting, 8,192 characters per scalar,
   100,000 values after alias expansion; a scalar PyYAML cannot build is a problem
   on its line, never an exception.
2. Shape: the sections' pydantic models (every number finite and bounded; see
   docs/policies.md "Limits") and each tier's own settings class
   (``tier_class(kind).settings_class``), which also reads ``KVSTRATA_<KIND>_<FIELD>``
   environment variables -- they override the file.
3. Meaning (:func:`kvstrata.policy.engine.compile_policy`): tier names in
   routes, route consistency, duplicate, overlapping and unreachable rules;
   codec names in routes (``codecs:`` plus the codecs a route may name by id:
   ``none``, ``fp8``, ``int8`` and ``int4`` with default parameters).

The value of a secret (a ``SecretStr`` field of a tier's settings) never
appears in a message: YAML problems are reported without the source text,
errors about secret fields name the field only, and every message is
scrubbed of the file's secret values before it is raised.

The modules, one job each: :mod:`~kvstrata.config.errors` (problems and where
they are placed), :mod:`~kvstrata.config.yaml_reader` (pass 1),
:mod:`~kvstrata.config.schema` (the frozen models and the file's shape),
:mod:`~kvstrata.config.tiers` and :mod:`~kvstrata.config.codecs` (building
those sections), :mod:`~kvstrata.config.load` (the entry points). Everything
is importable from ``kvstrata.config``.
"""

from kvstrata.config.codecs import MAX_CODEC_CHECKPOINT_BYTES
from kvstrata.config.errors import ConfigError, Problem, format_path, shown
from kvstrata.config.load import default_config, load_config, parse_config
from kvstrata.config.schema import (
    MAX_RATE,
    MAX_TIMEOUT_MS,
    AuthConfig,
    BandwidthConfig,
    BreakerConfig,
    CodecSpec,
    CostPrior,
    DocumentsConfig,
    EngineConfig,
    OrchestratorConfig,
    ReuseConfig,
    StrataConfig,
    TelemetryConfig,
    TierSpec,
)
from kvstrata.config.yaml_reader import MAX_FILE_BYTES
from kvstrata.sizes import parse_bytes

__all__ = [
    "MAX_CODEC_CHECKPOINT_BYTES",
    "MAX_FILE_BYTES",
    "MAX_RATE",
    "MAX_TIMEOUT_MS",
    "AuthConfig",
    "BandwidthConfig",
    "BreakerConfig",
    "CodecSpec",
    "ConfigError",
    "CostPrior",
    "DocumentsConfig",
    "EngineConfig",
    "OrchestratorConfig",
    "Problem",
    "ReuseConfig",
    "StrataConfig",
    "TelemetryConfig",
    "TierSpec",
    "default_config",
    "format_path",
    "load_config",
    "parse_bytes",
    "parse_config",
    "shown",
]
