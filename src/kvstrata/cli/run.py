"""The main job: a small, realistic workload through vLLM with kvstrata on its embedded default.

``kvstrata run`` prepares SmolLM2-135M (from the PyPI wheel, no hub), then
starts vLLM's CPU build twice, each time in a fresh process with the
connector on the embedded default configuration (DRAM + local disk, no
servers), sharing one disk directory:

1. first engine: a multi-turn chat (each turn's prompt extends the last) and
   long documents asked two questions each;
2. second engine (DRAM empty, as after a restart): the same documents asked a
   third question, and the chat's first turn again -- served from disk.

Every request is timed to its first token (a one-token generation); the
table shows TTFT with and without cache and which tier served which tokens.
vLLM's own prefix cache is off so that every reuse shown is kvstrata's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DOC_TOKENS = 1500
QUESTIONS = [
    "Summarize the text above in one sentence.",
    "Which Python keywords does the text above mention?",
    "Give one example of the statement described above.",
]
CHAT = [
    "You are a concise assistant for Python programmers.",
    (
        "How do I read a file line by line?",
        "Use `with open(path) as f:` and iterate: `for line in f:`.",
    ),
    ("And how do I skip blank lines?", "Add `if not line.strip(): continue` inside the loop."),
    ("Can I do that in one expression?", "Yes: `[l for l in open(path) if l.strip()]`."),
    (
        "How do I count the lines that remain?",
        "Wrap it: `sum(1 for l in open(path) if l.strip())`.",
    ),
]


@dataclass(frozen=True)
class Row:
    phase: int
    request: str
    prompt_tokens: int
    cached_tokens: int
    served: dict[str, int]
    ttft_s: float


def _documents(tokenizer, n: int) -> list[str]:
    from pydoc_data.topics import topics

    names = ["for", "with", "try", "class", "def", "if", "while", "import"][:n]
    docs = []
    for name in names:
        ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics) if k.startswith(name)))
        docs.append(tokenizer.decode(ids[:DOC_TOKENS]))
    return docs


def _chat_prompt(tokenizer, turns: int) -> list[int]:
    messages = [{"role": "system", "content": CHAT[0]}]
    for question, answer in CHAT[1 : turns + 1]:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    messages[-1:] = []  # the last answer is what the model is asked for
    # A long system context makes the turns worth caching: the docs of `with`.
    messages[0]["content"] += "\n\nReference:\n" + _documents(tokenizer, 2)[1]
    return tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def run_phase(phase: int, n_docs: int) -> list[Row]:
    from kvstrata.offline.convert import prepare_smollm2
    from kvstrata.offline.runner import make_llm, ttft

    llm = make_llm(prepare_smollm2(progress=False), max_model_len=4096)
    tok = llm.get_tokenizer()
    ttft(llm, tok.encode("warm up the engine")[:8])  # the first request of a process pays a warm-up
    rows = []

    def ask(name: str, ids: list[int]) -> None:
        r = ttft(llm, ids)
        served = dict((r.kvstrata or {}).get("loaded_tokens", {}))
        rows.append(Row(phase, name, len(ids), r.num_cached_tokens, served, r.ttft_s))

    docs = _documents(tok, n_docs)
    if phase == 1:
        for turn in range(1, len(CHAT)):
            ask(f"chat turn {turn}", _chat_prompt(tok, turn))
        for i, doc in enumerate(docs):
            for q in QUESTIONS[:2]:
                ask(f"doc {i + 1}: q{QUESTIONS.index(q) + 1}", tok.encode(doc + "\n\n" + q))
    else:
        ask("chat turn 1 (again)", _chat_prompt(tok, 1))
        for i, doc in enumerate(docs):
            ask(f"doc {i + 1}: q3", tok.encode(doc + "\n\n" + QUESTIONS[2]))
    from kvstrata.orchestrator import flush_shared

    flush_shared(120)
    return rows


def run(n_docs: int = 3, disk_dir: Path | None = None) -> list[Row]:
    """Both phases, each in a fresh process, sharing one disk directory."""
    with tempfile.TemporaryDirectory(prefix="kvstrata-run-") as tmp:
        env = dict(os.environ, KVSTRATA_DISK_PATH=str(disk_dir or Path(tmp) / "kv"))
        rows: list[Row] = []
        for phase in (1, 2):
            out = subprocess.run(
                [sys.executable, "-m", "kvstrata.cli.run", str(phase), str(n_docs)],
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-4000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("ROWS "))
            rows += [Row(**r) for r in json.loads(line[5:])]
        return rows


if __name__ == "__main__":
    phase_rows = run_phase(int(sys.argv[1]), int(sys.argv[2]))
    print("ROWS " + json.dumps([asdict(r) for r in phase_rows]))
