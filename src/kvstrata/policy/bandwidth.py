"""The bandwidth scheduler: who gets how much of a shared link, and in what order.

A :class:`Link` is a tier's read path with a bandwidth budget (configured, or
the link's measured capacity). Every load reading through it opens a
:class:`Flow`; each layer group's bytes are submitted to the flow and complete
when the link has served them. The link is a fluid server: at every moment it
splits its capacity among flows with bytes waiting, as the *policy* says, and
re-splits whenever a transfer arrives or finishes, or a request's progress
changes (at most every ``tick_s``). Within a flow, transfers are served in the
order submitted (layer order).

Policies (``bandwidth.policy`` in the YAML):

* ``equal``: every waiting flow gets the same share (what TCP gives you).
* ``stall_aware``: ObjectCache's allocation. Each request is capped at the rate
  that just hides its transfers behind its compute (one layer's bytes per
  layer of compute; with layer groups, the next group's bytes per layer of
  compute the engine still holds); capacity left is split among the uncapped requests in
  proportion to the square root of their size, water-filling. A request is
  capped once its first layer has arrived (nothing hides the first layer).
* ``deadline`` (ours): requests are *ordered*, not just shared. A request
  that is behind its compute (the engine waits, or will wait, for its next
  layer) may take whatever is left; one that is ahead takes only its no-stall
  rate. The order: the least *exposed* transfer first -- the transfer time
  its remaining compute cannot hide (shortest remaining work minimises the
  mean added time to first token; a compute-bound request needs little
  bandwidth, but needs its first layers now); a request whose
  latency budget that order would miss moves ahead of requests that keep
  meeting theirs after it (it spends their slack, never makes anyone late).
  Capacity nobody takes is shared equally.

How rates follow the load (``bandwidth.sharing``):

* ``work_conserving`` (default): the split is redone at every event, among the
  flows with bytes waiting; bandwidth one request cannot use goes to the others.
  Under it ``equal`` is processor sharing.
* ``fixed``: a per-request rate limit. When a request starts loading, every open
  request's rate is set (from its steady demand: its size, and the no-stall rate
  of one layer per layer of compute) and kept until the next request starts
  (or, for a request the split gave nothing, until one leaves); bandwidth a
  request leaves unused -- it is ahead of its compute, or done -- idles. This is
  the model ObjectCache's allocation is stated in (one rate per request), and
  the one in which its stall-aware split beats equal shares; see
  docs/layerwise.md.

A policy is a pure function of :class:`Demand` values, so it is tested and
benchmarked without a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

PolicyName = Literal["equal", "stall_aware", "deadline"]
POLICIES: tuple[PolicyName, ...] = ("equal", "stall_aware", "deadline")
Sharing = Literal["work_conserving", "fixed"]


@dataclass(frozen=True)
class Demand:
    """One request as a policy sees it.

    ``no_stall_bps``: the rate that delivers its next transfer (a layer group) before the
    engine runs out of layers to compute: the layers it holds hide that much transfer.
    ``behind``: the engine waits, or is about to wait, for this request's next layer.
    ``deadline``: absolute time (the link's clock) its latency budget ends, or None.
    ``started``: its first layer has arrived (its compute is running).
    ``compute_left_s``: engine compute still ahead of it, which later transfers can hide behind.
    ``layer_bytes``: bytes of one layer (every chunk of the request).
    """

    flow: int
    remaining_bytes: float
    size_bytes: float
    no_stall_bps: float
    behind: bool
    deadline: float | None = None
    started: bool = True
    compute_left_s: float = 0.0
    layer_bytes: float = 0.0

    def exposed_s(self, capacity: float) -> float:
        """Transfer time at full speed that its compute cannot hide (at least its next layer):
        what bandwidth given to this request buys."""
        return max(
            self.remaining_bytes / capacity - self.compute_left_s, self.layer_bytes / capacity
        )


class SharePolicy(Protocol):
    name: str

    def rates(self, demands: Sequence[Demand], capacity: float, now: float) -> dict[int, float]:
        """Bytes/s per flow; the sum is at most ``capacity``."""


class EqualShare:
    name = "equal"

    def rates(self, demands: Sequence[Demand], capacity: float, now: float) -> dict[int, float]:
        return {d.flow: capacity / len(demands) for d in demands} if demands else {}


class StallAware:
    name = "stall_aware"

    def rates(self, demands: Sequence[Demand], capacity: float, now: float) -> dict[int, float]:
        out: dict[int, float] = {}
        open_ = list(demands)
        left = capacity
        while open_:
            weight = {d.flow: math.sqrt(max(d.size_bytes, 1.0)) for d in open_}
            total = sum(weight.values())
            # the first layer hides behind nothing: a request is capped once its compute runs
            capped = [
                d for d in open_ if d.started and left * weight[d.flow] / total >= d.no_stall_bps
            ]
            if not capped:
                out.update({d.flow: left * weight[d.flow] / total for d in open_})
                return out
            for d in capped:
                out[d.flow] = d.no_stall_bps
                left -= d.no_stall_bps
                open_.remove(d)
        return _spread(out, left)


class Deadline:
    name = "deadline"

    def rates(self, demands: Sequence[Demand], capacity: float, now: float) -> dict[int, float]:
        out: dict[int, float] = {}
        left = capacity
        for d in self.order(demands, capacity, now):
            want = left if d.behind else min(d.no_stall_bps, left)
            out[d.flow] = want
            left -= want
        return _spread(out, left)

    @staticmethod
    def order(demands: Sequence[Demand], capacity: float, now: float) -> list[Demand]:
        """Least exposed work first (transfer its compute cannot hide: a compute-bound request
        needs little bandwidth, but needs it now); a request whose deadline that order would miss
        moves ahead only of requests that still meet their own deadlines (or have none) after it:
        it spends others' slack, never makes anyone late, and never delays a lost cause."""
        order = sorted(demands, key=lambda d: d.exposed_s(capacity))
        for d in sorted((d for d in order if d.deadline is not None), key=lambda d: d.deadline):
            at = order.index(d)
            if _finish(order, at, capacity, now) <= d.deadline:
                continue
            for pos in range(at):
                moved = order[:pos] + [d] + [o for o in order[pos:] if o is not d]
                if _finish(moved, pos, capacity, now) <= d.deadline and all(
                    o.deadline is None or _finish(moved, k, capacity, now) <= o.deadline
                    for k, o in enumerate(moved)
                    if pos < k <= at
                ):
                    order = moved
                    break
        return order


def _finish(order: Sequence[Demand], k: int, capacity: float, now: float) -> float:
    """When the k-th request's transfer ends if the link serves ``order`` one after another."""
    return now + sum(d.remaining_bytes for d in order[: k + 1]) / capacity


def _spread(out: dict[int, float], left: float) -> dict[int, float]:
    """Share capacity nobody asked for equally (work conserving: it only moves data sooner)."""
    if left > 0 and out:
        extra = left / len(out)
        return {f: r + extra for f, r in out.items()}
    return out


def make_share_policy(name: str) -> SharePolicy:
    if name == "equal":
        return EqualShare()
    if name == "stall_aware":
        return StallAware()
    if name == "deadline":
        return Deadline()
    raise ValueError(f"unknown bandwidth policy {name!r} (known: {', '.join(POLICIES)})")


# -- the link ---------------------------------------------------------------------------


@dataclass
class _Transfer:
    remaining: float
    done: asyncio.Future


@dataclass(eq=False)
class Flow:
    """One request's share of a link. ``progress()`` ->
    (layers delivered, layers the engine consumed)."""

    id: int
    size_bytes: float
    layer_bytes: float
    compute_s_per_layer: float
    deadline: float | None
    progress: Callable[[], tuple[int, int]] = lambda: (0, 0)
    overhead_s: float = (
        0.0  # what reading a group costs after the link admits it (the GETs' latency)
    )
    group_layers: tuple[int, ...] = ()  # layers per read, in order (empty: one layer each)
    sent: float = 0.0
    queue: deque = field(default_factory=deque)

    def _shape(self) -> tuple[int, float]:
        """Layers in the request, and compute seconds per layer (never zero)."""
        n_layers = round(self.size_bytes / self.layer_bytes) if self.layer_bytes else 1
        return n_layers, max(self.compute_s_per_layer, 1e-6)

    def demand(self) -> Demand:
        delivered, consumed = self.progress()
        n_layers, c = self._shape()
        held = delivered - consumed  # layers delivered the engine has not started on
        head = self.queue[0].remaining if self.queue else self.layer_bytes
        # the head group must be admitted before the engine finishes what it holds (half a layer
        # is running), less the time its GETs take after admission
        time_left = (held + 0.5) * c - self.overhead_s
        no_stall = head / time_left if held >= 0 and time_left > 0 else math.inf
        return Demand(
            self.id,
            max(self.size_bytes - self.sent, 0.0),
            self.size_bytes,
            no_stall_bps=no_stall,
            behind=held < 1 or no_stall == math.inf,
            deadline=self.deadline,
            started=delivered > 0,
            compute_left_s=max(n_layers - max(consumed, 1), 0) * c,
            layer_bytes=self.layer_bytes,
        )

    def steady_demand(self) -> Demand:
        """The request over its whole load, as a per-request rate is set from: the no-stall rate
        delivers each read while the engine computes the layers of the one before (one layer's
        bytes per layer of compute, ObjectCache's X_{l+1} = C_l, when every read is one layer)."""
        n_layers, c = self._shape()
        sizes = self.group_layers or (1,)
        ratio = max([nxt / cur for cur, nxt in zip(sizes, sizes[1:], strict=False)], default=1.0)
        return Demand(
            self.id,
            max(self.size_bytes - self.sent, 0.0),
            self.size_bytes,
            no_stall_bps=ratio * self.layer_bytes / c,
            behind=False,
            deadline=self.deadline,
            started=True,
            compute_left_s=(n_layers - 1) * c,
            layer_bytes=self.layer_bytes,
        )


class Link:
    """A bandwidth budget shared by flows, split by a policy. All methods run on one event loop."""

    def __init__(
        self,
        capacity_bps: float | Callable[[], float],
        policy: SharePolicy | str = "deadline",
        tick_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        sharing: Sharing = "work_conserving",
    ):
        """``capacity_bps``: bytes/s, or a function giving the current estimate (a measured link).
        ``sharing``: see the module's docstring."""
        if not callable(capacity_bps) and capacity_bps <= 0:
            raise ValueError("capacity must be positive")
        if sharing not in ("work_conserving", "fixed"):
            raise ValueError(f"unknown sharing {sharing!r} (known: work_conserving, fixed)")
        self.sharing = sharing
        self._fixed: dict[
            int, float
        ] = {}  # sharing=fixed: each open flow's rate, set when the newest started
        self._capacity = capacity_bps
        self.policy = make_share_policy(policy) if isinstance(policy, str) else policy
        self.tick_s = tick_s
        self.clock = clock
        self._flows: dict[int, Flow] = {}
        self._ids = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.served_bytes = 0.0

    def open(
        self,
        size_bytes: float,
        layer_bytes: float,
        compute_s_per_layer: float,
        deadline: float | None = None,
        progress: Callable[[], tuple[int, int]] | None = None,
        overhead_s: float = 0.0,
        group_layers: Sequence[int] = (),
    ) -> Flow:
        self._ids += 1
        flow = Flow(
            self._ids,
            size_bytes,
            layer_bytes,
            compute_s_per_layer,
            deadline,
            overhead_s=overhead_s,
            group_layers=tuple(group_layers),
        )
        if progress is not None:
            flow.progress = progress
        self._flows[flow.id] = flow
        return flow

    def close(self, flow: Flow) -> None:
        """Forget a flow; transfers it still has fail with CancelledError."""
        self._flows.pop(flow.id, None)
        while flow.queue:
            t = flow.queue.popleft()
            if not t.done.done():
                t.done.cancel()
        self._poke()

    @property
    def capacity(self) -> float:
        value = self._capacity() if callable(self._capacity) else self._capacity
        return max(value, 1.0)

    @property
    def open_flows(self) -> int:
        return len(self._flows)

    def submit(self, flow: Flow, nbytes: float) -> asyncio.Future:
        """Queue ``nbytes`` for ``flow`` behind its earlier
        transfers; the future completes when served."""
        loop = asyncio.get_running_loop()
        t = _Transfer(float(nbytes), loop.create_future())
        if nbytes <= 0:
            t.done.set_result(None)
            return t.done
        flow.queue.append(t)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve())
        self._poke()
        return t.done

    async def transfer(self, flow: Flow, nbytes: float) -> None:
        """Return once the link has served ``nbytes`` to ``flow`` (after its earlier transfers)."""
        await self.submit(flow, nbytes)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _serve(self) -> None:
        last = self.clock()
        rates: dict[int, float] = {}
        while True:
            now = self.clock()
            self._advance(rates, now - last)
            last = now
            waiting = [f for f in self._flows.values() if f.queue]
            if not waiting:
                if not self._flows:
                    self._task = None
                    return
                rates = {}
                self._wake.clear()
                await self._wake.wait()
                last = self.clock()
                continue
            rates = self._rates(waiting, now)
            finish = [f.queue[0].remaining / rates[f.id] for f in waiting if rates.get(f.id, 0) > 0]
            timeout = min([self.tick_s, *finish])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 1e-4))

    def _rates(self, waiting: list[Flow], now: float) -> dict[int, float]:
        if self.sharing == "work_conserving":
            return self.policy.rates([f.demand() for f in waiting], self.capacity, now)
        started = any(fid not in self._fixed for fid in self._flows)
        # a request the last split gave nothing (deadline orders) gets a rate when another leaves
        starved = (
            not started
            and self._fixed.keys() != self._flows.keys()
            and any(self._fixed[f] <= 0 for f in self._flows)
        )
        if started or starved:  # set every open request's rate
            self._fixed = self.policy.rates(
                [f.steady_demand() for f in self._flows.values()], self.capacity, now
            )
        return {f.id: self._fixed[f.id] for f in waiting}

    def _advance(self, rates: Mapping[int, float], elapsed: float) -> None:
        for fid, rate in rates.items():
            flow = self._flows.get(fid)
            if flow is None or not flow.queue:
                continue
            budget = rate * elapsed
            while flow.queue and budget > 0:
                head = flow.queue[0]
                step = min(head.remaining, budget)
                head.remaining -= step
                budget -= step
                flow.sent += step
                self.served_bytes += step
                if head.remaining <= rate * 1e-4:  # within 0.1 ms: timers are not finer
                    flow.sent += head.remaining  # the read is done: all its bytes count as served
                    self.served_bytes += head.remaining
                    head.remaining = 0.0
                    flow.queue.popleft()
                    if not head.done.done():
                        head.done.set_result(None)
                else:
                    break
