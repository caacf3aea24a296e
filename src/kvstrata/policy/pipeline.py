"""The layer-wise pipeline: when does a request finish
if layer l's KV arrives while layer l-1 computes?

ObjectCache's model, per layer ``l`` of ``L``: ``X_l`` is the time to transfer
layer l's KV (every chunk of the request), ``C_l`` the time the engine computes
layer l. With transfer of layer l+1 overlapping compute of layer l, a request
cannot finish before the *pipeline bound*

    T = X_0 + sum_{l < L-1} max(X_{l+1}, C_l) + C_{L-1}

(exact for uniform layers; with uneven layers, transfers that run back to back
can do a little better than this lockstep formula)

Real reads come in *groups* of layers (one ranged GET per chunk per group, so
a request costs ``chunks x groups`` GETs instead of ``chunks x L``), and each
GET pays a fixed overhead. :func:`simulate` gives the finish time of a
grouping under that model; :func:`plan_groups` picks the grouping with the
fewest GETs whose simulated finish is within ``tolerance`` of the best.

Growing groups (1, 2, 4, ...) keep the first layer's wait short while later
layers, which have the compute of earlier layers to hide behind, come in
fewer, larger GETs.
"""

from __future__ import annotations

from collections.abc import Sequence

Groups = tuple[range, ...]


def bound(x: Sequence[float], c: Sequence[float]) -> float:
    """The pipeline bound: per-layer transfer times ``x`` and compute times ``c``."""
    n = len(x)
    return x[0] + sum(max(x[i + 1], c[i]) for i in range(n - 1)) + c[n - 1]


def simulate(
    groups: Groups, x: Sequence[float], c: Sequence[float], overhead_s: float = 0.0, window: int = 2
) -> float:
    """Finish time of a request whose layers arrive in ``groups``.

    Transfers run one after another on the request's share of the link (layer
    order); each group's GET costs ``overhead_s`` before its bytes flow, hidden
    behind the previous group's transfer when at most ``window`` groups are in
    flight. A layer computes once its group has arrived and the previous layer
    has computed.
    """
    arrived: list[float] = []
    link_free = 0.0
    for g, layers in enumerate(groups):
        # the GET is issued when a window slot frees (the group `window` earlier arrived)
        issued = arrived[g - window] if g >= window else 0.0
        start = max(link_free, issued + overhead_s)
        link_free = start + sum(x[layer] for layer in layers)
        arrived.append(link_free)
    done = 0.0
    for g, layers in enumerate(groups):
        for layer in layers:
            done = max(done, arrived[g]) + c[layer]
    return done


def uniform(n_layers: int, size: int) -> Groups:
    return tuple(range(a, min(a + size, n_layers)) for a in range(0, n_layers, size))


def growing(n_layers: int, first: int = 1, factor: int = 2, largest: int | None = None) -> Groups:
    """Groups of ``first``, ``first*factor``, ... layers, each at most ``largest``."""
    largest = largest or n_layers
    out, a, size = [], 0, first
    while a < n_layers:
        out.append(range(a, min(a + size, n_layers)))
        a += size
        size = min(size * factor, largest)
    return tuple(out)


def candidates(n_layers: int) -> list[Groups]:
    """The groupings :func:`plan_groups` considers: uniform sizes and growing sequences."""
    sizes = sorted({1, 2, 3, 4, 6, 8, 12, 16, n_layers} & set(range(1, n_layers + 1)))
    out = [uniform(n_layers, s) for s in sizes]
    for first in (1, 2, 4):
        for largest in (4, 8, 16, None):
            out.append(growing(n_layers, first, 2, largest))
    return list(dict.fromkeys(out))  # unique, in order


def plan_groups(
    x: Sequence[float],
    c: Sequence[float],
    overhead_s: float,
    window: int = 2,
    tolerance: float = 0.005,
) -> Groups:
    """The grouping with the fewest GETs whose simulated
    finish is within ``tolerance`` of the best."""
    n = len(x)
    scored = [(simulate(g, x, c, overhead_s, window), len(g), g) for g in candidates(n)]
    best = min(t for t, _, _ in scored)
    fine = [(k, t, g) for t, k, g in scored if t <= best * (1 + tolerance) + 1e-9]
    return min(fine, key=lambda s: (s[0], s[1]))[2]
