"""``kvstrata codec ...``: train learned codecs, inspect checkpoints.

Mounted by :mod:`kvstrata.cli.main` as ``app.add_typer(codec_app, name="codec")``.

``kvstrata codec train`` captures KV from SmolLM2-135M through transformers
(the training 70% of CPython's ``pydoc_data.topics``; K is post-RoPE, as vLLM
stores it), fits one transform per layer for K and one for V on CPU, and
writes a safetensors checkpoint: ``--kind linear-ae`` (the default) a linear
autoencoder across all KV heads with a bit-allocated quantized latent
(:mod:`kvstrata.compression.linear`, numpy, closed form), ``--kind
autoencoder`` the per-head MLP autoencoders (:mod:`kvstrata.compression.autoencoder`,
torch). Given the same seed, model and library builds, the checkpoint's
bytes -- and so its sha256 -- are the same.
"""

from __future__ import annotations

import json
import struct
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
    return (
        Path.home() / ".cache" / "kvstrata" / "codecs" / f"smollm2-135m-ae-l{latent}-v1.safetensors"
    )


def default_linear_checkpoint(k_bytes: int, v_bytes: int, derotate: bool) -> Path:
    tag = f"k{k_bytes}v{v_bytes}" + ("-derot" if derotate else "")
    return Path.home() / ".cache" / "kvstrata" / "codecs" / f"smollm2-135m-lae-{tag}-v1.safetensors"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@codec_app.command()
def train(
    out: Path | None = typer.Option(
        None, help="checkpoint file (default ~/.cache/kvstrata/codecs/...)"
    ),
    kind: str = typer.Option(
        "linear-ae", help="linear-ae (transform + quantized latent) or autoencoder (MLP)"
    ),
    k_bytes: list[int] = typer.Option(
        [96],
        min=1,
        help="linear-ae: code bytes per token and layer for K (all "
        "heads); repeat with --v-bytes to fit several checkpoints from one capture",
    ),
    v_bytes: list[int] = typer.Option(
        [96], min=1, help="linear-ae: code bytes per token and layer for V"
    ),
    derotate: bool = typer.Option(
        True, help="linear-ae: code keys as before RoPE (needs chunk positions)"
    ),
    max_vectors: int = typer.Option(65536, min=1, help="linear-ae: training vectors per transform"),
    latent: int = typer.Option(
        16, min=1, help="autoencoder: latent size per head vector (head_dim 64)"
    ),
    hidden: int = typer.Option(128, min=1, help="hidden width of encoder and decoder"),
    steps: int = typer.Option(600, min=1, help="optimizer steps"),
    batch: int = typer.Option(1024, min=1, help="vectors per step, per autoencoder"),
    lr: float = typer.Option(1e-2, min=0, help="peak learning rate (one-cycle schedule)"),
    seed: int = typer.Option(0, help="random seed (data sampling and initialization)"),
    sequences: int = typer.Option(12, min=1, help="training sequences captured from the model"),
    seq_len: int = typer.Option(512, min=16, help="tokens per sequence"),
    heldout_sequences: int = typer.Option(
        2, min=1, help="held-out sequences for the recorded error"
    ),
    model_dir: Path | None = typer.Option(
        None, help="HF checkpoint dir (default: prepared SmolLM2-135M)"
    ),
) -> None:
    """Capture KV from SmolLM2 and train per-layer K/V codecs; print the checkpoint's sha256."""
    out = _checked_options(kind, out, k_bytes, v_bytes, latent)
    started = time.perf_counter()
    model, train_kv, held_kv = _capture(model_dir, sequences, heldout_sequences, seq_len)
    train_tokens = len(train_kv) * seq_len
    if kind == "autoencoder":
        fit = dict(latent=latent, hidden=hidden, steps=steps, batch=batch, lr=lr, seed=seed)
        _train_autoencoder(train_kv, held_kv, out, fit, train_tokens, started)
        return
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "corpus": "pydoc_data.topics[:70%]",
        "train_tokens": train_tokens,
        "sequences": sequences,
        "seq_len": seq_len,
    }
    for kb, vb in zip(k_bytes, v_bytes, strict=True):
        path = out or default_linear_checkpoint(kb, vb, derotate)
        fit = dict(k_bytes=kb, v_bytes=vb, derotate=derotate, max_vectors=max_vectors, seed=seed)
        _train_linear(model, train_kv, held_kv, path, fit, meta, started)


def _checked_options(
    kind: str, out: Path | None, k_bytes: list[int], v_bytes: list[int], latent: int
) -> Path | None:
    """``out`` (the autoencoder's default filled in); BadParameter for options that clash."""
    if kind not in ("linear-ae", "autoencoder"):
        raise typer.BadParameter(f"--kind must be linear-ae or autoencoder, not {kind!r}")
    if kind == "autoencoder":
        return out or default_checkpoint(latent)
    if len(k_bytes) != len(v_bytes):
        raise typer.BadParameter("give --k-bytes and --v-bytes the same number of times")
    if out is not None and len(k_bytes) > 1:
        raise typer.BadParameter("--out names one checkpoint: give one --k-bytes/--v-bytes pair")
    return out


def _capture(model_dir: Path | None, sequences: int, heldout_sequences: int, seq_len: int):
    """(model, training KV, held-out KV): each KV ``[L, 2, T, H, D]`` per captured sequence."""
    import torch

    from kvstrata.offline import capture

    # one torch thread: the captured KV -- and so the checkpoint -- must not depend on the core
    # count (numpy's BLAS: run with OPENBLAS_NUM_THREADS=1 for bit-identical linear-ae fits)
    torch.set_num_threads(1)
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
    return model, train_kv, held_kv


