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
import time
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENGINE = "engine"  # the engine's own prefix cache, counted as a tier
RECOMPUTE = "recompute"  # tokens nobody had: the remainder

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None, labels: Mapping[str, str] | None = None):
        self.registry = registry or CollectorRegistry()
        self.const = dict(labels or {})
        names = tuple(self.const)

        def counter(name, doc, labelnames):
            return Counter(name, doc, (*names, *labelnames), registry=self.registry)

        self.ops = counter("kvstrata_tier_ops", "Tier operations by result.", ("tier", "op", "result"))
        self.bytes = counter("kvstrata_tier_bytes", "Bytes moved to and from tiers.", ("tier", "direction"))
        self.latency = Histogram(
            "kvstrata_tier_latency_seconds", "Tier operation latency.", (*names, "tier", "op"),
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = counter("kvstrata_tokens", "Prompt tokens by who served them.", ("source",))
        self.lookups = counter("kvstrata_lookups", "Lookups by decision.", ("rule", "outcome"))
        self.evictions = counter("kvstrata_evictions", "Chunks evicted by capacity.", ("tier",))
        self.moves = counter("kvstrata_chunk_moves", "Promotions and demotions.", ("kind", "src", "dst"))
        self.bad_objects = counter("kvstrata_bad_objects", "Objects that failed verification.", ("tier", "reason"))
        self.save_dropped = counter("kvstrata_save_dropped", "Chunks not saved.", ("reason",))
        self.save_queue = Gauge("kvstrata_save_queue_depth", "Chunks waiting to be saved.", names,
                                registry=self.registry)
        self.load_seconds = Histogram(
            "kvstrata_load_seconds", "Wall time of one request's load, all tiers.", names,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.breaker_open = Gauge("kvstrata_breaker_open", "1 while a tier is skipped.", (*names, "tier"),
                                  registry=self.registry)

    def _l(self, family, **labels):
        return family.labels(**self.const, **labels)

    # -- recording (orchestrator only) ----------------------------------------

    def op(self, tier: str, op: str, result: str, seconds: float | None = None, n: int = 1) -> None:
        self._l(self.ops, tier=tier, op=op, result=result).inc(n)
        if seconds is not None:
            self._l(self.latency, tier=tier, op=op).observe(seconds)

    def moved_bytes(self, tier: str, direction: str, n: int) -> None:
        if n:
            self._l(self.bytes, tier=tier, direction=direction).inc(n)

    def served(self, source: str, tokens: int) -> None:
        if tokens:
            self._l(self.tokens, source=source).inc(tokens)

    def lookup(self, rule: str, outcome: str) -> None:
        self._l(self.lookups, rule=rule, outcome=outcome).inc()

    def located(self, tier: str, hits: int, misses: int) -> None:
        """A lookup asked ``tier`` about ``hits + misses`` chunks."""
        if hits:
            self._l(self.ops, tier=tier, op="lookup", result="hit").inc(hits)
        if misses:
            self._l(self.ops, tier=tier, op="lookup", result="miss").inc(misses)

    def loaded(self, seconds: float) -> None:
        (self.load_seconds.labels(**self.const) if self.const else self.load_seconds).observe(seconds)

    def evicted(self, tier: str, n: int) -> None:
        if n:
            self._l(self.evictions, tier=tier).inc(n)

    def moved(self, kind: str, src: str, dst: str, n: int = 1) -> None:
        self._l(self.moves, kind=kind, src=src, dst=dst).inc(n)

    def bad_object(self, tier: str, reason: str) -> None:
        self._l(self.bad_objects, tier=tier, reason=reason).inc()

    def dropped(self, reason: str, n: int = 1) -> None:
        self._l(self.save_dropped, reason=reason).inc(n)

    def queue_depth(self, depth: int) -> None:
        self.save_queue.labels(**self.const).set(depth) if self.const else self.save_queue.set(depth)

    def breaker(self, tier: str, is_open: bool) -> None:
        self._l(self.breaker_open, tier=tier).set(1 if is_open else 0)

    # -- reading ------------------------------------------------------------

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``{"name{label=value,...}": value}`` (counters as ``*_total``)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in self.const)
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def samples(self) -> list[dict]:
        """Every sample as ``{"name", "labels", "value"}`` (constant labels included)."""
        return [
            {"name": s.name, "labels": dict(s.labels), "value": s.value}
            for family in self.registry.collect() for s in family.samples if not s.name.endswith("_created")
        ]

    def save_snapshot(self, path: str | os.PathLike[str], **meta: str) -> Path:
        """Write every sample as JSON (atomically), with the time and ``meta``.

        A path ending in ``.jsonl`` is appended to instead, one snapshot a
        line: a time series for ``kvstrata report``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": 1, "time": time.time(), "pid": os.getpid(), **meta, "samples": self.samples()}
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
