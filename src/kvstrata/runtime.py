"""The one background event loop per process: where sync callers meet async tiers.

vLLM calls the connector synchronously, from its own threads; tiers are
async. They meet here and nowhere else: a daemon thread runs one asyncio loop
for the whole process, and :func:`run` / :func:`submit` hand coroutines to it.
Every tier client (Redis pool, S3 client) lives on this loop, so they are
never shared across loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The process's background loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve(lp: asyncio.AbstractEventLoop) -> None:
                asyncio.set_event_loop(lp)
                lp.call_soon(ready.set)
                lp.run_forever()

            threading.Thread(target=serve, args=(_loop,), name="kvstrata-loop", daemon=True).start()
            ready.wait()
        return _loop


def in_loop() -> bool:
    """True when called from the background loop's own thread (never block there)."""
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop; returns at once."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for its result (from any other thread).

    On timeout the coroutine is cancelled and ``TimeoutError`` raised.
    """
    if in_loop():
        raise RuntimeError("kvstrata.runtime.run() called from the background loop itself")
    future = submit(coro)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"kvstrata operation exceeded {timeout}s") from None
