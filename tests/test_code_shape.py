"""Code shape of src/ (issue #17): no class over 250 lines, no function over 60 lines.

The check is ``scripts/code_shape.py`` (also run by ``scripts/lint.sh`` in CI); this runs it as
CI does, and checks on made-up modules that it counts and reports what it says it does.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "code_shape.py"


def _load_checker():
    spec = importlib.util.spec_from_file_location("code_shape", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


code_shape = _load_checker()


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines (``def`` line included)."""
    body = [f"{indent}    x = {i}" for i in range(lines - 2)] + [f"{indent}    return x"]
    return "\n".join([f"{indent}def {name}():", *body]) + "\n"


def test_src_has_no_class_or_function_over_the_limits() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(ROOT / "src")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, "\n" + result.stdout + result.stderr


def test_limits_are_inclusive_and_counted_from_def_to_last_line(tmp_path: Path) -> None:
    source = _function("fits", 60) + "\n" + _function("too_long", 61)
    found = code_shape.offenders_in(tmp_path / "m.py", source)
    assert [(o.kind, o.name, o.lines, o.limit) for o in found] == [("function", "too_long", 61, 60)]
    assert str(found[0]).startswith(f"{tmp_path / 'm.py'}:62: function too_long is 61 lines")


def test_classes_methods_nested_and_async_functions_are_all_checked(tmp_path: Path) -> None:
    methods = "".join(_function(f"m{i}", 30, "    ") + "\n" for i in range(9))  # 9 x 31 lines
    big = "class Big:\n" + methods
    nested = "def outer():\n" + _function("inner", 61, "    ") + "    return inner\n"
    coroutine = "async " + _function("fetch", 61)
    method = "class Small:\n" + _function("long_method", 61, "    ")
    source = "\n".join([big, nested, coroutine, method])
    found = code_shape.offenders_in(tmp_path / "m.py", source)
    assert [(o.kind, o.name) for o in found] == [
        ("class", "Big"),
        ("function", "outer"),
        ("function", "outer.inner"),
        ("function", "fetch"),
        ("function", "Small.long_method"),
    ]


def test_script_prints_offenders_and_fails(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text(_function("short", 5))
    (tmp_path / "pkg" / "bad.py").write_text(textwrap.dedent(_function("long", 70)))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "pkg")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert (
        result.stdout == f"{tmp_path / 'pkg' / 'bad.py'}:1: function long is 70 lines (limit 60)\n"
    )
