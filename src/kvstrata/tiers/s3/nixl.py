"""NIXL transport for the S3 tier: objects move through NIXL's OBJ (S3) plugin.

For stacks that already move KV with NIXL (the ObjectCache prototype read KV
from Ceph RGW this way). Selected with ``transport: nixl`` in the S3 tier's
settings; installed with ``kvstrata[nixl]`` (the ``nixl-cu12`` build: the
``nixl`` meta package pulls a CUDA torch, and the cu13 build's OBJ plugin does
not load without CUDA libraries).

What goes through NIXL, and what does not:

* **PUT** (whole object) and **ranged GET** are NIXL transfers: WRITE from, or
  READ into, a registered DRAM staging buffer, against an OBJ segment whose
  ``devId`` maps to the object key (``addr`` is the offset in the object).
* Metadata goes through an obstore client on the same bucket. NIXL's OBJ
  plugin has no DELETE, does not report an object's **size** (a READ past the
  end succeeds and leaves the rest of the buffer as it was), and its one
  metadata call, ``queryMem`` (a HEAD, for **exists**), blocks the calling
  thread: on the event loop, every ``contains`` would stall every other
  request, and against a dead endpoint it blocked for ~25 s of SDK retries
  here. So ``exists`` and the size lookup are an async obstore HEAD (bounded
  by ``timeout_s``/``max_retries``), and ``remove`` an obstore DELETE. A
  size is cached per key (bounded LRU) from this transport's own writes and
  from those HEADs, so a steady-state read is one NIXL READ; the first read
  of a key written elsewhere costs a HEAD first. Keys are content-addressed
  (same key, same bytes), so a cached size does not go stale in practice; if
  a READ fails, the size is looked up again and the READ retried once.

Created once, reused for every request: one NIXL agent with the OBJ backend
(no UCX), staging buffers (registered with NIXL the first time a size class
is needed, then kept on a free list), and OBJ registrations (key -> devId,
bounded LRU; the oldest is deregistered). Transfers are polled from the
event loop with a short back-off; a transfer still running after
``timeout_s`` fails the call (``TimeoutError``); a buffer whose transfer
could not be released is never reused.

A transfer still running when its caller gives up (``timeout_s``, or the
orchestrator's own timeout cancelling the read) is never released while it
runs: the AWS SDK inside the OBJ plugin may still be retrying its request
and write into the buffer. It is parked, with its buffer, and released once
NIXL reports it ended. The plugin has no retry setting; left alone, its SDK
retries 10 times ("legacy" mode, ~25 s per request against a dead endpoint,
requests one after another), so the backend is created with
``AWS_RETRY_MODE=standard`` and ``AWS_MAX_ATTEMPTS=max_retries+1`` set for
that moment only (:func:`_sdk_retries`): a request then fails in about a
second, like the other transports (measured: a killed endpoint's GET failed
in 0.3-0.8 s instead of hitting ``timeout_s``).

Closing frees the agent deterministically, off the event loop, bounded
(:class:`_Release`): ``close`` hands the agent, its registrations and the
parked transfers to a daemon thread that waits (up to ``DRAIN_S``) until no
transfer runs, then deregisters and drops the last reference. Why it must
wait: the plugin's destructor joins its SDK thread, and runs with the GIL
held (pybind11), so freeing an agent whose request still retries stood the
whole process still for 19-22 s (measured, legacy retries). After the drain
the join is immediate. If transfers still run after ``DRAIN_S``, the thread
keeps the agent for the life of the process instead (a leak, logged), so
neither the garbage collector nor interpreter exit frees it mid-request.

Where NIXL or its OBJ plugin cannot load, the constructor raises one
:class:`TierError` ("start") saying why; the other transports are unaffected.
Every other failure is the library's exception; :class:`S3Tier` maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstrata.tiers.base import TierError
from kvstrata.tiers.s3.obstore_transport import ObstoreTransport
from kvstrata.tiers.s3.settings import S3Settings

log = logging.getLogger(__name__)

MIN_BUFFER = 64 << 10  # smallest staging buffer; sizes are powers of two from here
REGISTRATIONS = 4096  # OBJ key registrations kept
SIZES = 65536  # object sizes cached
DRAIN_S = (
    120.0  # the most a closed agent waits for its running transfers before it is kept for good
)


def _load_nixl(name: str) -> Any:
    try:
        from nixl_cu12 import _api
    except Exception as exc:  # ImportError, or a shared library that does not load here
        raise TierError(
            name,
            "start",
            f"NIXL cannot load ({type(exc).__name__}: {exc}); "
            "install it with `pip install 'kvstrata[nixl]'` (nixl-cu12)",
        ) from exc
    return _api


class NixlTransport:
    """The S3 tier's :class:`~kvstrata.tiers.s3.transport.Transport` over NIXL's OBJ plugin.

    Paths are full object keys (the tier adds its prefix). Methods are called
    from the tier's event loop; NIXL calls are serialised by a lock, the
    transfers themselves run in the plugin's threads.
    """

    def __init__(self, name: str, s: S3Settings):
        api = _load_nixl(name)
        self._s = s
        self._lock = threading.Lock()
        try:
            self._agent = api.nixl_agent(
                f"kvstrata-{name}-{uuid.uuid4().hex[:8]}", api.nixl_agent_config(backends=[])
            )
            if "OBJ" not in self._agent.get_plugin_list():
                raise RuntimeError(f"no OBJ plugin (plugins here: {self._agent.get_plugin_list()})")
            with _sdk_retries(s.max_retries):
                self._agent.create_backend("OBJ", _backend_params(s))
        except TierError:
            raise
        except Exception as exc:
            detail = f"NIXL OBJ backend: {type(exc).__name__}: {exc}"
            raise TierError(name, "start", detail) from exc
        self._meta = ObstoreTransport(s)  # HEAD for sizes, DELETE: NIXL's OBJ plugin has neither
        self._sizes = _Sizes(self._meta)
        self._free: dict[int, list[np.ndarray]] = {}  # size class -> registered idle buffers
        self._stranded: list[np.ndarray] = []  # buffers of transfers NIXL could not cancel
        self._parked: list[tuple[Any, np.ndarray]] = []  # transfers given up on while running
        self._active = 0  # transfers posted and not yet finished
        self._closed = False
        self.release: _Release | None = None  # set by close
        self._registered: list[Any] = []  # every DRAM registration, deregistered at close
        self._buffers: list[np.ndarray] = []  # every registered buffer, alive until close
        self._dev_ids: OrderedDict[str, int] = OrderedDict()  # object key -> OBJ devId (LRU)
        self._obj_regs: dict[str, Any] = {}
        self._next_dev = itertools.count(1)

    # -- registrations, made once and reused ----------------------------------

    def _buffer(self, size: int) -> np.ndarray:
        cls = max(MIN_BUFFER, 1 << (max(size, 1) - 1).bit_length())
        with self._lock:
            idle = self._free.setdefault(cls, [])
            if idle:
                return idle.pop()
            buf = np.empty(cls, dtype=np.uint8)
            self._buffers.append(buf)  # registered memory must never be freed under NIXL
            self._registered.append(
                self._agent.register_memory(
                    [(buf.ctypes.data, cls, 0, "")], "DRAM", backends=["OBJ"]
                )
            )
            return buf

    def _release(self, buf: np.ndarray) -> None:
        with self._lock:
            if (
                not self._closed
            ):  # once closed, the _Release holds every buffer until the agent is freed
                self._free[buf.nbytes].append(buf)

    def _dev_id(self, path: str) -> int:
        """The OBJ devId registered for ``path`` (registered on first use; bounded LRU)."""
        with self._lock:
            dev = self._dev_ids.get(path)
            if dev is not None:
                self._dev_ids.move_to_end(path)
                return dev
            dev = next(self._next_dev)
            self._obj_regs[path] = self._agent.register_memory(
                [(0, 0, dev, path)], "OBJ", backends=["OBJ"]
            )
            self._dev_ids[path] = dev
            while len(self._dev_ids) > REGISTRATIONS:
                old, _ = self._dev_ids.popitem(last=False)
                self._agent.deregister_memory(self._obj_regs.pop(old), backends=["OBJ"])
            return dev

    # -- transfers ------------------------------------------------------------

    async def _transfer(
        self, op: str, buf: np.ndarray, length: int, path: str, offset: int
    ) -> None:
        """One NIXL transfer: ``buf[:length]`` <-> bytes ``[offset, offset+length)`` of ``path``.

        On success the caller still owns ``buf``. On failure ``buf`` is taken: back to the
        free list, parked with its transfer if that still runs (see the module docstring), or
        kept aside for good if NIXL could not release the transfer.
        """
        with self._lock:
            closed = self._closed
            if not closed:
                self._active += 1  # a closed agent is freed only once this is back to 0
                agent = self._agent
        if closed:
            raise RuntimeError("NIXL transport closed")
        handle = local = remote = None
        ok = False
        try:
            self._reap(agent)
            dev = self._dev_id(path)
            with self._lock:
                local = agent.get_xfer_descs([(buf.ctypes.data, length, 0)], "DRAM")
                remote = agent.get_xfer_descs([(offset, length, dev)], "OBJ")
                handle = agent.initialize_xfer(op, local, remote, agent.name, backends=["OBJ"])
                state = agent.transfer(handle)
            deadline = time.monotonic() + self._s.timeout_s
            delay = 0.0001
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"NIXL {op} of {path} still running after {self._s.timeout_s}s"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.004)
                with self._lock:
                    state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL {op} of {path} failed ({state})")
            ok = True
        finally:
            try:
                self._finish(agent, handle, buf, ok)
            finally:
                with self._lock:
                    self._active -= 1
            # no frame (a traceback a caller keeps) may hold the handle, and through it the agent
            handle = local = remote = agent = None

    def _finish(self, agent: Any, handle: Any, buf: np.ndarray, ok: bool) -> None:
        """Release a transfer's handle; on failure give ``buf`` back, unless the transfer still
        runs (parked: the SDK may still write into it) or could not be released (stranded)."""
        if handle is None:  # never posted
            self._release(buf)
            return
        with self._lock:
            if not ok and _state(agent, handle) == "PROC":
                self._parked.append((handle, buf))
                return
        try:
            with self._lock:
                agent.release_xfer_handle(handle)
            released = True
        except Exception:
            released = False
        if not ok:
            if released:
                self._release(buf)
            else:  # the plugin may still write into it: keep it alive, never reuse it
                self._stranded.append(buf)

    def _reap(self, agent: Any) -> None:
        """Release parked transfers that have ended, and reuse their buffers."""
        with self._lock:
            ended = [(h, b) for h, b in self._parked if _state(agent, h) != "PROC"]
            self._parked[:] = [p for p in self._parked if p not in ended]
        for handle, buf in ended:
            self._finish(agent, handle, buf, ok=False)

    async def read(self, path: str, start: int, end: int | None) -> bytes | None:
        for attempt in range(2):
            size = await self._sizes.get(path, fresh=attempt > 0)
            if size is None:
                return None
            stop = size if end is None else min(end, size)
            if stop <= start:
                return b""
            buf = self._buffer(stop - start)
            try:
                await self._transfer("READ", buf, stop - start, path, start)
            except Exception:  # the buffer went back to the pool
                if attempt:
                    raise
                continue  # deleted or rewritten elsewhere: look the size up again, retry once
            data = buf[: stop - start].tobytes()
            self._release(buf)
            return data
        return None  # pragma: no cover

    async def write(self, path: str, data: bytes) -> None:
        buf = self._buffer(len(data))
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        await self._transfer("WRITE", buf, len(data), path, 0)
        self._release(buf)
        self._sizes.remember(path, len(data))

    async def exists(self, path: str) -> bool:
        # Not NIXL's queryMem: it is a blocking call (the event loop would wait on the HEAD),
        # and against a dead endpoint it blocked for ~25 s of SDK retries here. One async
        # HEAD answers, and teaches the size for the read that usually follows.
        return await self._sizes.get(path, fresh=True) is not None

    async def remove(self, paths: Sequence[str]) -> None:
        for path in paths:
            self._sizes.remember(path, None)
        await self._meta.remove(paths)

    async def close(self) -> None:
        """Stop using the agent and hand it to a :class:`_Release` (returns at once; the agent is
        freed off the event loop once its transfers ended, see the module docstring)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # the parked list is shared, not copied: a transfer still in flight parks into it
            self.release = _Release(
                self,
                self._agent,
                self._parked,
                [*self._obj_regs.values(), *self._registered],
                [*self._buffers, *self._stranded],
            )
            self._agent = None
            self._obj_regs.clear()
            self._dev_ids.clear()
            self._registered.clear()
            self._free.clear()
            self._buffers.clear()
            self._stranded.clear()
        self.release.start()
        await self._meta.close()


