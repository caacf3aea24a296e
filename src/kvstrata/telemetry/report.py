"""What the metrics say: per-tier summaries from samples, and plots of them.

Input everywhere is a *snapshot*: ``{"time": unix seconds, "samples":
[{"name", "labels", "value"}, ...]}`` -- what :meth:`Telemetry.save_snapshot`
writes, or :func:`scrape` makes of a running exporter. Samples that differ
only in ``pid``/``role`` (vLLM's scheduler and worker processes) are summed.

* :func:`summarize` -> :class:`Summary`: per tier lookups, hit rate (derived:
  hit / (hit + miss) chunks asked), hit tokens, bytes, latency quantiles
  from the histogram buckets, errors; plus engine/recompute tokens and the
  save queue, evictions, promotions, demotions, open breakers.
* :func:`write_report` -> PNG plots and an ``index.html`` embedding them
  (needs matplotlib: ``pip install 'kvstrata[plots]'``).
"""

from __future__ import annotations

import html
import math
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvstrata.telemetry.metrics import ENGINE, RECOMPUTE, load_snapshots

PROCESS_LABELS = ("pid", "role")
ERRORS = ("error", "timeout")


# -- reading ----------------------------------------------------------------------


def scrape(url: str, timeout: float = 5.0) -> dict:
    """One snapshot of a running exporter (``http://host:port/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8")
    samples = [
        {"name": s.name, "labels": dict(s.labels), "value": s.value}
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("kvstrata_") and not s.name.endswith("_created")
    ]
    return {"version": 1, "time": time.time(), "url": url, "samples": samples}


def load(sources: Iterable[str]) -> list[dict]:
    """Snapshots from URLs and files (``.json``: one, ``.jsonl``: a series), oldest first.

    Several sources read at the same moment (one URL per vLLM process) are
    one snapshot: their samples add up. Files of several processes (vLLM's
    scheduler and worker each write their own) are merged into one series:
    see :func:`merge_processes`.
    """
    docs: list[dict] = []
    scraped: list[dict] = []
    for source in sources:
        if source.startswith(("http://", "https://")):
            scraped.append(scrape(source))
        else:
            docs.extend({**d, "_source": source} for d in load_snapshots(source))
    docs = merge_processes(docs)
    if scraped:
        docs.append({"time": time.time(), "samples": [s for d in scraped for s in d["samples"]]})
    return sorted(docs, key=lambda d: d.get("time", 0))


def merge_processes(docs: Sequence[dict]) -> list[dict]:
    """One series out of several processes' snapshots: at each snapshot's time, the samples of
    every process's latest snapshot so far, added up.

    A process is known by its snapshot's ``pid`` and ``role`` (else by the file it came from).
    Counters only grow within a process, so the merged series grows too: no sawtooth from
    alternating between processes.
    """
    docs = sorted(docs, key=lambda d: d.get("time", 0))
    processes = {_process(d) for d in docs}
    if len(processes) <= 1:
        return [{k: v for k, v in d.items() if k != "_source"} for d in docs]
    latest: dict[tuple, dict] = {}
    merged = []
    for doc in docs:
        latest[_process(doc)] = doc
        merged.append(
            {
                "version": 1,
                "time": doc.get("time", 0),
                "processes": len(latest),
                "samples": [s for d in latest.values() for s in d["samples"]],
            }
        )
    return merged


def _process(doc: dict) -> tuple:
    if "pid" in doc or "role" in doc:
        return (doc.get("pid"), doc.get("role"))
    return (doc.get("_source"),)


class _Samples:
    """Samples summed over process labels, queried by name and label subset."""

    def __init__(self, samples: Sequence[dict]):
        self.rows: dict[tuple[str, tuple], float] = {}
        for s in samples:
            labels = tuple(
                sorted((k, v) for k, v in s["labels"].items() if k not in PROCESS_LABELS)
            )
            key = (s["name"], labels)
            self.rows[key] = self.rows.get(key, 0.0) + float(s["value"])

    def sum(self, name: str, **match: str | tuple[str, ...]) -> float:
        return sum(
            v for (n, labels), v in self.rows.items() if n == name and _matches(dict(labels), match)
        )

    def values(self, name: str, label: str) -> set[str]:
        return {
            dict(labels)[label] for (n, labels) in self.rows if n == name and label in dict(labels)
        }

    def buckets(self, name: str, **match: str) -> list[tuple[float, float]]:
        """Cumulative ``(upper bound, count)`` of a histogram, summed over other labels."""
        out: dict[float, float] = {}
        for (n, labels), v in self.rows.items():
            d = dict(labels)
            if n == f"{name}_bucket" and _matches(d, match):
                le = float(d["le"])
                out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def _matches(labels: dict, match: dict) -> bool:
    for k, want in match.items():
        have = labels.get(k)
        if have not in (want if isinstance(want, tuple) else (want,)):
            return False
    return True


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket; None if empty."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: its bound is the best answer
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


# -- summarizing ------------------------------------------------------------------


@dataclass(frozen=True)
class TierRow:
    tier: str
    lookups: int  # chunks asked about during lookups
    hits: int
    hit_tokens: int
    bytes_read: int  # out of the tier (loads)
    bytes_written: int  # into the tier (saves, promotions, demotions)
    p50_s: float | None
    p99_s: float | None
    errors: int  # error + timeout, any operation
    skipped: int  # operations skipped while the breaker was open
    breaker_open: bool

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


@dataclass(frozen=True)
class Summary:
    time: float
    tiers: list[TierRow]
    engine_tokens: int
    recompute_tokens: int
    extra: dict[str, float] = field(default_factory=dict)  # queue depth, drops, moves, evictions

    @property
    def prompt_tokens(self) -> int:
        return self.engine_tokens + self.recompute_tokens + sum(t.hit_tokens for t in self.tiers)

    @property
    def hit_rate(self) -> float | None:
        """Share of prompt tokens not recomputed (engine prefix cache included)."""
        total = self.prompt_tokens
        return 1 - self.recompute_tokens / total if total else None

    def tokens_by_source(self) -> dict[str, int]:
        return {
            ENGINE: self.engine_tokens,
            **{t.tier: t.hit_tokens for t in self.tiers},
            RECOMPUTE: self.recompute_tokens,
        }


def summarize(snapshot: dict, latency_op: str = "get") -> Summary:
    s = _Samples(snapshot["samples"])
    ops, lat = "kvstrata_tier_ops_total", "kvstrata_tier_latency_seconds"
    tiers = (
        s.values(ops, "tier")
        | s.values("kvstrata_tier_bytes_total", "tier")
        | s.values("kvstrata_tokens_total", "source")
    ) - {ENGINE, RECOMPUTE}
    rows = []
    for tier in sorted(tiers):
        buckets = s.buckets(lat, tier=tier, op=latency_op)
        rows.append(
            TierRow(
                tier=tier,
                lookups=int(s.sum(ops, tier=tier, op="lookup", result=("hit", "miss"))),
                hits=int(s.sum(ops, tier=tier, op="lookup", result="hit")),
                hit_tokens=int(s.sum("kvstrata_tokens_total", source=tier)),
                bytes_read=int(s.sum("kvstrata_tier_bytes_total", tier=tier, direction="read")),
                bytes_written=int(s.sum("kvstrata_tier_bytes_total", tier=tier, direction="write")),
                p50_s=quantile(0.5, buckets),
                p99_s=quantile(0.99, buckets),
                errors=int(s.sum(ops, tier=tier, result=ERRORS)),
                skipped=int(s.sum(ops, tier=tier, result="skipped")),
                breaker_open=s.sum("kvstrata_breaker_open", tier=tier) > 0,
            )
        )
    extra = {
        "save queue depth": s.sum("kvstrata_save_queue_depth"),
        "saves dropped": s.sum("kvstrata_save_dropped_total"),
        "evictions": s.sum("kvstrata_evictions_total"),
        "promotions": s.sum("kvstrata_chunk_moves_total", kind="promote"),
        "demotions": s.sum("kvstrata_chunk_moves_total", kind="demote"),
        "bad objects": s.sum("kvstrata_bad_objects_total"),
        "loads": s.sum("kvstrata_load_seconds_count"),
    }
    return Summary(
        snapshot.get("time", 0.0),
        rows,
        int(s.sum("kvstrata_tokens_total", source=ENGINE)),
        int(s.sum("kvstrata_tokens_total", source=RECOMPUTE)),
        extra,
    )


def latency_histograms(snapshot: dict, op: str = "get") -> dict[str, list[tuple[float, float]]]:
    """Per tier, non-cumulative ``(upper bound, count)``
    of ``op``'s latency (empty tiers left out)."""
    s = _Samples(snapshot["samples"])
    out = {}
    for tier in sorted(s.values("kvstrata_tier_latency_seconds_bucket", "tier")):
        cumulative = s.buckets("kvstrata_tier_latency_seconds", tier=tier, op=op)
        if cumulative and cumulative[-1][1]:
            counts, previous = [], 0.0
            for bound, count in cumulative:
                counts.append((bound, count - previous))
                previous = count
            out[tier] = counts
    return out


