"""Running vLLM's offline engine with StrataConnector: shared by the main job, tests and benchmarks.

``make_llm(model_dir, config_path)`` starts vLLM (fp32, eager, prefix cache
off unless asked, so every reuse is the connector's) with the connector;
``generate(llm, prompt_ids, ...)`` runs one greedy request and returns its
tokens, ``num_cached_tokens``, TTFT and kvstrata's per-request outcome.

vLLM's CPU platform spawns processes: callers must run under
``if __name__ == "__main__":``. Import this module only where vLLM is
installed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def connector_config(config_path: str | Path | None = None, **extra: Any) -> dict[str, Any]:
    """The ``kv_transfer_config`` that puts kvstrata in vLLM."""
    extra_config = dict(extra)
    if config_path is not None:
        extra_config["config"] = str(config_path)
    return {
        "kv_connector": "StrataConnector",
        "kv_connector_module_path": "kvstrata.connectors.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra_config,
    }


def make_llm(
    model_dir: str | Path,
    config_path: str | Path | None = None,
    *,
    connector: bool = True,
    prefix_caching: bool = False,
    max_model_len: int = 8192,
    kv_cache_gib: int = 2,
    **extra: Any,
):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
        seed=0,
        kv_transfer_config=connector_config(config_path, **extra) if connector else None,
    )


@contextlib.contextmanager
def running_llm(
    model_dir: str | Path, config_path: str | Path | None = None, **kw: Any
) -> Iterator[Any]:
    """:func:`make_llm`, shut down on exit (connectors closed, vLLM's connector slot freed).

    vLLM keeps one worker-side connector per process: a second engine in the
    same process would silently reuse the first one's. This frees the slot
    before and after, so tests can run several engines one after another.
    """
    from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown, has_kv_transfer_group

    if has_kv_transfer_group():
        ensure_kv_transfer_shutdown()
    llm = make_llm(model_dir, config_path, **kw)
    try:
        yield llm
    finally:
        finalizer = getattr(getattr(llm.llm_engine, "engine_core", None), "_finalizer", None)
        if finalizer is not None:  # shuts both roles' connectors down (vLLM 0.32's in-process core)
            finalizer()
        if has_kv_transfer_group():
            ensure_kv_transfer_shutdown()


@dataclass(frozen=True)
class Result:
    token_ids: tuple[int, ...]
    text: str
    num_cached_tokens: int
    ttft_s: float
    kvstrata: dict[str, Any] | None


def generate(
    llm,
    prompt_ids: list[int],
    max_tokens: int = 16,
    cache_salt: str | None = None,
    kv_params: dict[str, Any] | None = None,
) -> Result:
    """One greedy request. TTFT is measured as the wall time of a 1-token generation."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    extra = {"kv_transfer_params": kv_params} if kv_params else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)
    started = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - started
    return Result(
        tuple(out.outputs[0].token_ids),
        out.outputs[0].text,
        out.num_cached_tokens or 0,
        elapsed,
        (out.kv_transfer_params or {}).get("kvstrata"),
    )


def ttft(llm, prompt_ids: list[int], **kw) -> Result:
    """A 1-token generation: its wall time is the time to first token."""
    return generate(llm, prompt_ids, max_tokens=1, **kw)


def text_tokens(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    """``n_tokens`` token ids of real English text
    (CPython's own reference docs), from ``offset``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[offset * 4 : offset * 4 + n_tokens * 8])
    if len(ids) < n_tokens:
        raise ValueError("not enough text")
    return ids[:n_tokens]
