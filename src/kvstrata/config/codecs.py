"""Pass 2 and 3 for codecs: ``codecs:`` entries built once (bad parameters fail at load), and
the codec names routes use checked against them and the built-in codecs.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvstrata.compression.base import CodecError, builtin_codecs, codec_from_config, codec_kinds
from kvstrata.config.errors import Report, shown
from kvstrata.config.schema import CodecSpec
from kvstrata.policy.engine import FieldPath, PolicySpec


def build_codecs(raw: dict[str, Any], path: Path | None, report: Report) -> dict[str, CodecSpec]:
    """``codecs:``: name -> {kind, params...}; each is built once here, so bad parameters
    fail at load."""
    kinds = sorted(codec_kinds())
    out: dict[str, CodecSpec] = {}
    for name, entry in raw.items():
        at: FieldPath = ("codecs", name)
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}", name)):
            report.add(at, "invalid codec name: 1-16 letters, digits, '_', '.' and '-'")
            continue
        if name in ("none", "pages"):
            report.add(at, f"'{name}' is a built-in lossless codec and cannot be redefined")
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
        if kind == "pages":
            report.add(
                (*at, "kind"),
                "'pages' (the engine's page layout) is built in and takes no parameters: "
                "name it in a route (codec: {dram: pages})",
            )
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
        if not _local_files(codec_kinds()[kind], params, path, at, report):
            continue
        try:
            codec = codec_from_config(name, kind, params)
        except CodecError as exc:
            report.add(at, str(exc))
            continue
        out[name] = CodecSpec(name=name, kind=kind, params=MappingProxyType(dict(codec.params)))
    return out


#: A codec checkpoint is a few MiB of weights; anything past this is not one (and is never
#: read whole).
MAX_CODEC_CHECKPOINT_BYTES = 1 << 30


def _local_files(
    cls: type, params: dict[str, Any], path: Path | None, at: FieldPath, report: Report
) -> bool:
    """Resolve the codec's file parameters (``cls.local_params``) against the configuration's
    directory, in place; False (reported) if one names something that is not a codec file."""
    ok = True
    for name in sorted(cls.local_params):
        value = params.get(name)
        if not isinstance(value, str):
            continue  # missing or mistyped: the codec says so in its own words
        if path is not None:
            value = params[name] = str((path.parent / Path(value).expanduser()).resolve())
        if problem := _not_a_local_file(name, value):
            report.add((*at, name), problem)
            ok = False
    return ok


def _not_a_local_file(param: str, name: str) -> str | None:
    """Why the file ``name`` cannot be a codec's file (a device, a FIFO, too big), or None to go on.

    A missing file is left to the codec, which says so in its own words.
    """
    try:
        st = os.stat(Path(name).expanduser())
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{param} {shown(name)} is not a regular file"
    if st.st_size > MAX_CODEC_CHECKPOINT_BYTES:
        return f"{param} {shown(name)} is over {MAX_CODEC_CHECKPOINT_BYTES >> 30} GiB"
    return None


def check_route_codecs(spec: PolicySpec, codecs: Mapping[str, CodecSpec], report: Report) -> None:
    builtin = builtin_codecs()
    known = sorted({*builtin, *codecs})
    routes: list[tuple[FieldPath, Any]] = [(("policy", "default"), spec.default)]
    routes += [(("policy", "rules", i, "route"), rule.route) for i, rule in enumerate(spec.rules)]
    for at, route in routes:
        for tier, name in route.codec.items() if route is not None else ():
            if name not in codecs and name not in builtin:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                report.add(
                    (*at, "codec", tier),
                    f"unknown codec {name!r} ({hint}defined: {', '.join(known)}; "
                    "define it under codecs:)",
                )
