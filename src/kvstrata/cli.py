"""The ``kvstrata`` command line."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from kvstrata import __version__
from kvstrata import format as fmt
from kvstrata.cli_policy import policy_app

app = typer.Typer(help="kvstrata: a unified multi-tier KV cache for LLM serving.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
console = Console()


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"kvstrata {__version__}")


@app.command()
def inspect(path: Path) -> None:
    """Verify a stored object file (e.g. from a disk tier) and print its header."""
    data = path.read_bytes()
    try:
        obj = fmt.decode(data)
    except fmt.FormatError as exc:
        console.print(f"[red]invalid object[/red]: {exc}")
        raise typer.Exit(1) from None
    m = obj.meta
    table = Table(title=str(path))
    table.add_column("field")
    table.add_column("value")
    for field, value in [
        ("codec", f"{m.codec} {dict(m.codec_params) or ''}"),
        ("dtype", m.dtype),
        ("layers", str(obj.header.n_layers)),
        ("tokens", str(m.n_tokens)),
        ("kv heads x head dim", f"{m.kv_heads} x {m.head_dim}"),
        ("namespace", m.namespace.hex()),
        ("chunk key", m.key.hex()),
        ("bytes", f"{len(data):,} (header {obj.header.header_len:,})"),
    ]:
        table.add_row(field, value)
    console.print(table)


@app.command()
def demo(
    chunks: int = typer.Option(16, help="chunks to store and load"),
    directory: Path | None = typer.Option(None, help="disk tier directory (default: a temporary one)"),
) -> None:
    """Store and load SmolLM2-shaped KV through the embedded tiers (memory + disk); no servers."""
    from kvstrata.demo import round_trip

    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(round_trip(chunks, directory or Path(tmp), progress=track))
    table = Table(title=f"{chunks} chunks x 256 tokens, SmolLM2-135M geometry, fp32")
    for column in ("tier", "put MB/s", "get MB/s", "bit-exact"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.tier, f"{row.put_mbps:,.0f}", f"{row.get_mbps:,.0f}", str(row.exact))
    console.print(table)
    if not all(r.exact for r in rows):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

