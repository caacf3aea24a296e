"""Helpers shared by the benchmarks: machine description, JSON output, statistics, tables.

Stdlib only at import time (``rich`` is imported when a table is printed), so a
benchmark can import this before deciding what else it needs.

Conventions every benchmark follows:

* MB/s means 10**6 bytes per second (``mb_per_s``); sizes are printed in KiB/MiB.
* Latencies are kept in seconds internally and reported in milliseconds.
* Results are written with :func:`write_json` as one JSON document holding the
  machine (:func:`machine_info`), the exact command (:func:`command_line`),
  the UTC date (:func:`utc_now`), the parameters and the rows.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- the machine ------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        name, sep, value = line.partition(":")
        if sep:
            info.setdefault(name.strip(), value.strip())
    return info


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution versions; None for a package that is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Where a result was measured: OS, CPU, cores, memory, Python and package versions."""
    cpu = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": cpu.get("model name") or platform.processor() or None,
        "cpu_mhz": cpu.get("cpu MHz"),
        "cpu_flags_avx2": "avx2" in cpu.get("flags", "").split(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable,
        "memory_total_bytes": _meminfo_bytes("MemTotal"),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "packages": package_versions(["kvstrata", *packages]),
        "load_average": load_average(),
    }


def command_line() -> str:
    """The command as it was typed, shell-quoted (interpreter included)."""
    return shlex.join([sys.executable, *sys.argv])


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# -- output -----------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically (temp file + rename); create parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, default=_json_default, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- statistics -------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def mb_per_s(nbytes: float, seconds: float) -> float:
    """Throughput in MB/s (10**6 bytes per second)."""
    return nbytes / seconds / 1e6 if seconds > 0 else math.nan


def human_bytes(n: int) -> str:
    """256 KiB, 1 MiB, 4 MiB, 1.5 GiB ..."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def round_floats(value: Any, digits: int = 4) -> Any:
    """Round every float in a nested structure (keeps JSON results readable); NaN becomes None."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, digits)
    if isinstance(value, Mapping):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


# -- tables -----------------------------------------------------------------


def print_table(
    title: str,
    columns: Sequence[str | tuple[str, str]],
    rows: Iterable[Sequence[Any]],
    *,
    caption: str | None = None,
    console: Any = None,
    section_every: int | None = None,
) -> Any:
    """Print a rich table and return it.

    ``columns`` are names, or ``(name, justify)`` with justify ``left``/``right``/``center``
    (default: the first column left, the others right). Cells are printed with ``str()``;
    ``None`` prints as ``-``. A row that is ``None`` draws a section line instead.
    ``section_every=n`` draws one after every n rows.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, header_style="bold", title_justify="left")
    for i, column in enumerate(columns):
        if isinstance(column, tuple):
            name, justify = column
        else:
            name, justify = column, ("left" if i == 0 else "right")
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    count = 0
    for row in rows:
        if row is None:
            table.add_section()
            continue
        table.add_row(*("-" if cell is None else str(cell) for cell in row))
        count += 1
        if section_every and count % section_every == 0:
            table.add_section()
    if console is None:
        # Wide enough that a table is not wrapped when stdout is a file or a pipe.
        console = Console(width=max(160, Console().width))
    console.print(table)
    return table


def fmt_num(value: float | None, digits: int = 0) -> str | None:
    """A number for a table cell; None/NaN become None (printed as '-')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"{value:,.{digits}f}"
