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
   codec names in routes (``codecs:`` plus the built-in ``none``, ``fp8``,
   ``int8`` and ``int4`` with default parameters).

The value of a secret (a ``SecretStr`` field of a tier's settings) never
appears in a message: YAML problems are reported without the source text,
errors about secret fields name the field only, and every message is
scrubbed of the file's secret values before it is raised.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from kvstrata.policy.engine import FieldPath, Policy, PolicySpec, compile_policy, known_tier
from kvstrata.sizes import parse_bytes
from kvstrata.tiers.base import BUILTIN_KINDS, TierSettings, tier_class

# -- errors -------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: 1-based ``line`` (0:
    none), dotted ``path`` ('' for the whole file)."""

    line: int
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line > 0 else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(ValueError):
    """An invalid configuration file. ``str()`` is one
    ``file:line: path: message`` line per problem."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = tuple(sorted(problems, key=lambda p: p.line))
        super().__init__("\n".join(p.format(source) for p in self.problems))


# -- the configuration ----------------------------------------------------------


class _Frozen(BaseModel):
    # no .inf / .nan anywhere: every bound below is finite
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class CostPrior(_Frozen):
    """What the cost model assumes about a tier until it has measured it."""

    latency_ms: float = Field(gt=0, le=600_000)  # 10 min
    bandwidth_mbps: float = Field(gt=0, le=10_000_000)  # 10 TB/s


DEFAULT_COST: Mapping[str, CostPrior] = MappingProxyType(
    {
        "memory": CostPrior(latency_ms=0.02, bandwidth_mbps=20000),
        "lmcache": CostPrior(latency_ms=0.05, bandwidth_mbps=5000),  # a copy and a checksum per get
        "disk": CostPrior(latency_ms=0.3, bandwidth_mbps=1500),
        "redis": CostPrior(latency_ms=0.5, bandwidth_mbps=800),
        "s3": CostPrior(latency_ms=15, bandwidth_mbps=250),
    }
)
UNKNOWN_KIND_COST = CostPrior(latency_ms=5, bandwidth_mbps=200)
DEFAULT_TIMEOUT_MS: Mapping[str, float] = MappingProxyType(
    {"memory": 1000, "lmcache": 1000, "disk": 2000, "redis": 2000, "s3": 5000}
)
UNKNOWN_KIND_TIMEOUT_MS = 5000.0
#: One hour: the longest tier timeout or request budget a file may set.
MAX_TIMEOUT_MS = 3_600_000


class TierSpec(_Frozen):
    """A named tier: its kind, validated settings, cost prior and per-operation timeout."""

    name: str
    kind: str
    settings: TierSettings
    cost: CostPrior
    timeout_ms: float = Field(gt=0, le=MAX_TIMEOUT_MS)


class EngineConfig(_Frozen):
    prefill_tokens_per_s: float = Field(
        150.0, gt=0, le=1e8, description="prior for recompute cost; learned later"
    )


class BreakerConfig(_Frozen):
    failures: int = Field(3, ge=1, le=1_000_000)
    cooldown_s: float = Field(10.0, gt=0, le=86_400)


class OrchestratorConfig(_Frozen):
    save_queue_chunks: int = Field(256, ge=1, le=1 << 20)
    breaker: BreakerConfig = BreakerConfig()
    default_budget_ms: float = Field(2000.0, gt=0, le=MAX_TIMEOUT_MS)


class ReuseConfig(_Frozen):
    half_life_s: float = Field(600.0, gt=0, le=30 * 86_400)
    sketch_width: int = Field(65536, ge=1, le=1 << 24)  # <= 64 MiB per row (float32)
    sketch_depth: int = Field(4, ge=1, le=8)


class TelemetryConfig(_Frozen):
    """Where metrics go besides the in-process registry (see docs/telemetry.md)."""

    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="None: no exporter; 0: any free port"
    )
    prometheus_addr: str = "127.0.0.1"
    snapshot_path: str | None = Field(
        None, description="JSON snapshot file; {role} and {pid} are replaced"
    )


