"""``kvstrata corpus ...``: precompute per-document KV and list a corpus.

Mounted by :mod:`kvstrata.cli.main` as ``app.add_typer(corpus_app, name="corpus")``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

corpus_app = typer.Typer(help="Per-document precomputed KV (KVLink-style).", no_args_is_help=True)
console = Console(stderr=True)

_CONFIG = typer.Option(
    None, "--config", "-c", help="strata.yaml (default: the embedded memory + disk preset)"
)
_MODEL = typer.Option(None, help="checkpoint directory (default: SmolLM2-135M, prepared once)")
_MODEL_ID = typer.Option(
    None, help="model identity, as the connector's kv_connector_extra_config model_id"
)
_CORPUS = typer.Option(None, help="corpus name (default: documents.corpus of the config)")


def _setup(
    config_path: Path | None,
    model_dir: Path | None,
    model_id: str | None,
    corpus: str | None,
    threads: int | None = None,
):
    from kvstrata.config import default_config, load_config
    from kvstrata.offline.convert import prepare_smollm2
    from kvstrata.offline.precompute import open_corpus

    config = load_config(config_path) if config_path else default_config()
    model_dir = model_dir or prepare_smollm2(progress=False)
    return (config, *open_corpus(config, model_dir, model_id, corpus, threads))


@corpus_app.command("add")
def add(
    paths: list[Path] = typer.Argument(
        ..., help="files, or directories of text files (.txt .md .rst ...)"
    ),
    config_path: Path | None = _CONFIG,
    model_dir: Path | None = _MODEL,
    model_id: str | None = _MODEL_ID,
    corpus: str | None = _CORPUS,
    context: str | None = typer.Option(
        None,
        help="id of a given document (e.g. the system prompt) to also "
        "compute every other document after (the `context` repair)",
    ),
    force: bool = typer.Option(False, help="recompute unchanged documents too"),
    threads: int | None = typer.Option(None, min=1, help="torch threads for the forward passes"),
) -> None:
    """Compute each document's KV alone (positions from 0) and store it with the corpus manifest.

    Resumable: the manifest is saved after every document; an unchanged
    document whose objects are stored is skipped, a changed one recomputed.
    """
    from kvstrata.offline.precompute import add_documents, read_documents

    docs = read_documents(paths)
    if not docs:
        console.print("[red]no documents found[/red]")
        raise typer.Exit(1)
    with console.status("loading the model..."):
        config, store, computer = _setup(config_path, model_dir, model_id, corpus, threads)
    if config.tiers[store.tiers[0]].tier_class.process_local:
        console.print(
            f"[yellow]warning[/yellow]: tier {store.tiers[0]} is a memory tier; the corpus "
            "will not outlive this command (set documents.tiers to a disk, redis or s3 tier)"
        )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("documents", total=len(docs))

        def progress(doc_id: str, done: int, total: int) -> None:
            bar.update(task, completed=done, description=doc_id[-40:] or "done")

        results = add_documents(
            store, docs, computer, context_id=context, progress=progress, force=force
        )
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    tier = store.tiers[0]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(
        f"corpus [bold]{store.name}[/bold] in tier {tier}: {summary}; "
        f"{sum(r.n_tokens for r in results):,} tokens"
    )


@corpus_app.command("list")
def list_(
    config_path: Path | None = _CONFIG,
    model_dir: Path | None = _MODEL,
    model_id: str | None = _MODEL_ID,
    corpus: str | None = _CORPUS,
) -> None:
    """Print the corpus manifest: documents, token counts, variants."""
    from kvstrata import runtime

    _, store, _ = _setup(config_path, model_dir, model_id, corpus)
    manifest = runtime.run(store.load_manifest())
    table = Table(title=f"corpus {store.name} ({manifest.model}, {manifest.dtype})")
    for column in ("document", "tokens", "content sha256", "context variants"):
        table.add_column(column)
    for e in sorted(manifest.documents.values(), key=lambda e: e.id):
        table.add_row(e.id, str(e.n_tokens), e.content_hash[:16], str(len(e.contexts)))
    Console().print(table)
