"""What a configuration file's problems look like and where they are placed.

:class:`Problem` is one ``file:line: field.path: message``; :class:`ConfigError`
carries all of one pass's problems, sorted by line. :class:`Report` collects
them while a pass runs, placing each field path on the line it came from,
turning pydantic's errors into an operator's words (unknown keys get a "did you
mean"), and scrubbing the file's secret values from every message.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from kvstrata.policy.engine import FieldPath


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: 1-based ``line`` (0: none), dotted ``path`` ('' for the
    whole file)."""

    line: int
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line > 0 else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(ValueError):
    """An invalid configuration file. ``str()`` is one ``file:line: path: message`` line per
    problem."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = tuple(sorted(problems, key=lambda p: p.line))
        super().__init__("\n".join(p.format(source) for p in self.problems))


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


class Report:
    """Collects problems, placing each field path on the line it came from."""

    def __init__(self, source: str, lines: dict[FieldPath, int]):
        self.source, self.lines = source, lines
        self.problems: list[Problem] = []
        self.secrets: set[str] = set()

    def line(self, path: FieldPath) -> int:
        """The line of ``path``, or of its nearest ancestor in the file (missing keys, env
        values)."""
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
        """Report each error of ``exc`` at ``prefix + loc``; ``keys_at(loc)`` lists the valid
        keys there."""
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