class BandwidthConfig(_Frozen):
    """``bandwidth:``: budgets of tiers' read paths and how concurrent loads share them."""

    policy: Literal["equal", "stall_aware", "deadline"] = "deadline"
    sharing: Literal["work_conserving", "fixed"] = Field(
        "work_conserving",
        description=(
            "work_conserving: the split is redone at every event "
            "and unused bandwidth goes to others; "
            "fixed: a rate per request, set when a request starts (a per-request rate limit)"
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


class CodecSpec(_Frozen):
    """A named codec: its registry kind and the parameters
    its objects record (normalized by the codec)."""

    name: str
    kind: str
    params: Mapping[str, int | float | str | bool]


class DocumentsConfig(_Frozen):
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


class AuthConfig(_Frozen):
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


#: Codec names every configuration has (kind = name,
#: default parameters) unless ``codecs:`` redefines them.
BUILTIN_CODECS = ("none", "fp8", "int8", "int4")


class StrataConfig(_Frozen):
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
        if name in BUILTIN_CODECS:
            return CodecSpec(name=name, kind=name, params={})
        raise KeyError(name)


# -- the file's shape (pass 2); the policy section's is in kvstrata.policy.engine --


def _tier_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError("invalid tier name: use letters, digits, '_', '.' and '-'")
    return name


class _FileSpec(_Frozen):
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

# -- public API -------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> StrataConfig:
    """Load and validate the YAML file at ``path``;
    ConfigError if it cannot be read or is invalid."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # a device or a huge file is never read whole
    except OSError as exc:
        raise ConfigError(
            str(path), [Problem(0, "", f"cannot read: {exc.strerror or exc}")]
        ) from None
    return _parse(_decode(raw, str(path)), str(path), Path(path))


def parse_config(text: str, source: str = "<string>") -> StrataConfig:
    """Validate YAML ``text``; ``source`` names it in error messages."""
    return _parse(text, source, None)


def default_config() -> StrataConfig:
    """The embedded default: a DRAM tier and a local-disk tier, no servers
    (``presets/default.yaml``)."""
    preset = resources.files("kvstrata").joinpath("presets/default.yaml")
    return _parse(preset.read_text(encoding="utf-8"), "kvstrata/presets/default.yaml", None)


def _parse(text: str, source: str, path: Path | None) -> StrataConfig:
    data, lines = _read_yaml(text, source)
    report = _Report(source, lines)
    spec = report.validate(_FileSpec, data)
    tiers = {name: _tier(name, raw, report) for name, raw in _raw_tiers(data).items()}
    codecs = _codecs(spec.codecs if spec is not None else {}, path, report)
    if spec is not None:
        for tier in spec.bandwidth.links:
            known_tier(tier, ("bandwidth", "links", tier), tiers, report)
        for i, tier in enumerate(spec.documents.tiers):
            known_tier(tier, ("documents", "tiers", i), tiers, report)
    report.raise_if_any()  # so spec and every tier are valid from here on
    policy = compile_policy(spec.policy, tiers, spec.orchestrator.default_budget_ms, report)
    _check_route_codecs(spec.policy, codecs, report)
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


# -- codecs -------------------------------------------------------------------------


def _codecs(raw: dict[str, Any], path: Path | None, report: _Report) -> dict[str, CodecSpec]:
    """``codecs:``: name -> {kind, params...}; each is
    built once here so bad parameters fail at load."""
    from kvstrata.compression.base import CodecError, codec_from_config, codec_kinds

    kinds = sorted(codec_kinds())
    out: dict[str, CodecSpec] = {}
    for name, entry in raw.items():
        at: FieldPath = ("codecs", name)
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}", name)):
            report.add(at, "invalid codec name: 1-16 letters, digits, '_', '.' and '-'")
            continue
        if name == "none":
            report.add(at, "'none' is the uncompressed codec and cannot be redefined")
            continue
        if not isinstance(entry, dict):
            report.add(
                at, f"must be a mapping like {{kind: int4, group_size: 32}} (got {shown(entry)})"
            )
            continue
        params = dict(entry)
        kind = params.pop("kind", None)
        if kind is None:
            report.add((*at, "kind"), "required key missing")
            continue
        if kind not in kinds:
            report.add(
                (*at, "kind"), f"unknown codec kind {shown(kind)} (known: {', '.join(kinds)})"
            )
            continue
        bad = [k for k, v in params.items() if not isinstance(v, str | int | float | bool)]
        for key in bad:
            report.add((*at, key), "codec parameters must be plain scalars")
        if bad:
            continue
        if (
            kind in ("autoencoder", "linear-ae")
            and isinstance(params.get("checkpoint"), str)
            and path is not None
        ):
            params["checkpoint"] = str(
                (path.parent / Path(params["checkpoint"]).expanduser()).resolve()
            )
        if isinstance(params.get("checkpoint"), str) and (
            problem := _not_a_checkpoint(params["checkpoint"])
        ):
            report.add((*at, "checkpoint"), problem)
            continue
        try:
            codec = codec_from_config(name, kind, params)
        except CodecError as exc:
            report.add(at, str(exc))
            continue
        out[name] = CodecSpec(name=name, kind=kind, params=MappingProxyType(dict(codec.params)))
    return out


#: A codec checkpoint is a few MiB of weights; anything
#: past this is not one (and is never read whole).
MAX_CODEC_CHECKPOINT_BYTES = 1 << 30


def _not_a_checkpoint(name: str) -> str | None:
    """Why the file ``name`` cannot be a codec checkpoint
    (a device, a FIFO, too big), or None to go on.

    A missing file is left to the codec, which says so in its own words.
    """
    try:
        st = os.stat(Path(name).expanduser())
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"checkpoint {shown(name)} is not a regular file"
    if st.st_size > MAX_CODEC_CHECKPOINT_BYTES:
        return f"checkpoint {shown(name)} is over {MAX_CODEC_CHECKPOINT_BYTES >> 30} GiB"
    return None


def _check_route_codecs(spec: PolicySpec, codecs: Mapping[str, CodecSpec], report: _Report) -> None:
    known = sorted({*BUILTIN_CODECS, *codecs})
    routes: list[tuple[FieldPath, Any]] = [(("policy", "default"), spec.default)]
    routes += [(("policy", "rules", i, "route"), rule.route) for i, rule in enumerate(spec.rules)]
    for at, route in routes:
        for tier, name in route.codec.items() if route is not None else ():
            if name not in codecs and name not in BUILTIN_CODECS:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                report.add(
                    (*at, "codec", tier),
                    f"unknown codec {name!r} ({hint}defined: {', '.join(known)}; "
                    "define it under codecs:)",
                )


# -- pass 1: YAML -------------------------------------------------------------------


#: Limits on what pass 1 reads: a configuration file is small, flat text written by a person.
MAX_FILE_BYTES = 1 << 20
_MAX_DEPTH = 32
_MAX_SCALAR = 8192
_MAX_VALUES = 100_000
_PLAIN_TAGS = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}


def _decode(raw: bytes, source: str) -> str:
    """``raw`` as text; ConfigError at the line of the
    first offending byte if it is too big or not UTF-8."""
    if len(raw) > MAX_FILE_BYTES:
        line = raw[:MAX_FILE_BYTES].count(b"\n") + 1
        raise ConfigError(
            source,
            [
                Problem(
                    line,
                    "",
                    f"the file is over {MAX_FILE_BYTES >> 20} MiB "
                    "(a configuration file is a few KiB)",
                )
            ],
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            source,
            [
                Problem(
                    line,
                    "",
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{column}); save the file as UTF-8",
                )
            ],
        ) from None


def _read_yaml(text: str, source: str) -> tuple[Any, dict[FieldPath, int]]:
    """The document as plain data, and the 1-based line of every field path in it.

    Never raises anything but ConfigError: nesting deeper than ``_MAX_DEPTH``,
    scalars over ``_MAX_SCALAR`` characters, documents expanding (through
    aliases) to over ``_MAX_VALUES`` values and values PyYAML cannot construct
    (a 5,000-digit integer, a 13th month) are problems on their line.
    """
    lines: dict[FieldPath, int] = {}
    problems: list[Problem] = []
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(source, [Problem(1, "", f"the text is over {MAX_FILE_BYTES >> 20} MiB")])
    try:
        data = _compose(text, lines, problems)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc)]) from None
    except yaml.reader.ReaderError as exc:  # a control character: no mark, a position
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(source, [Problem(line, "", f"invalid YAML: {exc.reason}")]) from None
    except RecursionError:  # a safety net: _MAX_DEPTH keeps every recursion far below the limit
        raise ConfigError(source, [Problem(1, "", "invalid YAML: nested too deeply")]) from None
    if problems:
        raise ConfigError(source, problems)
    if not isinstance(data, dict):
        found = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            source,
            [
                Problem(
                    1, "", f"expected a mapping of sections (version, tiers, ...), found {found}"
                )
            ],
        )
    return data, lines


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with its recursive composer bounded in depth and scalar size."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > _MAX_SCALAR:
            raise yaml.MarkedYAMLError(
                problem=f"a value over {_MAX_SCALAR} characters", problem_mark=event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.MarkedYAMLError(
                    problem=f"nested deeper than {_MAX_DEPTH} levels", problem_mark=event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, lines: dict[FieldPath, int], problems: list[Problem]) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _plain(loader, node, (), lines, problems)
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.MarkedYAMLError) -> Problem:
    """PyYAML's own words and marks, never its snippet of the source (it may hold a secret)."""
    mark = exc.problem_mark or exc.context_mark
    where = f" (column {mark.column + 1})" if mark else ""
    if exc.context and exc.context_mark and exc.problem_mark:
        where += f"; {exc.context} at line {exc.context_mark.line + 1}"
    return Problem(mark.line + 1 if mark else 1, "", f"invalid YAML: {exc.problem}{where}")


def _plain(
    loader: yaml.SafeLoader, node: yaml.Node, path: FieldPath, lines: dict, problems: list
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if len(lines) > _MAX_VALUES:  # aliases of aliases can expand exponentially
        raise yaml.MarkedYAMLError(
            problem=f"the document expands to over {_MAX_VALUES} values",
            problem_mark=node.start_mark,
        )
    if len(path) > _MAX_DEPTH:  # aliases of nested nodes inside nested nodes
        raise yaml.MarkedYAMLError(
            problem=f"the document expands to over {_MAX_DEPTH} levels of nesting",
            problem_mark=node.start_mark,
        )
    if type(node) in _PLAIN_TAGS and node.tag != _PLAIN_TAGS[type(node)]:
        raise yaml.MarkedYAMLError(
            problem=f"unsupported tag {node.tag!r}", problem_mark=node.start_mark
        )
    if isinstance(node, yaml.SequenceNode):
        return [
            _plain(loader, item, (*path, i), lines, problems) for i, item in enumerate(node.value)
        ]
    if not isinstance(node, yaml.MappingNode):
        return _scalar(loader, node)
    _find_duplicates(loader, node, path, problems)
    loader.flatten_mapping(node)  # resolve `<<: *anchor` merges; later keys win
    out = {}
    for key_node, value_node in node.value:
        key = _scalar(loader, key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str | int | float | bool):
            raise yaml.MarkedYAMLError(
                problem="a key must be a plain scalar", problem_mark=key_node.start_mark
            )
        lines[(*path, key)] = key_node.start_mark.line + 1
        out[key] = _plain(loader, value_node, (*path, key), lines, problems)
    return out


def _scalar(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """One scalar's value; MarkedYAMLError at the node for what PyYAML cannot construct."""
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, OverflowError) as exc:  # 5,000-digit ints, 2024-13-01, bad base64
        what = "number" if node.tag.endswith((":int", ":float")) else node.tag.rsplit(":", 1)[-1]
        reason = "over 4300 digits" if "digits" in str(exc) else "out of range or malformed"
        raise yaml.MarkedYAMLError(
            problem=f"invalid {what}: {reason}", problem_mark=node.start_mark
        ) from None


def _find_duplicates(
    loader: yaml.SafeLoader, node: yaml.MappingNode, path: FieldPath, problems: list[Problem]
) -> None:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = _scalar(loader, key_node)
        line = key_node.start_mark.line + 1
        if key in first:
            message = f"duplicate key {key!r} (first at line {first[key]})"
            problems.append(Problem(line, format_path((*path, key)), message))
        first.setdefault(key, line)


_MAX_MESSAGE = 600


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut at ``limit`` characters (a value may be 8 KiB long)."""
    text = (
        repr(value)
        if not isinstance(value, int) or abs(value) < 10**limit
        else f"a {len(str(value))}-digit number"
    )
    return text if len(text) <= limit else text[:limit] + "..."


def format_path(path: FieldPath) -> str:
    """``('policy', 'rules', 1, 'route')`` -> ``policy.rules[1].route``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif not isinstance(part, str) or not part.isprintable() or not part or len(part) > 60:
            # a control character never reaches the terminal or splits a line
            out += f"[{shown(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# -- pass 2: shape ------------------------------------------------------------------


class _Report:
    """Collects problems, placing each field path on the line it came from."""

    def __init__(self, source: str, lines: dict[FieldPath, int]):
        self.source, self.lines = source, lines
        self.problems: list[Problem] = []
        self.secrets: set[str] = set()

    def line(self, path: FieldPath) -> int:
        """The line of ``path``, or of its nearest ancestor
        in the file (missing keys, env values)."""
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def add(self, path: FieldPath, message: str) -> None:
        if len(message) > _MAX_MESSAGE:  # a value echoed from the file; its line says where to look
            message = message[:_MAX_MESSAGE] + "..."
        self.problems.append(Problem(self.line(path), format_path(path), message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.source, [_scrub(p, self.secrets) for p in self.problems])

    def validate(self, model: type[BaseModel], data: Any) -> Any:
        """``model`` validated from ``data``, or None with its errors reported."""
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            self.pydantic(exc, (), lambda loc: _fields_at(model, loc))
            return None

    def pydantic(
        self,
        exc: ValidationError,
        prefix: FieldPath,
        keys_at,
        secret=lambda loc: False,
        env=lambda loc: "",
    ) -> None:
        """Report each error of ``exc`` at ``prefix +
        loc``; ``keys_at(loc)`` lists valid keys there."""
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if p != "[key]")
            message = _message(err, keys_at(loc[:-1]), secret(loc))
            if "[key]" in err["loc"] and err["type"] != "value_error":
                message = f"invalid key: {message}"
            self.add((*prefix, *loc), message + env(loc))


def _message(err: Mapping[str, Any], valid_keys: list[str], secret: bool) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(str(err["loc"][-1]), valid_keys)
    if kind == "missing":
        return "required key missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    value = err.get("input")
    if not secret and kind != "value_error" and isinstance(value, str | int | float):
        msg += f" (got {shown(value)})"
    return msg


def _unknown_key(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    return f"unknown key {key!r} (valid: {', '.join(valid)})" if valid else f"unknown key {key!r}"


def _fields_at(model: Any, loc: FieldPath) -> list[str]:
    """The field names of the model found by following ``loc`` down from ``model`` ([] if none)."""
    tp = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            tp = field.annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> ``X``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, type(int | None)) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def _scrub(problem: Problem, secrets: set[str]) -> Problem:
    message = problem.message
    for secret in secrets:
        message = message.replace(secret, "***")
    return Problem(problem.line, problem.path, message)


def _raw_tiers(data: dict) -> dict[str, dict]:
    """The tier entries that are worth validating (the section's shape is reported by _FileSpec)."""
    tiers = data.get("tiers")
    if not isinstance(tiers, dict):
        return {}
    return {k: v for k, v in tiers.items() if isinstance(k, str) and isinstance(v, dict)}


_TIER_KEYS = ["kind", "cost", "timeout_ms"]


def _tier(name: str, raw: dict, report: _Report) -> TierSpec | None:
    """One tier entry: ``kind``, ``cost`` and ``timeout_ms``
    are ours, the rest its settings class's."""
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


def _cost(kind: str, raw: Any, at: FieldPath, report: _Report) -> CostPrior | None:
    prior = DEFAULT_COST.get(kind, UNKNOWN_KIND_COST)
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


class _Timeout(_Frozen):
    timeout_ms: float = Field(gt=0, le=MAX_TIMEOUT_MS)


def _timeout(kind: str, raw: Any, at: FieldPath, report: _Report) -> float | None:
    if raw is None:
        return DEFAULT_TIMEOUT_MS.get(kind, UNKNOWN_KIND_TIMEOUT_MS)
    try:
        return _Timeout(timeout_ms=raw).timeout_ms
    except ValidationError as exc:
        report.pydantic(exc, at[:-1], lambda loc: [])
        return None


def _settings(
    cls: type[TierSettings], raw: dict, at: FieldPath, report: _Report
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
