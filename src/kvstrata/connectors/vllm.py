"""StrataConnector: kvstrata behind vLLM's KV connector API (v1).

Use ``kvstrata serve MODEL --strata-config strata.yaml [vllm serve options]``
(docs/serving.md), or in any vLLM entry point::

    --kv-transfer-config '{"kv_connector": "StrataConnector",
        "kv_connector_module_path": "kvstrata.connectors.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"config": "strata.yaml"}}'

A thin facade: vLLM makes one instance per role; the scheduler role
delegates to :class:`~kvstrata.connectors.vllm_scheduler.SchedulerSide`, the
worker role to :class:`~kvstrata.connectors.vllm_worker.WorkerSide`, each
over its process's :class:`~kvstrata.orchestrator.Orchestrator` (one shared
by both roles when they share a process). In vLLM's default multiprocess
mode the worker's DRAM pool is made visible to the scheduler through worker
metadata (:mod:`~kvstrata.connectors.vllm_pool`); metrics reach vLLM's
``/metrics`` (:mod:`~kvstrata.connectors.vllm_metrics`); KV cache events name
the tier as ``medium`` (:mod:`~kvstrata.connectors.vllm_events`).

Loads are synchronous from vLLM's point of view (the step that uses them
starts them), layer-wise inside: attention of layer l waits only for layer l;
a load from a slow remote tier while others run goes asynchronous instead
(``WAITING_FOR_REMOTE_KVS``, ``get_finished``: :mod:`~kvstrata.connectors.vllm_async`).
If a load fails, its blocks are reported and vLLM recomputes them: kvstrata
sets ``kv_load_failure_policy`` to ``recompute`` (vLLM's default, ``fail``,
would fail the request), because a cache that is down must never fail a
request. On a page layout it does not know, the connector logs one warning
and stays out of the way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstrata import layout
from kvstrata.connectors import vllm_async, vllm_events, vllm_pool
from kvstrata.connectors.vllm_meta import StrataMetadata
from kvstrata.connectors.vllm_metrics import StrataPromMetrics, StrataStats
from kvstrata.connectors.vllm_scheduler import SchedulerSide
from kvstrata.connectors.vllm_setup import model_spec, strata_config
from kvstrata.connectors.vllm_worker import WorkerSide
from kvstrata.documents import connector as documents
from kvstrata.orchestrator import Orchestrator
from kvstrata.telemetry import exporter

log = logging.getLogger("vllm.kvstrata")  # under "vllm" so vLLM's logging shows it


class StrataConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        config = strata_config(extra)
        self.block_size = vllm_config.cache_config.block_size
        spec = model_spec(vllm_config, extra)
        self._isa = _cpu_isa(vllm_config, spec)  # CPU attention ISA (None on GPU builds)
        self.model = dataclasses.replace(
            spec, page_layout=_page_layout(self._isa), page_block=self.block_size
        )
        if config.chunk_tokens % self.block_size:
            raise ValueError(
                f"kvstrata chunk_tokens={config.chunk_tokens} must be a multiple of the engine's "
                f"block size {self.block_size}"
            )
        self.enabled = _layout_supported(self._isa)
        if (
            role == KVConnectorRole.SCHEDULER
            and self._kv_transfer_config.kv_load_failure_policy != "recompute"
        ):
            log.info(
                "kvstrata: setting kv_load_failure_policy=recompute (a failed load is a cache miss)"
            )
            object.__setattr__(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        self.orch = Orchestrator.shared(config, self.model)
        vllm_pool.attach(
            self.orch, worker=role == KVConnectorRole.WORKER
        )  # one DRAM pool, seen by both roles
        self._build_sides(config, vllm_config)
        self._errors_reported = 0
        # every change goes to vLLM's /metrics through the connector stats
        self.orch.telemetry.forward()
        # opt-in extras (telemetry: in the YAML): a standalone exporter, for engines without vLLM's
        # /metrics (offline LLM), and snapshot files for kvstrata stats/report
        self.telemetry_service = exporter.serve(
            self.orch.telemetry, config.telemetry, role.name.lower()
        )
        if self.telemetry_service is not None and self.telemetry_service.url:
            log.info(
                "kvstrata metrics (%s, pid %d): %s",
                self.telemetry_service.role,
                os.getpid(),
                self.telemetry_service.url,
            )
        log.info(
            "kvstrata %s: %s, tiers %s, enabled=%s",
            role.name,
            self.model,
            list(config.tiers),
            self.enabled,
        )

    def _build_sides(self, config, vllm_config) -> None:
        """The scheduler and worker sides, each with its half of the documents branch
        (:mod:`kvstrata.documents.connector`; none if the model or config cannot have one)."""
        docs = documents.build_branch(
            config,
            self.model,
            self.orch.whole,
            vllm_config.model_config.hf_config,
            self.block_size,
            self.orch.telemetry,
        )
        self.scheduler = SchedulerSide(
            self.orch,
            self.block_size,
            self.model.name,
            docs.scheduler if docs else None,
            async_settings=vllm_async.AsyncSettings.from_extra(
                dict(self._kv_transfer_config.kv_connector_extra_config or {})
            ),
        )
        self.events = vllm_events.EventLog(self.block_size, vllm_events.enabled(vllm_config))
        self.scheduler.events = self.events
        self.worker = WorkerSide(self.orch, self.block_size, docs.worker if docs else None)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # -- scheduler side ---------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if self.enabled:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> StrataMetadata:
        if not self.enabled:
            return StrataMetadata()
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.async_.finished(connector_output)  # async loads ended, abandoned ones
        self.events.changed(vllm_pool.apply(self.orch, connector_output.kv_connector_worker_meta))
        stats = connector_output.kv_connector_stats
        # a worker in this process shares our orchestrator: its reads are already counted
        if stats is not None and stats.data.get("reads") and self.orch.users == 1:
            self.scheduler.observe(stats.data["reads"])

    def take_events(self):
        """KV cache events with the tier as ``medium`` (see
        :mod:`kvstrata.connectors.vllm_events`)."""
        return self.events.take()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, self.scheduler.request_finished(request)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        if num_external_tokens == 0:
            return {}
        by_tier = self.scheduler.tokens_by_tier(request.request_id)
        sources: dict = {}
        for tier, tokens in by_tier.items():
            source = CacheHitSource[self.orch.config.tiers[tier].tier_class.hit_source]
            sources[source] = sources.get(source, 0) + tokens
        return (
            sources
            if sum(sources.values()) == num_external_tokens
            else {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        )

    # -- worker side ------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        first = next(iter(kv_caches.values()))
        found = layout.detect(
            first,
            self.block_size,
            self.model.kv_heads,
            self.model.head_dim,
            first.device.type,
            self._isa,
        )
        if found is not None and found.name != self.model.page_layout:
            log.warning(
                "kvstrata: page layout %s is not the expected %s",
                found.name,
                self.model.page_layout,
            )
            found = None
        if found is None or not self.enabled:
            log.warning(
                "kvstrata: unknown KV page layout %s on %s; connector disabled",
                tuple(first.shape),
                first.device.type,
            )
            self.enabled = False
            return
        self.worker.register(kv_caches, found)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self.enabled:
            self.worker.start_load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.enabled:
            self.worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any
    ) -> None:
        if self.enabled:
            self.worker.save_layer(layer_name, kv_layer, self._get_connector_metadata())

    def wait_for_save(self) -> None:
        if self.enabled:
            self.worker.finish_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Async loads that ended this step (see :mod:`kvstrata.connectors.vllm_async`)."""
        return None, self.worker.async_loads.finished(finished_req_ids) if self.enabled else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = self.worker.load_errors()
        self._errors_reported += len(errors)
        return errors

    def build_connector_worker_meta(self) -> vllm_pool.PoolChanges | None:
        return vllm_pool.changes(self.orch) if self._role == KVConnectorRole.WORKER else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This role's changes since the last step: reads measured, load errors, the telemetry
        outbox.

        When both roles share one orchestrator (one process), whichever asks
        first takes the changes: each is reported once.
        """
        reads = self.orch.drain_observations()
        errors, self._errors_reported = self._errors_reported, 0
        telemetry = self.orch.telemetry.drain()
        if not reads and not errors and not telemetry:
            return None
        return StrataStats(
            data={
                "reads": [list(r) for r in reads],
                "load_error_blocks": errors,
                "telemetry": telemetry,
            }
        )

    @classmethod
    def build_kv_connector_stats(cls, data: dict | None = None) -> KVConnectorStats | None:
        return StrataStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        """The ``kvstrata_*`` families on vLLM's ``/metrics`` (see
        :mod:`kvstrata.connectors.vllm_metrics`)."""
        return StrataPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        last = self.orch.users == 1  # the shared orchestrator's last user also stops its exporter
        self.orch.close()
        if last:
            exporter.stop(self.orch.telemetry)


def _cpu_isa(vllm_config, model) -> str | None:
    try:
        from vllm.platforms import current_platform

        if current_platform.device_type != "cpu":
            return None
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return _get_attn_isa(
            vllm_config.model_config.dtype,
            vllm_config.cache_config.block_size,
            model.head_dim,
            vllm_config.cache_config.cache_dtype,
        )
    except Exception:  # an unknown CPU backend: detect() will refuse
        return "unknown"


def _page_layout(isa: str | None) -> str:
    from vllm.platforms import current_platform

    return layout.expected_name(current_platform.device_type, isa)


def _layout_supported(isa: str | None) -> bool:
    if isa not in (None, "vec"):
        log.warning(
            "kvstrata: CPU attention ISA %r has a page layout kvstrata does not know; disabled", isa
        )
        return False
    return True
