"""Load-versus-recompute cost model.

Per tier it keeps a latency and a bandwidth estimate, starting from the
configured priors and following what the orchestrator observes (exponential
moving averages: small reads teach latency, large reads teach bandwidth).
For the engine it keeps a prefill rate (tokens/s), configured or observed.
An estimate that is not refreshed relaxes back to its prior (half-life
``relax_s``), so a tier judged slow during a blip is tried again later.

A plan loads a prefix of ``k`` chunks and recomputes the rest. Its time to
first token is estimated as

* whole-object loads: ``load(k) + compute(rest)``, the load of each tier
  running concurrently (so ``load(k)`` is the slowest tier's share);
* layer-wise loads: the pipeline bound with uniform layers,
  ``X + (L-1) * max(X, C) + C`` with ``X = load(k)/L`` and ``C = compute(rest)/L``
  (ObjectCache's model: transfer of layer l+1 hides behind compute of layer l).

:meth:`CostModel.choose` returns the ``k`` with the lowest estimate among
those whose load fits the latency budget, preferring longer prefixes on ties;
``k = 0`` (recompute everything) is always allowed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvstrata.policy import pipeline

SMALL_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class Prior:
    latency_ms: float
    bandwidth_mbps: float


UNKNOWN_PRIOR = Prior(5.0, 200.0)


@dataclass
class _TierEstimate:
    latency_s: float
    bandwidth_bps: float
    prior: Prior
    latency_obs: int = 0
    bandwidth_obs: int = 0
    updated: float = 0.0


def _estimate(prior: Prior) -> _TierEstimate:
    return _TierEstimate(prior.latency_ms / 1e3, prior.bandwidth_mbps * 1e6, prior)


@dataclass(frozen=True)
class Choice:
    """The cost model's answer for one lookup: load ``chunks`` chunks, or none."""

    chunks: int
    load_s: float
    compute_s: float
    ttft_s: float
    recompute_all_s: float
    reason: str

    @property
    def saved_s(self) -> float:
        return self.recompute_all_s - self.ttft_s


