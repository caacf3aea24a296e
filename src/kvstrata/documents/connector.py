"""The documents branch of StrataConnector: stitched prefixes instead of chunk lookups.

Scheduler side (:class:`DocumentScheduler`, engine-core process): a request
that names documents in ``kv_transfer_params`` --
``{"kvstrata": {"documents": ["system", "doc-a", ...], "repair": "none"}}`` --
or, with ``documents.detect``, whose prompt starts with registered documents,
gets a :class:`~kvstrata.documents.stitch.StitchPlan`; its ``end`` minus what
the engine already holds is reported to vLLM as external tokens. Such a
request bypasses the orchestrator's chunk lookup **and is never saved**: its
KV beyond the first document is an approximation and must not be stored under
exact prompt keys.

Worker side (:class:`DocumentWorker`, model process): ``start`` fetches the
documents' objects on the background loop; ``place`` (before each attention
layer) assembles that layer -- keys re-rotated -- and writes it into the
request's blocks with the page layout, exactly like a normal load. A missing
object or any error reports the blocks to vLLM, which recomputes them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstrata import runtime
from kvstrata.connectors.vllm_meta import DocLoadSpec
from kvstrata.documents.corpus import Corpus, Manifest, corpus_tiers
from kvstrata.documents.rope import Rope, UnsupportedRope
from kvstrata.documents.stitch import REPAIRS, StitchPlan, assemble_layer, plan_stitch
from kvstrata.orchestrator.whole import WholeObjects

log = logging.getLogger("vllm.kvstrata.documents")

DOCUMENTS = "documents"  # the telemetry source of stitched tokens
MANIFEST_REFRESH_S = 5.0  # at most this often when a request names an unknown document
MANIFEST_MAX_AGE_S = 60.0  # re-read at least this often (one small read on the scheduler thread)
FETCH_WAIT_S = 60.0


@dataclass
class _Stitched:
    plan: StitchPlan
    num_computed: int
    load_pending: bool = False
    block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class DocumentsBranch:
    """The two halves of the documents branch; StrataConnector gives each to its side."""

    scheduler: DocumentScheduler
    worker: DocumentWorker


def build_branch(
    config, model, store: WholeObjects, hf_config, block_size: int, telemetry=None
) -> DocumentsBranch | None:
    """The documents branch of a connector over an orchestrator's whole-object ``store``, or
    None (logged) where it cannot work (an unsupported rotary embedding, unknown tiers)."""
    try:
        rope = Rope.from_config(hf_config)
    except UnsupportedRope as exc:
        log.info("kvstrata: per-document KV disabled: %s", exc)
        return None
    try:
        tiers = corpus_tiers(config)
    except ValueError as exc:
        log.warning("kvstrata: per-document KV disabled: %s", exc)
        return None
    corpus = Corpus(config.documents.corpus, model, store, tiers, rope.describe())
    return DocumentsBranch(
        DocumentScheduler(corpus, config.documents, block_size, telemetry),
        DocumentWorker(corpus, rope, telemetry),
    )


class DocumentScheduler:
    def __init__(self, corpus: Corpus, settings, block_size: int, telemetry=None):
        self.corpus, self.settings, self.block_size, self.telemetry = (
            corpus,
            settings,
            block_size,
            telemetry,
        )
        self._manifest: Manifest | None = None
        self._loaded_at = 0.0
        self._requests: dict[str, _Stitched] = {}

    def manifest(self, refresh: bool = False) -> Manifest | None:
        now = time.monotonic()
        stale = now - self._loaded_at > MANIFEST_MAX_AGE_S  # documents added while the engine runs
        if (
            self._manifest is None
            or stale
            or (refresh and now - self._loaded_at > MANIFEST_REFRESH_S)
        ):
            self._loaded_at = now
            try:
                manifest = runtime.run(self.corpus.load_manifest(), timeout=30)
            except (
                Exception
            ) as exc:  # a corpus that cannot be read means no stitching, never a failure
                log.warning("kvstrata: corpus %r manifest unreadable: %s", self.corpus.name, exc)
                return self._manifest
            if manifest.rope != self.corpus.rope:
                log.warning(
                    "kvstrata: corpus %r was computed with another rotary embedding; ignored",
                    self.corpus.name,
                )
                return self._manifest
            self._manifest = manifest
        return self._manifest

    def match(self, request, num_computed: int) -> int | None:
        """External tokens for a document request, or None: not one (the normal path handles it).

        Never raises: anything wrong (a malformed request, an unreadable manifest) means "not a
        document request", i.e. exact computation.
        """
        state = self._requests.get(request.request_id)
        if state is not None and state.num_computed == num_computed:
            return max(state.plan.end - num_computed, 0)
        try:
            plan = self._plan(request)
        except Exception as exc:
            log.warning("kvstrata: request %s: documents ignored: %s", request.request_id, exc)
            return None
        if plan is None:
            return None
        # Stitched, even if the engine already holds the whole stitched part (its prefix cache
        # kept it from an earlier identical request): such a request must never be saved as
        # exact KV.
        self._requests[request.request_id] = _Stitched(plan, num_computed)
        return max(plan.end - num_computed, 0)

    def _plan(self, request) -> StitchPlan | None:
        raw = getattr(request, "kv_transfer_params", None) or {}
        params = raw.get("kvstrata") if isinstance(raw, dict) else None
        params = params if isinstance(params, dict) else {}
        names = params.get(DOCUMENTS)
        if names is not None and (not isinstance(names, (list, tuple)) or not names):
            raise ValueError(f"{DOCUMENTS!r} must be a non-empty list of document ids")
        if names is None and not self.settings.detect:
            return None
        repair = str(params.get("repair", self.settings.repair))
        if repair not in REPAIRS:
            raise ValueError(f"unknown repair {repair!r} (one of {REPAIRS})")
        manifest = self.manifest()
        if manifest is None:
            return None
        if names is not None and any(str(n) not in manifest.documents for n in names):
            manifest = self.manifest(refresh=True) or manifest
        tokens = np.asarray(request.prompt_token_ids or (), dtype=np.int64)
        plan = plan_stitch(tokens, manifest, names, self.corpus, self.block_size, repair)
        if not plan.segments:
            if names is not None:
                log.info(
                    "kvstrata: request %s: no stitched prefix (%s)", request.request_id, plan.reason
                )
            return None
        return plan

    def after_alloc(self, request, blocks, num_external_tokens: int) -> bool:
        """True if the request is a document request (the caller then does nothing else)."""
        state = self._requests.get(request.request_id)
        if state is None:
            return False
        state.block_ids = tuple(blocks.get_block_ids()[0])
        state.load_pending = (
            num_external_tokens > 0 and state.num_computed + num_external_tokens == state.plan.end
        )
        return True

    def handles(self, req_id: str) -> bool:
        return req_id in self._requests

    def loads(self, scheduler_output) -> list[DocLoadSpec]:
        """Loads of the requests scheduled this step whose stitch was granted (new or resumed)."""
        out = []
        scheduled = [r.req_id for r in scheduler_output.scheduled_new_reqs]
        scheduled += list(scheduler_output.scheduled_cached_reqs.req_ids)
        for req_id in scheduled:
            state = self._requests.get(req_id)
            if state is None or not state.load_pending:
                continue
            state.load_pending = False
            plan = state.plan
            out.append(DocLoadSpec.of(req_id, state.block_ids, state.num_computed, plan))
            if self.telemetry is not None:
                self.telemetry.served(DOCUMENTS, max(plan.end - state.num_computed, 0))
        return out

    def finished(self, request) -> dict[str, Any] | None:
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return None
        plan = state.plan
        return {
            "kvstrata": {
                "rule": DOCUMENTS,
                "engine_tokens": state.num_computed,
                "loaded_tokens": {DOCUMENTS: max(plan.end - state.num_computed, 0)},
                "documents": plan.documents,
                "repair": plan.repair,
                "reason": plan.reason,
            }
        }


class DocumentWorker:
    def __init__(self, corpus: Corpus, rope: Rope, telemetry=None):
        self.corpus, self.rope, self.telemetry = corpus, rope, telemetry
        self._loads: list[tuple[DocLoadSpec, concurrent.futures.Future]] = []
        self._errors: set[int] = set()

    @property
    def pending(self) -> bool:
        return bool(self._loads)

    def start(self, specs: list[DocLoadSpec]) -> None:
        for spec in specs:
            self._loads.append((spec, runtime.submit(self.corpus.get(spec.keys()))))

    def place(
        self, layer: int, last_layer: bool, target: torch.Tensor, layout, block_size: int
    ) -> None:
        """Write layer ``layer`` of every started stitch into its blocks; never raises."""
        for spec, future in self._loads:
            first, stop = spec.skip_tokens // block_size, spec.end // block_size
            blocks = spec.block_ids[first:stop]
            if not blocks or set(blocks) & self._errors:
                continue
            try:
                fetched = future.result(timeout=FETCH_WAIT_S)
                objects = {k.digest: o for k, o in zip(spec.keys(), fetched, strict=True)}
                if any(o is None for o in objects.values()):
                    raise LookupError("a document object is missing from every corpus tier")
                segments = spec.stitch_segments()
                kv = assemble_layer(
                    self.corpus,
                    self.rope,
                    segments,
                    objects,
                    layer,
                    first * block_size,
                    stop * block_size,
                )
                layout.write(target, blocks, kv.to(target.dtype))
            except Exception as exc:  # a missing document costs a recompute, never the request
                log.warning("kvstrata: stitching %s failed (%s); recomputing", spec.req_id, exc)
                self._errors.update(blocks)
                if (
                    self.telemetry is not None
                ):  # kvstrata_tier_ops_total{tier="documents",op="stitch"}
                    self.telemetry.op(DOCUMENTS, "stitch", "error")
        if last_layer:
            if self.telemetry is not None:
                for spec, _ in self._loads:
                    blocks = spec.block_ids[spec.skip_tokens // block_size : spec.end // block_size]
                    if blocks and not set(blocks) & self._errors:
                        self.telemetry.op(DOCUMENTS, "stitch", "ok")
            self._loads.clear()

    def load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors
