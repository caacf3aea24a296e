"""Draws docs/img/architecture.png: kvstrata's packages and the data path of one chunk.

    .venv/bin/python docs/img/architecture.py

The picture is made from this file (boxes and arrows in matplotlib), so it is
regenerated, not edited. Solid arrows: a hit (load); dashed: a save.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_suffix(".png")

# (x, y, w, h, title, body, colour); coordinates in a 100 x 64 canvas
BOXES = {
    "vllm": (2, 50, 96, 11, "vLLM (engine core process | worker process)", "", "#eeeeee"),
    "sched": (
        4,
        51,
        44,
        7,
        "connectors/  scheduler side",
        "vllm_scheduler.py  vllm_pool.py (DRAM index)\nvllm_events.py  vllm_metrics.py",
        "#dbe9f6",
    ),
    "work": (
        52,
        51,
        44,
        7,
        "connectors/  worker side",
        "vllm_worker.py  layout.py (pages <-> canonical KV)\nvllm_meta.py (what crosses the boundary)",
        "#dbe9f6",
    ),
    "policy": (
        2,
        30,
        26,
        16,
        "policy/",
        "engine.py rules.py (YAML routes)\ncost.py (load vs recompute)\nreuse.py (prefix reuse)\nbandwidth.py (link shares)\npipeline.py (layer-wise)",
        "#fde9c9",
    ),
    "orch": (
        31,
        30,
        38,
        16,
        "orchestrator/  (the one choke point)",
        "lookup  loader (paced, layer by layer)\nwriter (save queue)  tiering (promote/demote)\ncalls: breaker, timeout, metrics, codec,\nerrors -> results;  shares (per process)",
        "#f6d5d5",
    ),
    "docs": (
        72,
        30,
        26,
        16,
        "documents/",
        "stitch.py (which tokens, which doc)\nrope.py (re-position keys)\ncorpus.py (manifest, objects)\nconnector.py (documents branch)",
        "#e4f2dc",
    ),
    "codec": (
        2,
        14,
        30,
        12,
        "compression/",
        "base.py (Codec, registry)\nquant.py (fp8, int8, int4)\nlinear.py autoencoder.py (learned)",
        "#ece2f4",
    ),
    "fmt": (
        35,
        14,
        30,
        12,
        "keys.py  format.py  auth.py",
        "chained chunk keys, namespaces\nobject format v3 (layer-major)\nkeyed BLAKE3 tags and MAC",
        "#ece2f4",
    ),
    "cfg": (
        68,
        14,
        30,
        12,
        "config/  model.py  fingerprint.py",
        "one YAML -> frozen StrataConfig\nfile:line errors, KVSTRATA_* env\nmodel geometry + weights identity",
        "#eeeeee",
    ),
    "tiers": (
        2,
        1,
        96,
        10,
        "tiers/  (Tier: contains / get / put / delete, verified results)",
        "memory.py (DRAM)   disk.py   lmcache.py   redis.py (shared, cluster)   s3/ (tier, obstore, aioboto3, nixl)\nworkers.py: one bounded thread pool per tier",
        "#dbe9f6",
    ),
}
ARROWS = [  # (start, end, label, label position, dashed)
    ((26, 50.6), (38, 46.4), "lookup -> Plan", (27, 48.3), False),
    ((74, 50.6), (62, 46.4), "load layers / save", (73, 48.3), False),
    ((30.6, 34), (28.4, 34), "decide", (29.5, 40.5), False),
    ((71.6, 34), (69.4, 34), "fetch / store", (70.5, 40.5), False),
    ((40, 29.6), (24, 26.4), "encode / decode", (29, 28.4), True),
    ((52, 29.6), (52, 26.4), "objects", (55.5, 28.2), True),
    ((66.5, 29.6), (66.5, 11.4), "get / put", (66.5, 20.5), False),
]
SIDE = [
    "cli/  (every subcommand)",
    "offline/  (convert, capture, precompute, runner)",
    "telemetry/  (metrics, exporter, report, /lookup)",
    "testing/  (real Redis, S3, RGW; throttle)",
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 8.6), dpi=110)
    ax.set_xlim(0, 100), ax.set_ylim(-7, 63), ax.axis("off")
    for x, y, w, h, title, body, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3", fc=colour, ec="#555"))
        ax.text(x + 0.8, y + h - 1.2, title, weight="bold", va="top", fontsize=9.5)
        ax.text(x + 0.8, y + h - 3.4, body, va="top", fontsize=8.2, family="monospace")
    for start, end, label, at, dashed in ARROWS:
        style = "--" if dashed else "-"
        arrow = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, ls=style)
        ax.add_patch(arrow)
        vertical = abs(start[1] - end[1]) < 1 or start[0] == end[0] and label != "objects"
        ax.text(
            *at,
            label,
            fontsize=8,
            ha="center",
            va="center",
            rotation=90 if vertical else 0,
            bbox=dict(fc="white", ec="none", alpha=0.9),
        )
    ax.text(2, -2.5, "beside the data path:   " + "   |   ".join(SIDE), fontsize=8.5)
    ax.text(
        2,
        -5.5,
        "a hit: scheduler lookup -> Plan -> worker load -> tier get -> verify -> "
        "decode -> pages.   a save: worker -> writer queue -> encode -> put.",
        fontsize=8.5,
    )
    fig.savefig(OUT, bbox_inches="tight")
    print(OUT)


if __name__ == "__main__":
    main()
