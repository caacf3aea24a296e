"""Asynchronous loads: a request's KV is read between engine steps while the others keep decoding.

A synchronous load (the default path of :mod:`~kvstrata.connectors.vllm_worker`)
runs inside the forward pass: attention of layer l waits for layer l, and the
whole batch waits with it. That is the fastest way to a first token when the
request is alone or its tier is fast (DRAM, local disk: the reads hide behind
compute). Against a slow tier (Redis or S3 behind a slow link) it stalls the
decode steps of every running request for as long as the read takes.

An asynchronous load returns ``load_async=True`` from
``get_num_new_matched_tokens``: vLLM allocates the request's blocks, parks it
in ``WAITING_FOR_REMOTE_KVS`` and keeps stepping the others. The worker starts
the read (:meth:`Orchestrator.load`, on the background loop), and at the end
of every step (``get_finished``) places the loads that have arrived into their
pages and reports them finished; vLLM schedules the request at its next step
with the loaded tokens computed.

Who decides (:func:`wants_async`, scheduler side): a request's hint
``load: async|sync`` (``kv_transfer_params``) first; else the connector's
``async_load`` setting (``kv_connector_extra_config``: ``auto``, the default,
``always`` or ``never``); in ``auto`` a load goes asynchronous when other
requests are running, it reads from a remote tier (not ``memory`` or
``disk``), and the cost model expects a synchronous load to stall the batch
by at least ``async_min_stall_ms`` (its estimated time to first token minus
the request's own compute). A request alone is loaded layer-wise, latency
first. Local tiers stay synchronous: their loads are the worker's own CPU and
memory work (copies, checks, decoding), which an asynchronous load cannot
overlap with the forward pass on a CPU build and which would cost the request
at least one more engine step; a remote tier's time is mostly waiting on the
network, which is what an asynchronous load hides.

Deadlines: an asynchronous load not complete by its deadline (the request's
``budget_ms``, else ``orchestrator.default_budget_ms``, counted from the
load's start) is abandoned: chunks fully read are placed, the rest are
reported through ``get_block_ids_with_load_errors`` in the same step as the
request's ``finished_recving``, and vLLM recomputes from the first missing
block (kvstrata sets ``kv_load_failure_policy=recompute``). Never a failed
request. A request that comes back to the scheduler after its load was
abandoned is not loaded again (answer 0). A request aborted while its load
runs is reported finished at once, nothing placed (vLLM holds its blocks
until then).

Threads: :class:`AsyncScheduler` runs on vLLM's scheduler thread;
:class:`AsyncLoads` on the worker's engine thread (``start_load_kv`` and
``get_finished``), reading handles the background loop fills. Pages are
written only on the engine thread, between forward passes, so an abandoned
load can never write into blocks vLLM has handed to another request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from kvstrata.connectors.vllm_meta import LoadSpec
from kvstrata.plan import LoadHandle

log = logging.getLogger(__name__)

Mode = Literal["auto", "always", "never"]
MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class AsyncSettings:
    """``kv_connector_extra_config`` keys ``async_load`` and ``async_min_stall_ms``."""

    mode: Mode = "auto"
    min_stall_ms: float = 50.0

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> AsyncSettings:
        mode = str(extra.get("async_load", "auto")).lower()
        if mode not in MODES:
            raise ValueError(f"kvstrata: async_load must be one of {MODES}, not {mode[:40]!r}")
        try:
            stall = float(extra.get("async_min_stall_ms", cls.min_stall_ms))
        except (TypeError, ValueError) as exc:
            raise ValueError("kvstrata: async_min_stall_ms must be a number") from exc
        if not 0 <= stall <= 3_600_000:
            raise ValueError("kvstrata: async_min_stall_ms must be in [0, 3600000]")
        return cls(mode, stall)  # type: ignore[arg-type]


#: tier kinds whose loads are local work, never worth an asynchronous load in ``auto``
LOCAL_KINDS = frozenset({"memory", "disk"})


def wants_async(settings: AsyncSettings, plan, others_running: int, remote: bool = True) -> bool:
    """Load ``plan`` asynchronously? ``remote``: it reads from a tier that is not local
    (see the module docstring for the rule)."""
    if not plan.chunks:
        return False
    hint = str(plan.ctx.hints.get("load", "")).lower()
    if hint in ("async", "sync"):
        return hint == "async"
    if settings.mode != "auto":
        return settings.mode == "always"
    if others_running == 0 or plan.choice is None or not remote:
        return False
    return stall_s(plan.choice) * 1e3 >= settings.min_stall_ms


def stall_s(choice) -> float:
    """What a synchronous load adds to the step that carries it: TTFT beyond the own compute."""
    return max(choice.ttft_s - choice.compute_s, 0.0)


@dataclass(frozen=True)
class AsyncLoad:
    """An asynchronous load for the worker: the load itself and how long it may take."""

    spec: LoadSpec
    deadline_s: float


# -- scheduler side ---------------------------------------------------------------------


class AsyncScheduler:
    """The scheduler's part: decide, hand loads to the worker, learn how they ended.

    Works on the scheduler side's per-request states (``vllm_scheduler._Request``:
    ``plan``, ``request``, ``block_ids``, ``load_pending``, ``loaded``,
    ``load_async``, ``async_abandoned``).
    """

    def __init__(
        self, settings: AsyncSettings, default_budget_ms: float, kinds: dict[str, str] | None = None
    ):
        self.settings = settings
        self.default_budget_ms = default_budget_ms
        self.kinds = dict(kinds or {})  # tier name -> kind
        self._queued: dict[str, Any] = {}  # req_id -> state whose async load is to be handed out
        self._loading: dict[str, Any] = {}  # req_id -> state whose async load runs
        self._abandoned: set[str] = set()  # requests whose async load missed its deadline
        self.started = 0
        self.abandoned = 0

    def answer(self, state, tokens: int, states: Iterable) -> tuple[int, bool]:
        """What ``get_num_new_matched_tokens`` returns for a planned request."""
        if tokens <= 0:
            return 0, False
        rid = state.request.request_id
        if rid in self._abandoned:  # it came back after an abandoned load: recompute, never again
            return 0, False
        running = sum(1 for s in states if s.request.request_id != rid and _is_running(s.request))
        remote = any(self.kinds.get(c.tier) not in LOCAL_KINDS for c in state.plan.chunks)
        state.load_async = wants_async(self.settings, state.plan, running, remote)
        return tokens, state.load_async

    def after_alloc(self, state) -> None:
        """vLLM allocated the request's blocks; an async load goes out with the next metadata."""
        rid = state.request.request_id
        if state.load_pending and state.load_async:
            self._queued[rid] = state
        else:
            self._queued.pop(rid, None)

    def take(self) -> list:
        """States whose async load goes to the worker in this step's metadata."""
        out = list(self._queued.values())
        self._queued.clear()
        for state in out:
            self._loading[state.request.request_id] = state
            self.started += 1
        return out

    def deadline_s(self, plan) -> float:
        budget = plan.ctx.budget_ms if plan.ctx.budget_ms is not None else self.default_budget_ms
        return max(budget, 0.0) / 1e3

    def finished(self, output) -> None:
        """Learn from the worker's report which async loads ended and which were abandoned."""
        invalid = set(getattr(output, "invalid_block_ids", None) or ())
        failed = set(getattr(output, "failed_recving", None) or ())
        for rid in getattr(output, "finished_recving", None) or ():
            state = self._loading.pop(rid, None)
            if state is None:
                continue
            if rid in failed or invalid.intersection(state.block_ids):
                self._abandoned.add(rid)
                state.async_abandoned = True
                state.loaded = False
                self.abandoned += 1
                state.plan = dataclasses.replace(
                    state.plan, chunks=(), reason="async load abandoned: recomputed"
                )

    def forget(self, req_id: str) -> None:
        self._queued.pop(req_id, None)
        self._loading.pop(req_id, None)
        self._abandoned.discard(req_id)


