"""Bounded pools of daemon threads: where a tier's blocking calls run.

Why not ``asyncio.to_thread``: it uses the loop's one default executor, shared
by every caller, and its threads are joined at interpreter exit. A call that
never returns (``open`` of a FIFO, a hung NFS mount) then holds one of its few
threads for good; a handful of them and every tier's saves stop, and the
process cannot exit. :class:`Workers` gives each user (one tier, the codec
work) its own pool, so one stuck backend starves only itself, and its threads
are daemon threads that exit never waits for.

Contract:

* :meth:`Workers.run` is awaited from an event loop; ``fn(*args)`` runs in one
  of at most ``threads`` threads of this pool.
* At most ``max_queued`` calls wait for a thread; one more raises
  :class:`WorkersBusy` at once, so a stuck pool fails fast instead of
  collecting work (and the buffers it references) without limit.
* A call whose awaiting task is cancelled (a timeout) before a thread picks it
  up never runs, and its arguments are dropped at once (a put's buffers are
  not kept alive behind a stuck call); it still counts against the bound until
  a thread skips it. One already running runs to its end: a thread cannot be
  interrupted, so it keeps its slot until then.
* Threads start on demand and end after ``idle_s`` without work; they are
  daemon threads not registered with :mod:`concurrent.futures`: exit never
  joins them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WorkersBusy(RuntimeError):
    """Every thread of the pool is busy and its queue
    is full (the backend is stuck or overloaded)."""


class Workers:
    """A bounded pool of daemon threads (see the module docstring for the contract)."""

    def __init__(self, name: str, threads: int, max_queued: int, idle_s: float = 30.0):
        if threads < 1 or max_queued < 0:
            raise ValueError("a pool needs at least one thread and a queue bound >= 0")
        self.name, self.threads, self.max_queued, self.idle_s = name, threads, max_queued, idle_s
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future, list]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._outstanding = 0  # calls queued or running

    @property
    def outstanding(self) -> int:
        """Calls queued or running now (a stuck call counts until it returns)."""
        return self._outstanding

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)``; raises :class:`WorkersBusy` if the pool is at its bound."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._outstanding >= self.threads + self.max_queued:
                raise WorkersBusy(f"{self.name}: {self._outstanding} calls queued or running")
            self._outstanding += 1
            # a thread per outstanding call, up to the bound: threads never go idle-but-short
            spawn = self._outstanding > self._started < self.threads
            if spawn:
                self._started += 1
        call = [fn, args]
        future.add_done_callback(lambda f: call.clear() if f.cancelled() else None)
        self._work.put((future, call))
        if spawn:
            threading.Thread(
                target=self._serve, name=f"kvstrata-{self.name}-{self._started}", daemon=True
            ).start()
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a pool thread, awaited;
        cancelling the await drops a call not yet started."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _serve(self) -> None:
        while True:
            try:
                future, call = self._work.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._outstanding < self._started:  # the others can take what comes
                        self._started -= 1
                        return
                continue
            try:
                if future.set_running_or_notify_cancel():  # False: cancelled while queued
                    fn, args = call
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # handed to the awaiting task, never lost
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._outstanding -= 1
            future = call = fn = args = None  # drop the call's buffers while idle