# -- plotting -----------------------------------------------------------------------


def write_report(
    snapshots: Sequence[dict], out_dir: str | Path, latency_op: str = "get"
) -> list[Path]:
    """PNG plots and ``index.html`` in ``out_dir``; returns the files written.

    One snapshot: bar charts of hit rate and tokens by tier. Several (a
    series): the same over time. Latency: the last snapshot's histogram.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not snapshots:
        raise ValueError("no snapshots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(d, latency_op) for d in snapshots]
    last = summaries[-1]
    files: list[Path] = []

    fig, (ax_rate, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    if len(summaries) == 1:
        _plot_one(last, ax_rate, ax_tokens)
    else:
        _plot_series(summaries, ax_rate, ax_tokens)
    ax_rate.set_title("lookup hit rate by tier (% of chunks asked)")
    ax_rate.set_ylabel("%")
    ax_tokens.set_title("prompt tokens by who served them")
    fig.tight_layout()
    files.append(_save(fig, out / "hits.png", plt))

    histograms = latency_histograms(snapshots[-1], latency_op)
    if histograms:
        fig = _plot_latency(histograms, latency_op, plt)
        files.append(_save(fig, out / "latency.png", plt))

    files.append(_html(out / "index.html", last, [f.name for f in files], len(summaries)))
    return files


def _plot_one(last: Summary, ax_rate, ax_tokens) -> None:
    """One snapshot: hit rate per tier and prompt tokens per source, as bars."""
    names = [t.tier for t in last.tiers]
    rates = [100 * (t.hit_rate or 0) for t in last.tiers]
    ax_rate.bar(names, rates, color="tab:blue")
    for i, t in enumerate(last.tiers):
        ax_rate.annotate(
            f"{t.hits}/{t.lookups}", (i, rates[i]), ha="center", va="bottom", fontsize=8
        )
    ax_rate.set_ylim(0, 105)
    sources = last.tokens_by_source()
    ax_tokens.bar(list(sources), list(sources.values()), color=_colors(sources))
    ax_tokens.set_ylabel("prompt tokens")


def _plot_series(summaries: Sequence[Summary], ax_rate, ax_tokens) -> None:
    """A series: hit rate per tier and overall as lines, tokens per source stacked, over time."""
    t0 = summaries[0].time
    xs = [(s.time - t0) for s in summaries]
    for tier in sorted({t.tier for s in summaries for t in s.tiers}):
        rates = [_tier_rate(s, tier) for s in summaries]
        ax_rate.plot(xs, rates, marker="o", label=tier)
    ax_rate.plot(xs, [100 * (s.hit_rate or 0) for s in summaries], "k--", label="overall (tokens)")
    ax_rate.set_xlabel("seconds")
    ax_rate.legend(fontsize=8)
    tiers = sorted({k for s in summaries for k in s.tokens_by_source()} - {ENGINE, RECOMPUTE})
    sources = [ENGINE, *tiers, RECOMPUTE]
    stacks = [[s.tokens_by_source().get(src, 0) for s in summaries] for src in sources]
    ax_tokens.stackplot(xs, stacks, labels=sources, colors=_colors(sources))
    ax_tokens.set_xlabel("seconds")
    ax_tokens.set_ylabel("prompt tokens (cumulative)")
    ax_tokens.legend(fontsize=8, loc="upper left")


def _plot_latency(histograms: dict[str, list[tuple[float, float]]], op: str, plt):
    """The figure of each tier's ``op`` latency histogram (log-scaled bounds)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for tier, counts in histograms.items():
        finite = [(b, c) for b, c in counts if not math.isinf(b)]
        # a bucket's count covers (previous bound, bound]: drawn leftwards from its bound
        ax.step([b for b, _ in finite], [c for _, c in finite], where="pre", label=tier)
    ax.set_xscale("log")
    ax.set_xlabel(f"{op} latency, seconds (bucket upper bound)")
    ax.set_ylabel("operations")
    ax.set_title(f"tier {op} latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _tier_rate(summary: Summary, tier: str) -> float:
    row = next((t for t in summary.tiers if t.tier == tier), None)
    return 100 * (row.hit_rate or 0) if row else 0.0


def _colors(sources) -> list[str]:
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
    ]
    tiers = [s for s in sources if s not in (ENGINE, RECOMPUTE)]
    fixed = {ENGINE: "tab:cyan", RECOMPUTE: "tab:gray"}
    return [fixed.get(s) or palette[tiers.index(s) % len(palette)] for s in sources]


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _html(path: Path, summary: Summary, images: list[str], n: int) -> Path:
    head = [
        "tier",
        "lookups",
        "hit rate",
        "hit tokens",
        "bytes read",
        "bytes written",
        "p50",
        "p99",
        "errors",
    ]
    rows = [
        [
            t.tier,
            t.lookups,
            pct(t.hit_rate),
            t.hit_tokens,
            t.bytes_read,
            t.bytes_written,
            ms(t.p50_s),
            ms(t.p99_s),
            t.errors,
        ]
        for t in summary.tiers
    ]
    rows += [
        [ENGINE, "", "", summary.engine_tokens, "", "", "", "", ""],
        [RECOMPUTE, "", "", summary.recompute_tokens, "", "", "", "", ""],
    ]
    table = (
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
        )
        + "</table>"
    )
    extra = "".join(f"<li>{html.escape(k)}: {v:g}</li>" for k, v in summary.extra.items())
    imgs = "".join(f'<p><img src="{html.escape(i)}" alt="{html.escape(i)}"></p>' for i in images)
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>kvstrata report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style>"
        f"<h1>kvstrata report</h1><p>{n} snapshot(s); prompt tokens {summary.prompt_tokens}, "
        f"hit rate {pct(summary.hit_rate)} (tokens not recomputed)</p>"
        f"{table}<ul>{extra}</ul>{imgs}\n",
        encoding="utf-8",
    )
    return path


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"
