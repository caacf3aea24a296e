"""Turning vLLM's configuration and requests into kvstrata's values."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from kvstrata.config import StrataConfig, default_config, load_config
from kvstrata.fingerprint import model_identity, model_label
from kvstrata.model import ModelSpec
from kvstrata.policy.route import RequestContext

log = logging.getLogger(__name__)

_DTYPES = {
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def strata_config(extra: Mapping[str, Any]) -> StrataConfig:
    """``kv_connector_extra_config["config"]`` (a YAML
    path) or the embedded default (memory + disk).

    The default is parsed once per process, so vLLM's two roles in one
    process get the same configuration object and share one orchestrator.
    """
    path = extra.get("config") or os.environ.get("KVSTRATA_CONFIG")
    return load_config(path) if path else _default()


@functools.cache
def _default() -> StrataConfig:
    return default_config()


def model_spec(vllm_config, extra: Mapping[str, Any]) -> ModelSpec:
    """The KV geometry and identity of the served model.

    ``name`` (what policies match) is ``extra["model_id"]`` if given, else the
    model directory's or hub name's last component plus the architecture and
    sizes. Keys follow ``identity``: the weights themselves
    (:func:`kvstrata.fingerprint.model_identity`: a content fingerprint of a
    local checkpoint, the commit of a hub snapshot), so the same checkpoint
    under any path on any host shares KV and two checkpoints that differ in
    weights never do -- unless an operator's ``model_id`` says they are the same
    (then keys follow ``model_id`` alone).
    """
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    hf = mc.hf_config
    kv_dtype = vllm_config.cache_config.cache_dtype
    dtype = _DTYPES.get(str(mc.dtype) if kv_dtype == "auto" else kv_dtype)
    if dtype is None:
        raise ValueError(f"kvstrata does not know the KV dtype {kv_dtype!r}/{mc.dtype}")
    name = extra.get("model_id") or model_label(str(mc.model), hf)
    identity = (
        ""
        if extra.get("model_id")
        else model_identity(str(mc.model), hf, getattr(mc, "revision", None))
    )
    if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1:
        log.warning(
            "kvstrata: tensor/pipeline parallelism is not supported yet; keys are not per rank"
        )
    return ModelSpec(
        name=name,
        n_layers=mc.get_num_layers(pc),
        kv_heads=mc.get_num_kv_heads(pc),
        head_dim=mc.get_head_size(),
        dtype=dtype,
        identity=identity,
    )


def request_context(request, model: str) -> RequestContext:
    """Policy features of a vLLM request: its cache
    salt is the tenant, kv_transfer_params the hints.

    Recognised params: ``budget_ms`` (number), ``reuse`` (0..1), ``tags``
    (list of strings); every other scalar becomes a string hint.
    """
    params = dict(getattr(request, "kv_transfer_params", None) or {})
    budget = _number(params.pop("budget_ms", None))
    tags = params.pop("tags", None) or ()
    hints = {str(k): str(v) for k, v in params.items() if isinstance(v, (str, int, float, bool))}
    return RequestContext(
        context_tokens=len(request.prompt_token_ids or ()),
        budget_ms=budget,
        tenant=getattr(request, "cache_salt", None) or "",
        model=model,
        tags=frozenset(str(t) for t in (tags if isinstance(tags, (list, tuple)) else [tags])),
        hints=hints,
    )


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