def _backend_params(s: S3Settings) -> dict[str, str]:
    """The OBJ backend's parameters for the tier's bucket, endpoint and credentials."""
    params = {
        "bucket": s.bucket,
        "region": s.region,
        "use_virtual_addressing": "true" if s.addressing == "virtual" else "false",
    }
    if s.endpoint:
        params["endpoint_override"] = s.endpoint
        params["scheme"] = "http" if s.endpoint.startswith("http://") else "https"
    if s.access_key_id and s.secret_access_key:
        params["access_key"] = s.access_key_id.get_secret_value()
        params["secret_key"] = s.secret_access_key.get_secret_value()
    return params


class _Sizes:
    """Object sizes (NIXL's OBJ plugin does not report them): a bounded LRU fed by this
    transport's writes, else one async HEAD through ``meta``. Thread-safe."""

    def __init__(self, meta: ObstoreTransport, entries: int = SIZES):
        self._meta, self._entries = meta, entries
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, path: str, size: int | None) -> None:
        with self._lock:
            if size is None:
                self._sizes.pop(path, None)
                return
            self._sizes[path] = size
            self._sizes.move_to_end(path)
            while len(self._sizes) > self._entries:
                self._sizes.popitem(last=False)

    async def get(self, path: str, fresh: bool = False) -> int | None:
        """The size of ``path`` (None: absent); ``fresh`` asks the store even if one is cached."""
        with self._lock:
            size = None if fresh else self._sizes.get(path)
        if size is None:
            size = await self._meta.size(path)
            self.remember(path, size)
        return size


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _sdk_retries(max_retries: int):
    """The AWS SDK in NIXL's OBJ plugin retries ``max_retries`` times, in "standard" mode.

    The plugin has no retry setting; its SDK reads ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` when
    the backend's client is built (its default "legacy" mode ignores ``AWS_MAX_ATTEMPTS`` and
    retries 10 times, ~25 s against a dead endpoint, one request after another). Set only while
    the backend is created, then restored: the rest of the process sees its own environment.
    """
    wanted = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": str(max_retries + 1)}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _state(agent: Any, handle: Any) -> str:
    """A transfer's state; "ERR" if NIXL cannot say (then it is not running, as far as we know).
    The caller holds its transport's lock."""
    try:
        return agent.check_xfer_state(handle)
    except Exception:
        return "ERR"