def _train_autoencoder(
    train_kv, held_kv, out: Path, fit: dict, train_tokens: int, started: float
) -> None:
    """Fit the per-head MLP autoencoders (``fit``: their hyperparameters), save and report."""
    import numpy as np

    from kvstrata.compression import autoencoder

    n_layers, _, _, heads, head_dim = train_kv[0].shape

    def by_layer(kvs):
        stacked = np.concatenate(kvs, axis=2)  # [L, 2, T_total, H, D]
        return {
            ("kv"[i], layer): stacked[layer, i].reshape(-1, head_dim)
            for layer in range(n_layers)
            for i in (0, 1)
        }

    data, held = by_layer(train_kv), by_layer(held_kv)
    with _progress() as bar:
        task = bar.add_task(f"training {2 * n_layers} autoencoders", total=fit["steps"], info="")

        def report(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, info=f"loss {loss:.4f}")

        ckpt = autoencoder.train(
            data,
            held,
            **fit,
            progress=report,
            meta={
                "model": "SmolLM2-135M-Instruct",
                "kv_heads": heads,
                "corpus": "pydoc_data.topics[:70%]",
                "train_tokens": train_tokens,
                "k": "post-RoPE",
            },
        )
    _report(ckpt, out, ckpt.save(out), n_layers, started)


def _train_linear(
    model, train_kv, held_kv, out: Path, fit: dict, meta: dict, started: float
) -> None:
    """Fit one linear-ae checkpoint (``fit``: its code sizes and options), save and report."""
    from kvstrata.compression import linear

    n_layers, _, _, heads, head_dim = train_kv[0].shape
    data, held = _linear_data(train_kv, held_kv)
    with _progress() as bar:
        task = bar.add_task(f"fitting {2 * n_layers} transforms", total=2 * n_layers, info="")

        def report(done: int, total: int, info: str) -> None:
            bar.update(task, completed=done, info=info)

        derotate = fit["derotate"]
        ckpt = linear.train_linear(
            data,
            held,
            kv_heads=heads,
            head_dim=head_dim,
            k_bits=8 * fit["k_bytes"],
            v_bits=8 * fit["v_bytes"],
            derotate=derotate,
            rope_theta=_rope_theta(model.config),
            max_vectors=fit["max_vectors"],
            seed=fit["seed"],
            progress=report,
            meta={
                **meta,
                "k": "post-RoPE as stored" + (", derotated by the codec" if derotate else ""),
            },
        )
    per_element = (fit["k_bytes"] + fit["v_bytes"] + 4) / (2 * heads * head_dim)
    prefix = f"{per_element:.3f} bytes/element (bf16: 2); "
    _report(ckpt, out, ckpt.save(out), n_layers, started, prefix)


def _linear_data(train_kv, held_kv) -> tuple[dict, dict]:
    """Training vectors (position 0: keys as stored) and held-out chunks at their positions."""
    n_layers = train_kv[0].shape[0]
    chunk = 256  # held-out error measured per 256-token chunk at its absolute position, as stored
    data = {
        ("kv"[i], layer): [(0, kv[layer, i]) for kv in train_kv]
        for layer in range(n_layers)
        for i in (0, 1)
    }
    held = {
        ("kv"[i], layer): [
            (c, kv[layer, i, c : c + chunk]) for kv in held_kv for c in range(0, kv.shape[2], chunk)
        ]
        for layer in range(n_layers)
        for i in (0, 1)
    }
    return data, held


def _report(ckpt, out: Path, digest: str, n_layers: int, started: float, prefix: str = "") -> None:
    """Print the held-out error and the time; the checkpoint and its sha256 as JSON on stdout."""
    import numpy as np

    errs = json.loads(ckpt.meta["heldout_rel_err"])
    k = [errs[f"k{i}"] for i in range(n_layers)]
    v = [errs[f"v{i}"] for i in range(n_layers)]
    console.print(
        f"{prefix}held-out relative error: K mean {np.mean(k):.3f} (max {max(k):.3f}), "
        f"V mean {np.mean(v):.3f} (max {max(v):.3f})"
    )
    console.print(f"{time.perf_counter() - started:.0f} s; checkpoint {out}")
    typer.echo(json.dumps({"checkpoint": str(out), "sha256": digest}))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise typer.BadParameter(
            f"linear-ae derotation knows plain RoPE only, not {params.get('rope_type')!r}"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


@codec_app.command()
def show(
    checkpoint: Path = typer.Argument(..., help="learned codec checkpoint (.safetensors)"),
) -> None:
    """Print a checkpoint's metadata, sha256 and recorded held-out error per layer."""
    from kvstrata.compression import linear
    from kvstrata.compression.autoencoder import load_checkpoint
    from kvstrata.compression.base import CodecError
    from kvstrata.compression.checkpoint_file import metadata as _safetensors_metadata

    try:
        try:
            fmt = _safetensors_metadata(checkpoint.read_bytes()).get("format")
        except (OSError, ValueError, struct.error):
            fmt = None
        if fmt == linear.FORMAT:
            ckpt = linear.load_linear_checkpoint(str(checkpoint), None)
        else:
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
            t.add_row(
                str(layer),
                f"{errs.get(f'k{layer}', float('nan')):.4f}",
                f"{errs.get(f'v{layer}', float('nan')):.4f}",
            )
        Console().print(t)
