"""Pass 1: a configuration file's text, read as plain data with the line of every field.

PyYAML's safe composer with limits -- 1 MiB of text, 32 levels of nesting, 8,192
characters per scalar, 100,000 values after alias expansion -- and plain scalars
only (no tags). Duplicate keys, bad UTF-8 and scalars PyYAML cannot construct are
problems on their line, never exceptions; YAML problems never quote the source
text (it may hold a secret).
"""

from __future__ import annotations

from typing import Any

import yaml

from kvstrata.config.errors import ConfigError, Problem, format_path
from kvstrata.policy.engine import FieldPath

#: Limits on what pass 1 reads: a configuration file is small, flat text written by a person.
MAX_FILE_BYTES = 1 << 20
_MAX_DEPTH = 32
_MAX_SCALAR = 8192
_MAX_VALUES = 100_000
_PLAIN_TAGS = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}


def decode_text(raw: bytes, source: str) -> str:
    """``raw`` as text; ConfigError at the line of the first offending byte if it is too big or
    not UTF-8."""
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


def read_yaml(text: str, source: str) -> tuple[Any, dict[FieldPath, int]]:
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