class _Release:
    """Frees one closed transport's NIXL agent, in a daemon thread, once no transfer runs.

    Owns the references the transport had: the agent, its parked (running) transfers, its
    registrations and every registered buffer (registered memory must outlive NIXL's use of
    it). Waits until the transport has no transfer in flight and no parked one running, up to
    ``drain_s``. ``done`` is set when the thread finished; ``outcome`` says how: ``"freed"``
    (deregistered, references dropped: the agent is freed right here, or -- if a caller's
    traceback still holds a handle -- later by the garbage collector, cheaply either way) or
    ``"kept"`` (transfers still ran after ``drain_s``: the thread keeps everything for the life
    of the process, and exit does not free it either).
    """

    def __init__(
        self,
        transport: NixlTransport,
        agent: Any,
        parked: list,
        registrations: list,
        buffers: list,
        drain_s: float = DRAIN_S,
    ):
        self._transport, self._agent, self._parked = transport, agent, parked
        self._regs, self._buffers = registrations, buffers
        self.drain_s = drain_s
        self.done = threading.Event()
        self.outcome = ""
        self.seconds = 0.0

    def start(self) -> None:
        threading.Thread(target=self._run, name="kvstrata-nixl-release", daemon=True).start()

    def _run(self) -> None:
        started = time.monotonic()
        while self._busy() and time.monotonic() - started < self.drain_s:
            time.sleep(0.05)
        self.seconds = time.monotonic() - started
        if self._busy():
            self.outcome = "kept"
            log.warning(
                "NIXL agent kept for the life of the process: transfers still running after %.0f s",
                self.seconds,
            )
            self.done.set()
            # never returns: a daemon thread's frame is not freed, even at exit
            threading.Event().wait()
        self._free()
        self.outcome = "freed"
        self.seconds = time.monotonic() - started
        self.done.set()

    def _busy(self) -> bool:
        """Whether a transfer is in flight or parked and still running."""
        t = self._transport
        with t._lock:
            return t._active > 0 or any(_state(self._agent, h) == "PROC" for h, _ in self._parked)

    def _free(self) -> None:
        agent, lock = self._agent, self._transport._lock
        with lock:
            parked, self._parked[:] = list(self._parked), []
        for handle, _ in parked:
            try:
                agent.release_xfer_handle(handle)
            except Exception:  # ended but not releasable: its buffer goes with the agent
                log.debug("NIXL transfer not released at close", exc_info=True)
        for reg in self._regs:
            try:
                agent.deregister_memory(reg, backends=["OBJ"])
            except Exception:
                log.debug("NIXL deregistration failed at close", exc_info=True)
        # The last references: the plugin's destructor runs here, its SDK threads idle by now.
        self._agent = self._regs = self._transport = None
        agent = handle = reg = parked = None
        self._buffers = None  # registered memory, freed after the agent that used it
