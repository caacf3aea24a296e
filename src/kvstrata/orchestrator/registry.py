"""The process-wide share registry: one orchestrator per (configuration, model) per process.

vLLM without multiprocessing puts its scheduler and worker roles in one
process: sharing the orchestrator gives them one DRAM pool, one reuse sketch
and one cost model. Each user releases it once; the last release really closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

_SHARED: dict[Hashable, list] = {}  # key -> [orchestrator, users]
_LOCK = threading.Lock()


def share_key(config, model) -> Hashable:
    """A file is known by its path; a configuration built in memory by its identity."""
    return (str(Path(config.path).resolve()) if config.path else id(config), model)


def acquire(key: Hashable, make: Callable[[], Any]) -> Any:
    """The orchestrator registered under ``key`` (made by ``make()`` if none), one more user."""
    with _LOCK:
        entry = _SHARED.get(key)
        if entry is None:
            entry = _SHARED[key] = [make(), 0]
        entry[1] += 1
        return entry[0]


def release(key: Hashable | None) -> bool:
    """One user fewer; True if the caller was the last (or the orchestrator was not shared)."""
    if key is None:
        return True
    with _LOCK:
        entry = _SHARED.get(key)
        if entry is None:
            return True
        entry[1] -= 1
        if entry[1] > 0:
            return False
        del _SHARED[key]
        return True


def users(key: Hashable | None) -> int:
    """How many users hold the orchestrator under ``key`` (1 if it is not shared)."""
    entry = _SHARED.get(key) if key is not None else None
    return entry[1] if entry else 1


def shared_orchestrators() -> list:
    """The process's shared orchestrators (what a vLLM engine in this process uses)."""
    with _LOCK:
        return [entry[0] for entry in _SHARED.values()]


def flush_shared(timeout: float = 60.0) -> bool:
    """Wait until every shared orchestrator of this process has written its queued saves."""
    return all(o.flush(timeout) for o in shared_orchestrators())