def _is_running(request) -> bool:
    from vllm.v1.request import RequestStatus

    return request.status == RequestStatus.RUNNING


# -- worker side ------------------------------------------------------------------------


@dataclass
class _Running:
    spec: LoadSpec
    handle: LoadHandle
    deadline: float


@dataclass
class AsyncLoads:
    """The worker's part: start async loads, and each step report those that ended.

    ``place(spec, handle)`` is bound to the worker side: it writes every
    delivered layer of a finished load into the request's pages and returns
    the block ids of chunks that failed.
    """

    worker: Any  # vllm_worker.WorkerSide
    _running: dict[str, _Running] = field(default_factory=dict)
    _errors: set[int] = field(default_factory=set)

    def start(self, loads: list[AsyncLoad]) -> None:
        now = time.monotonic()
        for load in loads:
            handle = self.worker.orch.load(self.worker.plan_of(load.spec))
            self._running[load.spec.req_id] = _Running(load.spec, handle, now + load.deadline_s)

    @property
    def pending(self) -> int:
        return len(self._running)

    def finished(self, finished_req_ids: set[str] | None = None) -> set[str] | None:
        """Requests whose async load ended (arrived, abandoned, or their request went away)."""
        if not self._running:
            return None
        gone = finished_req_ids or set()
        now = time.monotonic()
        done: set[str] = set()
        for rid, run in list(self._running.items()):
            if rid in gone:  # aborted while loading: nothing to place, vLLM frees the blocks
                run.handle.abort()
            elif not run.handle.done:
                if now < run.deadline:
                    continue
                log.warning(
                    "kvstrata: async load of %s not done within %.0f ms; abandoned, recomputing",
                    rid,
                    run.spec.budget_ms if run.spec.budget_ms is not None else -1,
                )
                run.handle.abort()
                self._errors |= self._place(run)
            else:
                self._errors |= self._place(run)
            del self._running[rid]
            done.add(rid)
        return done or None

    def errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def _place(self, run: _Running) -> set[int]:
        """Write every delivered chunk into its blocks; the blocks of the failed ones."""
        try:
            return self.worker.place_arrived(run.spec, run.handle)
        except Exception:  # a bad object or a bug costs a recompute, never the request
            log.exception("kvstrata: placing the async load of %s failed", run.spec.req_id)
            run.handle.fail([c[0] for c in run.spec.chunks])
            return self.worker.failed_blocks(run.spec)
