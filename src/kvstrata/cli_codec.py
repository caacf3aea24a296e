"""``kvstrata codec ...``: train learned codecs, inspect checkpoints.

Mounted by :mod:`kvstrata.cli` as ``app.add_typer(codec_app, name="codec")``.

``kvstrata codec train`` captures KV from SmolLM2-135M through transformers
(the training 70% of CPython's ``pydoc_data.topics``; K is post-RoPE, as vLLM
stores it), trains one autoencoder per layer for K and one for V on CPU, and
writes a safetensors checkpoint. Given the same seed, model and torch build,
the checkpoint's bytes -- and so its sha256 -- are the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

codec_app = typer.Typer(help="Train and inspect learned KV codecs.", no_args_is_help=True)
console = Console(stderr=True)


def default_checkpoint(latent: int) -> Path:
    return Path.home() / ".cache" / "kvstrata" / "codecs" / f"smollm2-135m-ae-l{latent}-v1.safetensors"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


@codec_app.command()
def train(
    out: Path | None = typer.Option(None, help="checkpoint file (default ~/.cache/kvstrata/codecs/...)"),
    latent: int = typer.Option(16, min=1, help="latent size per head vector (head_dim 64 for SmolLM2)"),
    hidden: int = typer.Option(128, min=1, help="hidden width of encoder and decoder"),
    steps: int = typer.Option(600, min=1, help="optimizer steps"),
    batch: int = typer.Option(1024, min=1, help="vectors per step, per autoencoder"),
    lr: float = typer.Option(1e-2, min=0, help="peak learning rate (one-cycle schedule)"),
    seed: int = typer.Option(0, help="random seed (data sampling and initialization)"),
    sequences: int = typer.Option(12, min=1, help="training sequences captured from the model"),
    seq_len: int = typer.Option(512, min=16, help="tokens per sequence"),
    heldout_sequences: int = typer.Option(2, min=1, help="held-out sequences for the recorded error"),
    model_dir: Path | None = typer.Option(None, help="HF checkpoint dir (default: prepared SmolLM2-135M)"),
) -> None:
    """Capture KV from SmolLM2 and train per-layer K/V autoencoders; print the checkpoint's sha256."""
    import numpy as np

    from kvstrata.compression import autoencoder, capture

    out = out or default_checkpoint(latent)
    started = time.perf_counter()
    console.print("loading SmolLM2-135M (transformers, fp32) ...")
    model, tok = capture.load_model(model_dir)
    train_ids = capture.sequences(tok, "train", sequences, seq_len)
    held_ids = capture.sequences(tok, "heldout", heldout_sequences, seq_len)
    with _progress() as bar:
        task = bar.add_task("capturing KV", total=len(train_ids) + len(held_ids), info="")
        train_kv, held_kv = [], []
        for ids in train_ids:
            train_kv.append(capture.capture(model, ids))
            bar.advance(task)
        for ids in held_ids:
            held_kv.append(capture.capture(model, ids))
            bar.advance(task)
    n_layers, _, _, heads, head_dim = train_kv[0].shape

    def by_layer(kvs):
        stacked = np.concatenate(kvs, axis=2)  # [L, 2, T_total, H, D]
        return {("kv"[i], layer): stacked[layer, i].reshape(-1, head_dim) for layer in range(n_layers) for i in (0, 1)}

    data, held = by_layer(train_kv), by_layer(held_kv)
    with _progress() as bar:
        task = bar.add_task(f"training {2 * n_layers} autoencoders", total=steps, info="")

        def report(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, info=f"loss {loss:.4f}")

        ckpt = autoencoder.train(
            data, held, latent=latent, hidden=hidden, steps=steps, batch=batch, lr=lr, seed=seed, progress=report,
            meta={"model": "SmolLM2-135M-Instruct", "kv_heads": heads, "corpus": "pydoc_data.topics[:70%]",
                  "train_tokens": len(train_ids) * seq_len, "k": "post-RoPE"},
        )
    digest = ckpt.save(out)
    errs = json.loads(ckpt.meta["heldout_rel_err"])
    k = [errs[f"k{i}"] for i in range(n_layers)]
    v = [errs[f"v{i}"] for i in range(n_layers)]
    console.print(f"held-out relative error: K mean {np.mean(k):.3f} (max {max(k):.3f}), "
                  f"V mean {np.mean(v):.3f} (max {max(v):.3f})")
    console.print(f"{time.perf_counter() - started:.0f} s; checkpoint {out}")
    typer.echo(json.dumps({"checkpoint": str(out), "sha256": digest}))


@codec_app.command()
def show(checkpoint: Path = typer.Argument(..., help="autoencoder checkpoint (.safetensors)")) -> None:
    """Print a checkpoint's metadata, sha256 and recorded held-out error per layer."""
    from kvstrata.compression.autoencoder import load_checkpoint
    from kvstrata.compression.base import CodecError

    try:
        ckpt = load_checkpoint(str(checkpoint), None)
    except CodecError as exc:
        console.print(f"[red]invalid checkpoint[/red]: {exc}")
        raise typer.Exit(1) from None
    table = Table(title=str(checkpoint))
    table.add_column("field")
    table.add_column("value")
    table.add_row("sha256", ckpt.sha256)
    for key, value in sorted(ckpt.meta.items()):
        if key != "heldout_rel_err":
            table.add_row(key, value)
    Console().print(table)
    errs = json.loads(ckpt.meta.get("heldout_rel_err", "{}"))
    if errs:
        t = Table(title="held-out relative error")
        t.add_column("layer")
        t.add_column("K")
        t.add_column("V")
        for layer in range(ckpt.n_layers):
            t.add_row(str(layer), f"{errs.get(f'k{layer}', float('nan')):.4f}", f"{errs.get(f'v{layer}', float('nan')):.4f}")
        Console().print(t)
