"""``kvstrata stats`` and ``kvstrata report``: what the tiers did, from an exporter or a snapshot.

Mounted in the main CLI with ``app.add_typer(stats_app)`` (no name: the two
commands join the top level). Runnable alone: ``python -m kvstrata.cli.stats``.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from kvstrata.telemetry import report as rp

stats_app = typer.Typer(help="Telemetry: per-tier statistics and plots.", no_args_is_help=True)
console = Console()


def _sources(url: list[str] | None, snapshot: list[Path] | None) -> list[str]:
    sources = [*(url or ()), *(str(p) for p in snapshot or ())]
    if not sources:
        raise typer.BadParameter("give --url (a running exporter) or --snapshot (a saved file)")
    return sources


def _load(sources: list[str]) -> list[dict]:
    try:
        docs = rp.load(sources)
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot read metrics[/red]: {exc}")
        raise typer.Exit(1) from None
    if not docs:
        console.print("[red]no snapshots[/red]")
        raise typer.Exit(1)
    return docs


#: headers on two lines, values without units: the table fits 80 columns without cutting a header
COLUMNS = (
    "tier",
    "lookups",
    "hit\nrate",
    "hit\ntokens",
    "bytes\nin",
    "bytes\nout",
    "{op}\np50 ms",
    "{op}\np99 ms",
    "errors",
)


def render(summary: rp.Summary, title: str, latency_op: str = "get") -> Group:
    """The per-tier table and a totals table, as printed by ``kvstrata stats``."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
        show_edge=False,
    )
    for column in COLUMNS:
        table.add_column(
            column.format(op=latency_op),
            justify="left" if column == "tier" else "right",
            no_wrap=True,
        )
    skipped, open_breakers = 0, []
    for t in summary.tiers:
        skipped += t.skipped
        if t.breaker_open:
            open_breakers.append(t.tier)
        table.add_row(
            f"{t.tier}*" if t.breaker_open else t.tier,
            f"{t.lookups:,}",
            rp.pct(t.hit_rate),
            f"{t.hit_tokens:,}",
            _bytes(t.bytes_written),
            _bytes(t.bytes_read),
            _ms(t.p50_s),
            _ms(t.p99_s),
            f"{t.errors:,}",
        )
    table.add_row("engine", "", "", f"{summary.engine_tokens:,}", "", "", "", "", "", style="dim")
    table.add_row(
        "recompute", "", "", f"{summary.recompute_tokens:,}", "", "", "", "", "", style="dim"
    )
    totals = Table(show_header=False, box=None)
    totals.add_row("prompt tokens", f"{summary.prompt_tokens:,}")
    totals.add_row("token hit rate (not recomputed)", rp.pct(summary.hit_rate))
    if open_breakers:
        totals.add_row("[red]breaker open (* above)[/red]", ", ".join(open_breakers))
    if skipped:
        totals.add_row("operations skipped (breaker open)", f"{skipped:,}")
    for key, value in summary.extra.items():
        totals.add_row(key, f"{value:,.0f}")
    return Group(table, totals)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f}"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f}{unit}"
    return f"{n}B"


@stats_app.command()
def stats(
    url: list[str] = typer.Option(
        None,
        "--url",
        help="exporter endpoint, e.g. http://127.0.0.1:9400/metrics "
        "(repeat for vLLM's scheduler and worker processes: summed)",
    ),
    snapshot: list[Path] = typer.Option(
        None, "--snapshot", help="snapshot file (telemetry.snapshot_path)"
    ),
    watch: bool = typer.Option(False, "--watch", help="refresh until interrupted"),
    interval: float = typer.Option(2.0, help="seconds between refreshes with --watch"),
    op: str = typer.Option("get", help="the tier operation whose latency is shown"),
) -> None:
    """Per-tier table: lookups, hit rate, hit tokens, bytes in/out, latency p50/p99, errors."""
    sources = _sources(url, snapshot)

    def view():
        summary = rp.summarize(_load(sources)[-1], op)
        return render(
            summary, f"kvstrata stats ({', '.join(sources)}) {time.strftime('%H:%M:%S')}", op
        )

    if not watch:
        console.print(view())
        return
    with Live(view(), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(view())
        except KeyboardInterrupt:
            pass


@stats_app.command()
def report(
    sources: list[str] = typer.Argument(
        ..., help="snapshot files (.json; .jsonl: a series) or exporter URLs"
    ),
    out: Path = typer.Option(..., "--out", help="directory for the PNGs and index.html"),
    op: str = typer.Option("get", help="the tier operation whose latency is plotted"),
) -> None:
    """Plots (hit rate and tokens by tier, over time for
    a series; latency histograms) and an HTML page."""
    try:
        files = rp.write_report(_load(sources), out, op)
    except ImportError:
        console.print("[red]kvstrata report needs matplotlib[/red]: pip install 'kvstrata[plots]'")
        raise typer.Exit(1) from None
    for f in files:
        console.print(str(f))


if __name__ == "__main__":  # pragma: no cover
    stats_app()
