"""Metric families, recorded only by the orchestrator.

Labelled, not multiplied: one family per kind of fact, with the tier, the
operation and the result as labels. Hit rate is derived (hits / lookups), not
stored. Each :class:`Telemetry` owns a Prometheus ``CollectorRegistry`` so
that two orchestrators in one process (vLLM's scheduler and worker roles when
they share a process) never collide; ``snapshot()`` gives plain numbers for
tests and the CLI; ``save_snapshot()`` writes them to a JSON file that
``kvstrata stats --snapshot`` and ``kvstrata report`` read.

Operations (``kvstrata_tier_ops_total{tier, op, result}``):

* ``op="lookup"``, ``result="hit"|"miss"``: chunks a read tier was asked
  about during a lookup and had / did not have (a chunk found in an earlier
  tier is not asked again). Per-tier hit rate = hit / (hit + miss).
* ``op="contains"|"get"|"put"|"delete"``, ``result="ok"|"error"|"timeout"|"skipped"``:
  tier calls (``skipped``: the tier's breaker was open); ``put`` also has
  ``present`` (already stored, not rewritten).
* ``op="read_chunk"``, ``result="hit"|"miss"``: chunks a load got / did not get.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENGINE = "engine"  # the engine's own prefix cache, counted as a tier
RECOMPUTE = "recompute"  # tokens nobody had: the remainder

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class Family:
    """One metric family: where it lives on :class:`Telemetry` and how it is exported."""

    attr: str
    name: str  # counters without ``_total`` (prometheus_client adds it)
    kind: str  # counter | gauge | histogram
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


#: every family kvstrata exports, in the standalone exporter and on vLLM's ``/metrics`` alike
FAMILIES = (
    Family(
        "ops",
        "kvstrata_tier_ops",
        "counter",
        "Tier operations by result.",
        ("tier", "op", "result"),
    ),
    Family(
        "bytes",
        "kvstrata_tier_bytes",
        "counter",
        "Bytes moved to and from tiers.",
        ("tier", "direction"),
    ),
    Family(
        "latency",
        "kvstrata_tier_latency_seconds",
        "histogram",
        "Tier operation latency.",
        ("tier", "op"),
        LATENCY_BUCKETS,
    ),
    Family(
        "tokens", "kvstrata_tokens", "counter", "Prompt tokens by who served them.", ("source",)
    ),
    Family("lookups", "kvstrata_lookups", "counter", "Lookups by decision.", ("rule", "outcome")),
    Family("evictions", "kvstrata_evictions", "counter", "Chunks evicted by capacity.", ("tier",)),
    Family(
        "moves",
        "kvstrata_chunk_moves",
        "counter",
        "Promotions and demotions.",
        ("kind", "src", "dst"),
    ),
    Family(
        "bad_objects",
        "kvstrata_bad_objects",
        "counter",
        "Objects that failed verification.",
        ("tier", "reason"),
    ),
    Family("save_dropped", "kvstrata_save_dropped", "counter", "Chunks not saved.", ("reason",)),
    Family("save_queue", "kvstrata_save_queue_depth", "gauge", "Chunks waiting to be saved."),
    Family(
        "load_seconds",
        "kvstrata_load_seconds",
        "histogram",
        "Wall time of one request's load, all tiers.",
        (),
        LATENCY_BUCKETS,
    ),
    Family(
        "breaker_open", "kvstrata_breaker_open", "gauge", "1 while a tier is skipped.", ("tier",)
    ),
    Family(
        "requests",
        "kvstrata_requests",
        "counter",
        "Requests by where their prompt prefix came from "
        "(the tier that loaded most of it, engine, recompute).",
        ("source",),
    ),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}

#: observations an outbox keeps between two drains (more are counted, not kept)
OUTBOX_OBSERVATIONS = 4096


class Telemetry:
    def __init__(
        self, registry: CollectorRegistry | None = None, labels: Mapping[str, str] | None = None
    ):
        self.registry = registry or CollectorRegistry()
        self.const = dict(labels or {})
        names = tuple(self.const)
        self._family: dict[int, Family] = {}
        for f in FAMILIES:
            kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[f.kind]
            extra = {"buckets": f.buckets} if f.buckets else {}
            metric = kind(f.name, f.doc, (*names, *f.labels), registry=self.registry, **extra)
            setattr(self, f.attr, metric)
            self._family[id(metric)] = f
        # changes since the last drain(), kept once forward() is called (vLLM's /metrics)
        self._outbox: dict | None = None
        self._outbox_lock = threading.Lock()

    def _l(self, family, **labels):
        return family.labels(**self.const, **labels) if (self.const or labels) else family

    def _inc(self, family, n: float = 1, **labels) -> None:
        self._l(family, **labels).inc(n)
        if self._outbox is not None:
            self._out("counters", family, labels, n)

    def _set(self, family, value: float, **labels) -> None:
        self._l(family, **labels).set(value)
        if self._outbox is not None:
            self._out("gauges", family, labels, value)

    def _observe(self, family, value: float, **labels) -> None:
        self._l(family, **labels).observe(value)
        if self._outbox is not None:
            self._out("observations", family, labels, value)

    # -- forwarding (to another process's registry: vLLM's front end) ---------

    def forward(self) -> None:
        """From now on keep every change for :meth:`drain` (a connector forwards them to vLLM)."""
        with self._outbox_lock:
            if self._outbox is None:
                self._outbox = _empty_outbox()

    def _out(self, kind: str, family, labels: Mapping[str, str], value: float) -> None:
        f = self._family[id(family)]
        key = (f.name, tuple(str(labels[n]) for n in f.labels))
        with self._outbox_lock:
            box = self._outbox
            if kind == "counters":
                box[kind][key] = box[kind].get(key, 0) + value
            elif kind == "gauges":
                box[kind][key] = value
            elif len(box[kind]) < OUTBOX_OBSERVATIONS:
                box[kind].append((*key, value))

    def drain(self) -> dict | None:
        """Changes since the last drain as plain data (lists, strings, numbers), or None if none.

        ``{"counters": [[name, [label values], increment]], "gauges": [[name, [values], value]],
        "observations": [[name, [values], value]]}``, label values in the family's label order
        (:data:`FAMILIES`). Only after :meth:`forward`.
        """
        with self._outbox_lock:
            box = self._outbox
            if box is None or not any(box.values()):
                return None
            self._outbox = _empty_outbox()
        return {
            "counters": [[name, list(values), n] for (name, values), n in box["counters"].items()],
            "gauges": [[name, list(values), v] for (name, values), v in box["gauges"].items()],
            "observations": [[name, list(values), v] for name, values, v in box["observations"]],
        }

    # -- recording (orchestrator only) ----------------------------------------

    def op(self, tier: str, op: str, result: str, seconds: float | None = None, n: int = 1) -> None:
        self._inc(self.ops, n, tier=tier, op=op, result=result)
        if seconds is not None:
            self._observe(self.latency, seconds, tier=tier, op=op)

    def moved_bytes(self, tier: str, direction: str, n: int) -> None:
        if n:
            self._inc(self.bytes, n, tier=tier, direction=direction)

    def served(self, source: str, tokens: int) -> None:
        if tokens:
            self._inc(self.tokens, tokens, source=source)

    def lookup(self, rule: str, outcome: str) -> None:
        self._inc(self.lookups, rule=rule, outcome=outcome)

    def located(self, tier: str, hits: int, misses: int) -> None:
        """A lookup asked ``tier`` about ``hits + misses`` chunks."""
        if hits:
            self._inc(self.ops, hits, tier=tier, op="lookup", result="hit")
        if misses:
            self._inc(self.ops, misses, tier=tier, op="lookup", result="miss")

    def loaded(self, seconds: float) -> None:
        self._observe(self.load_seconds, seconds)

    def evicted(self, tier: str, n: int) -> None:
        if n:
            self._inc(self.evictions, n, tier=tier)

    def moved(self, kind: str, src: str, dst: str, n: int = 1) -> None:
        self._inc(self.moves, n, kind=kind, src=src, dst=dst)

    def bad_object(self, tier: str, reason: str) -> None:
        self._inc(self.bad_objects, tier=tier, reason=reason)

    def dropped(self, reason: str, n: int = 1) -> None:
        self._inc(self.save_dropped, n, reason=reason)

    def queue_depth(self, depth: int) -> None:
        self._set(self.save_queue, depth)

    def breaker(self, tier: str, is_open: bool) -> None:
        self._set(self.breaker_open, 1 if is_open else 0, tier=tier)

    def request(self, source: str) -> None:
        """One request finished; ``source`` served most of
        its prompt prefix (a tier, engine or recompute)."""
        self._inc(self.requests, source=source)

    # -- reading ------------------------------------------------------------

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``{"name{label=value,...}": value}`` (counters as ``*_total``)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(
                    f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in self.const
                )
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def samples(self) -> list[dict]:
        """Every sample as ``{"name", "labels", "value"}`` (constant labels included)."""
        return [
            {"name": s.name, "labels": dict(s.labels), "value": s.value}
            for family in self.registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    def save_snapshot(self, path: str | os.PathLike[str], **meta: str) -> Path:
        """Write every sample as JSON (atomically), with the time and ``meta``.

        A path ending in ``.jsonl`` is appended to instead, one snapshot a
        line: a time series for ``kvstrata report``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": 1,
            "time": time.time(),
            "pid": os.getpid(),
            **meta,
            "samples": self.samples(),
        }
        if path.suffix == ".jsonl":
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(doc) + "\n")
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def tokens_by_source(self) -> dict[str, float]:
        """Prompt tokens served so far per source (tiers, ``engine``, ``recompute``)."""
        out: dict[str, float] = {}
        for family in self.tokens.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.labels["source"]] = out.get(s.labels["source"], 0.0) + s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 if never recorded)."""
        v = self.registry.get_sample_value(name, {**self.const, **labels})
        return 0.0 if v is None else v


def _empty_outbox() -> dict:
    return {"counters": {}, "gauges": {}, "observations": []}


def load_snapshots(path: str | os.PathLike[str]) -> list[dict]:
    """The snapshots in a file written by :meth:`Telemetry.save_snapshot`, oldest first."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        doc = json.loads(text)
        docs = doc if isinstance(doc, list) else [doc]
    for doc in docs:
        if not isinstance(doc, dict) or "samples" not in doc:
            raise ValueError(f"{path}: not a kvstrata telemetry snapshot")
    return sorted(docs, key=lambda d: d.get("time", 0))