class CostModel:
    def __init__(
        self,
        priors: Mapping[str, Prior],
        prefill_tokens_per_s: float,
        n_layers: int = 32,
        alpha: float = 0.2,
        relax_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._tiers = {name: _estimate(p) for name, p in priors.items()}
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.n_layers = n_layers
        self.alpha = alpha
        # An estimate nobody refreshes relaxes back to its prior (half-life relax_s), so a
        # tier judged slow during a blip is tried again later instead of never.
        self.relax_s = relax_s
        self._clock = clock
        self._lock = threading.Lock()
        self._get_s: dict[str, float] = {}  # tier -> seconds per GET in a batch (observe_gets)
        self._stored: dict[
            str, float
        ] = {}  # codec -> stored bytes per uncompressed byte (observe_stored)

    @classmethod
    def from_config(cls, config, n_layers: int = 32) -> CostModel:
        priors = {
            name: Prior(spec.cost.latency_ms, spec.cost.bandwidth_mbps)
            for name, spec in config.tiers.items()
        }
        return cls(priors, config.engine.prefill_tokens_per_s, n_layers)

    # -- learning -----------------------------------------------------------

    def observe_read(self, tier: str, seconds: float, nbytes: int) -> None:
        """One read (a batch counts as one) of ``nbytes`` that took ``seconds``."""
        with self._lock:
            est = self._tiers.setdefault(tier, _estimate(UNKNOWN_PRIOR))
            est.updated = self._clock()
            # the first observation of each kind replaces the prior outright
            if nbytes <= SMALL_READ_BYTES:
                a = self.alpha if est.latency_obs else 1.0
                est.latency_s += a * (seconds - est.latency_s)
                est.latency_obs += 1
            else:
                a = self.alpha if est.bandwidth_obs else 1.0
                transfer = max(seconds - est.latency_s, seconds * 0.1, 1e-9)
                est.bandwidth_bps += a * (nbytes / transfer - est.bandwidth_bps)
                est.bandwidth_obs += 1

    def observe_gets(self, tier: str, seconds: float, gets: int) -> None:
        """A batch of ``gets`` reads issued together took ``seconds``: the store's time per GET
        (its throughput in requests, what a layer group costs beyond its bytes)."""
        per_get = seconds / max(gets, 1)
        with self._lock:
            old = self._get_s.get(tier)
            self._get_s[tier] = per_get if old is None else old + self.alpha * (per_get - old)

    def per_get_s(self, tier: str) -> float:
        """Seconds per GET in a batch, as observed; before
        any observation, an eighth of the latency."""
        with self._lock:
            found = self._get_s.get(tier)
        return found if found is not None else self.tier(tier)[0] / 8

    def observe_stored(self, codec: str, fraction: float) -> None:
        """A read found ``codec``'s layers at ``fraction`` of their uncompressed size."""
        with self._lock:
            old = self._stored.get(codec)
            self._stored[codec] = fraction if old is None else old + self.alpha * (fraction - old)

    def stored_fraction(self, codec: str) -> float:
        """Stored bytes per uncompressed byte of ``codec``'s layers, as reads found them; 1 before
        any (a link then reserves too much, never too little)."""
        with self._lock:
            return self._stored.get(codec, 1.0)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self.prefill_tokens_per_s += self.alpha * (
                    tokens / seconds - self.prefill_tokens_per_s
                )

    # -- estimating ---------------------------------------------------------

    def tier(self, name: str) -> tuple[float, float]:
        """(latency seconds, bandwidth bytes/s) currently believed for a tier."""
        with self._lock:
            est = self._tiers.get(name) or _estimate(UNKNOWN_PRIOR)
            if not (est.latency_obs or est.bandwidth_obs):
                return est.latency_s, est.bandwidth_bps
            w = 0.5 ** ((self._clock() - est.updated) / self.relax_s)
            p = est.prior
            return (
                w * est.latency_s + (1 - w) * p.latency_ms / 1e3,
                w * est.bandwidth_bps + (1 - w) * p.bandwidth_mbps * 1e6,
            )

    def read_s(self, tier: str, nbytes: int) -> float:
        latency, bandwidth = self.tier(tier)
        return latency + nbytes / bandwidth

    def recompute_s(self, tokens: int) -> float:
        return max(tokens, 0) / self.prefill_tokens_per_s

    def ttft_s(self, load_s: float, compute_s: float, layerwise: bool) -> float:
        if not layerwise or load_s == 0:
            return load_s + compute_s
        n = self.n_layers
        return pipeline.bound([load_s / n] * n, [compute_s / n] * n)

    def choose(
        self,
        chunk_tiers: Sequence[str],
        chunk_tokens: int,
        chunk_bytes: int,
        context_tokens: int,
        budget_s: float | None,
        layerwise: bool,
        codecs: Mapping[str, str] | None = None,
    ) -> Choice:
        """Best prefix length given where each available chunk is (``chunk_tiers[i]``).
        ``chunk_bytes`` is a chunk's uncompressed size; a tier whose codec (``codecs[tier]``)
        stores less moves what reads found that codec to store."""
        recompute_all = self.recompute_s(context_tokens)
        best = Choice(0, 0.0, recompute_all, recompute_all, recompute_all, "nothing to load")
        moved = {
            t: chunk_bytes * self.stored_fraction((codecs or {}).get(t, "none"))
            for t in set(chunk_tiers)
        }
        per_tier: dict[str, float] = {}
        for k, tier in enumerate(chunk_tiers, start=1):
            per_tier[tier] = per_tier.get(tier, 0) + moved[tier]
            load = max(self.read_s(t, b) for t, b in per_tier.items())
            if budget_s is not None and load > budget_s:
                if best.chunks == 0:
                    best = Choice(
                        0,
                        0.0,
                        recompute_all,
                        recompute_all,
                        recompute_all,
                        f"loading even 1 chunk ({load * 1e3:.1f} ms) exceeds the budget",
                    )
                break
            compute = self.recompute_s(context_tokens - k * chunk_tokens)
            ttft = self.ttft_s(load, compute, layerwise)
            if ttft <= best.ttft_s:
                best = Choice(k, load, compute, ttft, recompute_all, "loading beats recomputing")
        if best.chunks == 0 and chunk_tiers and best.reason == "nothing to load":
            best = Choice(
                0,
                0.0,
                recompute_all,
                recompute_all,
                recompute_all,
                "recomputing is faster than loading from these tiers",
            )
        return best

    def explain(
        self,
        route,
        context_tokens: int,
        budget_ms: float | None,
        chunk_tokens: int = 256,
        bytes_per_token: int = 0,
    ) -> list[tuple[str, str]]:
        """Rows for ``kvstrata policy explain``: what a full hit in each read tier would cost."""
        rows = [
            ("prefill rate (tokens/s)", f"{self.prefill_tokens_per_s:,.0f}"),
            ("recompute all", f"{self.recompute_s(context_tokens) * 1e3:,.1f} ms"),
        ]
        n_chunks = context_tokens // chunk_tokens
        chunk_bytes = chunk_tokens * (bytes_per_token or 46 * 1024)
        budget_s = None if budget_ms is None else budget_ms / 1e3
        for tier in route.read:
            latency, bandwidth = self.tier(tier)
            choice = self.choose(
                [tier] * n_chunks,
                chunk_tokens,
                chunk_bytes,
                context_tokens,
                budget_s,
                route.retrieval == "layerwise",
            )
            rows.append(
                (
                    f"{tier}: latency / bandwidth",
                    f"{latency * 1e3:.2f} ms / {bandwidth / 1e6:,.0f} MB/s",
                )
            )
            rows.append(
                (
                    f"{tier}: full hit ({n_chunks} chunks)",
                    f"load {choice.chunks}/{n_chunks} chunks, TTFT {choice.ttft_s * 1e3:,.1f} ms "
                    f"({choice.reason})",
                )
            )
        return rows
