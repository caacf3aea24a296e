"""kvstrata's metrics inside vLLM: connector stats
for its log, Prometheus families on its ``/metrics``.

The path (vLLM 0.32): each role's connector returns :class:`StrataStats`
from ``get_kv_connector_stats`` every step -- the worker's (loads, saves) and
the scheduler's (lookups) are aggregated by the engine core and sent to the
API server process, where vLLM calls

* ``StrataStats.reduce()`` for its ``KV Transfer metrics: ...`` log line, and
* :class:`StrataPromMetrics` ``.observe()`` (built once by
  ``StrataConnector.build_prom_metrics``), which adds the changes to the
  ``kvstrata_*`` families of :data:`kvstrata.telemetry.metrics.FAMILIES`, registered
  with vLLM's own metric classes, so they appear on vLLM's ``/metrics`` with
  vLLM's ``model_name`` and ``engine`` labels.

What travels is the telemetry's outbox (:meth:`Telemetry.drain`): counter
increments, gauge values and histogram observations since the last step, as
lists of strings and numbers (vLLM pickles and msgpacks it between
processes). Nothing is sent on a step where nothing changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvstrata.telemetry.metrics import ENGINE, FAMILIES, RECOMPUTE

TELEMETRY = "telemetry"

_METRICS: dict[
    tuple, Any
] = {}  # one metric object per (name, labels) per process: vLLM may build twice
_METRICS_LOCK = threading.Lock()


def _merge_telemetry(mine: dict | None, other: dict | None) -> dict | None:
    """Two outbox drains as one: counters and observations add up, a gauge keeps the larger value
    (a breaker open in either process is open)."""
    if not mine:
        return other
    if not other:
        return mine
    gauges = {(g[0], tuple(g[1])): g[2] for g in mine.get("gauges", ())}
    for name, values, v in other.get("gauges", ()):
        key = (name, tuple(values))
        gauges[key] = max(gauges.get(key, v), v)
    return {
        "counters": [*mine.get("counters", ()), *other.get("counters", ())],
        "gauges": [[name, list(values), v] for (name, values), v in gauges.items()],
        "observations": [*mine.get("observations", ()), *other.get("observations", ())],
    }


def tokens_by_source(telemetry: dict | None) -> dict[str, int]:
    """Prompt tokens per source in an outbox drain."""
    out: dict[str, int] = {}
    for name, values, n in (telemetry or {}).get("counters", ()):
        if name == "kvstrata_tokens":
            out[values[0]] = out.get(values[0], 0) + int(n)
    return out


@dataclass
class StrataStats(KVConnectorStats):
    """Worker and scheduler -> front end: reads measured
    (for the cost model) and the telemetry outbox.

    ``data``: ``reads`` [(tier, seconds, bytes)], ``load_error_blocks`` int,
    ``telemetry`` (:meth:`kvstrata.telemetry.metrics.Telemetry.drain`). vLLM prints
    ``reduce()`` as ``KV Transfer metrics: ...`` per log interval. Aggregating
    builds new lists: vLLM hands the same payload to its log and to
    :class:`StrataPromMetrics`.
    """

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if key == TELEMETRY:
                self.data[key] = _merge_telemetry(self.data.get(key), value)
            elif isinstance(value, list):
                self.data[key] = [*self.data.get(key, ()), *value]
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        reads = self.data.get("reads", [])
        tokens = tokens_by_source(self.data.get(TELEMETRY))
        out: dict[str, int | float] = {
            "kvstrata_reads": len(reads),
            "kvstrata_read_MB": round(sum(r[2] for r in reads) / 1e6, 3),
            "kvstrata_load_error_blocks": self.data.get("load_error_blocks", 0),
        }
        for source in sorted(tokens, key=lambda s: (s in (ENGINE, RECOMPUTE), s)):
            out[f"kvstrata_tokens_{source}"] = int(tokens[source])
        prompt = sum(tokens.values())
        if (
            prompt
        ):  # share of prompt tokens not recomputed: engine prefix cache plus kvstrata's tiers
            out["kvstrata_hit_rate"] = round(1 - tokens.get(RECOMPUTE, 0) / prompt, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class StrataPromMetrics(KVConnectorPromMetrics):
    """The ``kvstrata_*`` families on vLLM's ``/metrics`` (in vLLM's API server process)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        classes = {
            "counter": self._counter_cls,
            "gauge": self._gauge_cls,
            "histogram": self._histogram_cls,
        }
        self.metrics: dict[str, Any] = {}
        for f in FAMILIES:
            key = (f.name, tuple(labelnames), f.labels)
            with _METRICS_LOCK:
                if key not in _METRICS:
                    extra: dict[str, Any] = {"buckets": list(f.buckets)} if f.buckets else {}
                    if f.kind == "gauge":
                        extra["multiprocess_mode"] = (
                            "max"  # several API servers: one value per engine
                        )
                    _METRICS[key] = classes[f.kind](
                        name=f.name,
                        documentation=f.doc,
                        labelnames=[*labelnames, *f.labels],
                        **extra,
                    )
                self.metrics[f.name] = _METRICS[key]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        telemetry = transfer_stats_data.get(TELEMETRY)
        if not telemetry:
            return
        engine = list(self.per_engine_labelvalues.get(engine_idx, ()))
        for kind, method in (("counters", "inc"), ("gauges", "set"), ("observations", "observe")):
            for name, values, value in telemetry.get(kind, ()):
                metric = self.metrics.get(name)
                if metric is not None:
                    getattr(metric.labels(*engine, *values), method)(value)
