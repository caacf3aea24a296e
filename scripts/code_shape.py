#!/usr/bin/env python3
"""Code shape of src/: no class over 250 lines, no function over 60 lines.

A definition's length runs from its ``def``/``class`` line to its last line (decorators not
counted; docstring, comments and blank lines inside counted). Nested functions and methods are
checked on their own as well as inside their parent. Prints each offender as
``path:line: kind name is N lines (limit M)`` and exits 1 if there is any; exits 0 otherwise.

    python scripts/code_shape.py [ROOT ...]     (default: src/ of this checkout)
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Offender:
    path: Path
    line: int
    kind: str  # "class" or "function"
    name: str  # qualified: Outer.method
    lines: int
    limit: int

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.kind} {self.name} is {self.lines} lines "
            f"(limit {self.limit})"
        )


def offenders_in(path: Path, source: str) -> list[Offender]:
    """Every class and function of one module longer than its limit, in source order."""
    found: list[Offender] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                n = child.end_lineno - child.lineno + 1
                is_class = isinstance(child, ast.ClassDef)
                limit = MAX_CLASS_LINES if is_class else MAX_FUNCTION_LINES
                if n > limit:
                    kind = "class" if is_class else "function"
                    found.append(Offender(path, child.lineno, kind, name, n, limit))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename=str(path)), "")
    return found


def offenders(roots: list[Path]) -> list[Offender]:
    """Offenders of every ``*.py`` file under ``roots``, by path."""
    out: list[Offender] = []
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            out.extend(offenders_in(path, path.read_text(encoding="utf-8")))
    return out


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path(__file__).resolve().parent.parent / "src"]
    found = offenders(roots)
    for o in found:
        print(o)
    if found:
        print(
            f"{len(found)} definition(s) over the limits "
            f"(class {MAX_CLASS_LINES}, function {MAX_FUNCTION_LINES} lines)",
            file=sys.stderr,
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
