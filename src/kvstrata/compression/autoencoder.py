"""A learned codec (KV-CAR-style): per-layer autoencoders along the head dimension.

Each layer has two small autoencoders, one for K and one for V, that map a
``head_dim`` vector (one token, one KV head) to ``latent`` numbers and back::

    encoder: z = W2 . silu(W1 . n(x) + b1) + b2         n(x) = (x - mean) / std
    decoder: x_hat = std * (W4 . silu(W3 . z + b3) + b4) + mean

The latent is stored as float16, or (``latent_int8``) as int8 with one fp16
absmax scale per vector. The section starts with its layer index, so a
section decodes on its own (layer-wise reads decode each layer as it arrives).

Checkpoints are one safetensors file (tensors ``{k|v}{layer}.{name}``,
float32) whose metadata says what it is (``format``, ``version``, geometry,
the model it was trained on, training settings and its measured held-out
error). Loading never unpickles: safetensors is plain tensors + JSON. The
codec's params are the checkpoint's path (configuration only: a local
resource, never written to an object's header) and its sha256 (in the
header); a reader whose configured checkpoint has another sha256 refuses the
object (CodecError -> a miss), never decodes with the wrong weights.

Cross-layer reuse (KV-CAR reuses a layer's KV for the next when they are
close enough) is a *stub*: the ``reuse`` flag is recorded in every object's
params, but only ``false`` is implemented -- an object that says ``true`` is
refused. Reuse needs the previous layer's section to decode a layer, which
conflicts with sections decoding on their own; it would need the orchestrator
to decode layer groups, not single layers.

Speed: the matmuls are small (``T * kv_heads`` rows of ``head_dim``); on a
busy machine a multi-threaded BLAS makes them ~20x slower than one thread.
Run serving processes with ``OPENBLAS_NUM_THREADS=1`` (or the MKL/OMP
equivalent) when this codec is in use.

Error bound: none a priori -- a learned codec's error depends on the data.
What holds exactly: decoding is deterministic, and ``decode(encode(x))``
equals the float autoencoder's reconstruction up to the latent storage
(fp16: relative 2**-11 per latent; int8: half a step, ``absmax/254``). The
checkpoint records its held-out relative error per layer (metadata
``heldout_rel_err``); tests hold trained codecs to ``rel_err <= 2 *
recorded``, and ``benchmarks/codecs.py`` measures perplexity and next-token
agreement.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from kvstrata.compression import checkpoint_file
from kvstrata.compression.base import (
    CodecError,
    Geometry,
    check_params,
    from_float32,
    kv_dtype,
    register,
    to_float32,
)

FORMAT = "kvstrata-autoencoder"
VERSION = 1
_NAMES = ("mean", "std", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")
_SECTION_HEAD = struct.Struct("<HBB")  # layer, flags (bit 0: int8 latent), reserved


def _silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2: no overflow for large |x|
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


class Checkpoint:
    """Autoencoder weights for every layer, K and V, loaded from a safetensors file."""

    def __init__(
        self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str], sha256: str = ""
    ):
        checkpoint_file.check_format(meta, FORMAT, VERSION, "autoencoder")
        try:
            self.n_layers = int(meta["n_layers"])
            self.head_dim = int(meta["head_dim"])
            self.latent = int(meta["latent"])
            self.hidden = int(meta["hidden"])
        except (KeyError, ValueError) as exc:
            raise CodecError(f"bad checkpoint metadata: {exc}") from None
        self.meta = dict(meta)
        self.sha256 = sha256
        D, L, Hd = self.head_dim, self.latent, self.hidden
        shapes = {
            "mean": (D,),
            "std": (D,),
            "w1": (D, Hd),
            "b1": (Hd,),
            "w2": (Hd, L),
            "b2": (L,),
            "w3": (L, Hd),
            "b3": (Hd,),
            "w4": (Hd, D),
            "b4": (D,),
        }
        self.weights: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for kv in "kv":
            for layer in range(self.n_layers):
                w = {}
                for name in _NAMES:
                    t = tensors.get(f"{kv}{layer}.{name}")
                    if t is None or tuple(t.shape) != shapes[name]:
                        raise CodecError(
                            f"checkpoint tensor {kv}{layer}.{name} missing or misshaped"
                        )
                    w[name] = np.ascontiguousarray(t, dtype=np.float32)
                self.weights[(kv, layer)] = w

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> Checkpoint:
        return cls(*checkpoint_file.read(path, sha256))

    def save(self, path: str | Path) -> str:
        """Write the checkpoint; returns its sha256."""
        tensors = {
            f"{kv}{layer}.{name}": w[name]
            for (kv, layer), w in self.weights.items()
            for name in _NAMES
        }
        self.sha256 = checkpoint_file.write(path, tensors, self.meta)
        return self.sha256

    # -- the networks, in numpy ---------------------------------------------------------

    def encode(self, x: np.ndarray, kv: str, layer: int) -> np.ndarray:
        w = self.weights[(kv, layer)]
        n = (x - w["mean"]) / w["std"]
        return _silu(n @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    def decode(self, z: np.ndarray, kv: str, layer: int) -> np.ndarray:
        w = self.weights[(kv, layer)]
        return (_silu(z @ w["w3"] + w["b3"]) @ w["w4"] + w["b4"]) * w["std"] + w["mean"]


def load_checkpoint(path: str, sha256: str | None) -> Checkpoint:
    """A checkpoint by path (and hash), verified from
    the file on every call, parsed once per content."""
    return checkpoint_file.load_cached(path, sha256, Checkpoint.load)


@register
class AutoencoderCodec:
    """Per-layer K/V autoencoders along head_dim (see the module docstring for format and bounds).

    Params: ``checkpoint`` (path), ``sha256`` (of the checkpoint file; filled in
    when a writer leaves it out), ``latent_int8`` (bool, default true),
    ``reuse`` (cross-layer reuse; only false is implemented).

    Bytes per (token, head) and K or V: ``latent + 2`` with an int8 latent,
    ``2 * latent`` with fp16; plus 4 per section.
    """

    id: ClassVar[str] = "autoencoder"
    lossless: ClassVar[bool] = False
    local_params: ClassVar[frozenset[str]] = frozenset({"checkpoint"})

    def __init__(
        self,
        checkpoint: str,
        sha256: str | None = None,
        latent_int8: bool = True,
        reuse: bool = False,
    ):
        if reuse:
            raise CodecError("autoencoder: cross-layer reuse is not implemented (reuse=true)")
        self.path = str(checkpoint)
        self.ckpt = load_checkpoint(self.path, sha256)
        self.latent_int8 = bool(latent_int8)
        self.reuse = False

    @property
    def params(self) -> Mapping[str, int | float | str | bool]:
        return {
            "checkpoint": self.path,
            "sha256": self.ckpt.sha256,
            "latent_int8": self.latent_int8,
            "reuse": self.reuse,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> AutoencoderCodec:
        check_params(
            cls.id, params, {"checkpoint": str, "sha256": str, "latent_int8": bool, "reuse": bool}
        )
        if "checkpoint" not in params:
            raise CodecError("autoencoder: parameter 'checkpoint' (a path) is required")
        return cls(**params)  # type: ignore[arg-type]

    def _latent_bytes(self, vectors: int) -> int:
        L = self.ckpt.latent
        return vectors * (L + 2) if self.latent_int8 else vectors * L * 2

    def section_bytes(self, geometry: Geometry) -> int:
        return _SECTION_HEAD.size + 2 * self._latent_bytes(geometry.n_tokens * geometry.kv_heads)

    def _check_geometry(self, head_dim: int, layer: int) -> None:
        if head_dim != self.ckpt.head_dim:
            raise CodecError(
                f"autoencoder checkpoint is for head_dim {self.ckpt.head_dim}, not {head_dim}"
            )
        if not 0 <= layer < self.ckpt.n_layers:
            raise CodecError(
                f"autoencoder checkpoint has {self.ckpt.n_layers} layers, no layer {layer}"
            )

    def _store(self, z: np.ndarray) -> bytes:
        if not self.latent_int8:
            return z.astype("<f2").tobytes()
        amax = np.abs(z).max(axis=-1)
        scale = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float16)
        q = np.clip(np.rint(z / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
        return q.tobytes() + scale.astype("<f2").tobytes()

    def _load(self, raw: np.ndarray, vectors: int) -> np.ndarray:
        L = self.ckpt.latent
        if not self.latent_int8:
            return raw.view("<f2").reshape(vectors, L).astype(np.float32)
        q = raw[: vectors * L].view(np.int8).reshape(vectors, L).astype(np.float32)
        scale = raw[vectors * L :].view("<f2").astype(np.float32)
        return q * scale[:, None]

    def encode(self, kv: np.ndarray, layer: int = 0, *, first_position: int = 0) -> bytes:
        _, T, H, D = kv.shape
        self._check_geometry(D, layer)
        x = to_float32(kv, kv_dtype(kv)).reshape(2, T * H, D)
        head = _SECTION_HEAD.pack(layer, 1 if self.latent_int8 else 0, 0)
        return head + b"".join(
            self._store(self.ckpt.encode(x[i], "kv"[i], layer)) for i in range(2)
        )

    def decode(self, section: memoryview | bytes, geometry: Geometry) -> np.ndarray:
        need = self.section_bytes(geometry)
        if len(section) != need:
            raise CodecError(f"autoencoder section is {len(section)} bytes, geometry needs {need}")
        layer, flags, reserved = _SECTION_HEAD.unpack_from(section)
        if flags != (1 if self.latent_int8 else 0) or reserved:
            raise CodecError("autoencoder section flags do not match the object's params")
        self._check_geometry(geometry.head_dim, layer)
        T, H, D = geometry.n_tokens, geometry.kv_heads, geometry.head_dim
        raw = np.frombuffer(section, dtype=np.uint8, offset=_SECTION_HEAD.size)
        half = self._latent_bytes(T * H)
        out = []
        for i in range(2):
            z = self._load(raw[i * half : (i + 1) * half], T * H)
            if not np.isfinite(z).all():
                raise CodecError("autoencoder section has non-finite latents")
            out.append(self.ckpt.decode(z, "kv"[i], layer).reshape(T, H, D))
        return from_float32(np.stack(out), geometry.dtype)


# -- training (torch; only the `kvstrata codec train` path imports it) -----------------------


def train(
    data: Mapping[tuple[str, int], np.ndarray],
    heldout: Mapping[tuple[str, int], np.ndarray],
    *,
    latent: int,
    hidden: int = 128,
    steps: int = 400,
    batch: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
    meta: Mapping[str, object] | None = None,
    progress=None,
) -> Checkpoint:
    """Train one autoencoder per (K|V, layer) on ``data[(kv, layer)]`` ([N, head_dim] float32).

    All autoencoders train together as one batched model. Deterministic given
    ``seed`` (same data, same torch build, same thread count). The loss is each
    autoencoder's relative squared error ``|x - x_hat|^2 / |x|^2``, averaged.
    ``progress(step, steps, loss)`` is called as training goes.
    """
    import torch

    threads = torch.get_num_threads()
    # one thread: reproducible reductions, and faster for these small matmuls
    torch.set_num_threads(1)
    try:
        return _train(
            torch,
            data,
            heldout,
            latent=latent,
            hidden=hidden,
            steps=steps,
            batch=batch,
            lr=lr,
            seed=seed,
            meta=meta,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)


def _train(
    torch, data, heldout, *, latent, hidden, steps, batch, lr, seed, meta, progress
) -> Checkpoint:
    torch.manual_seed(seed)
    keys = sorted(data)
    X, mean, std, power = _stacked(torch, data, keys)
    M, n_min, D = X.shape
    gen = torch.Generator().manual_seed(seed)
    P = _init_params(torch, gen, M, D, hidden, latent)
    opt = torch.optim.Adam(P.values(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1
    )
    silu = torch.nn.functional.silu

    def forward(x: torch.Tensor) -> torch.Tensor:
        n = (x - mean) / std
        z = torch.baddbmm(P["b2"], silu(torch.baddbmm(P["b1"], n, P["w1"])), P["w2"])
        y = torch.baddbmm(P["b4"], silu(torch.baddbmm(P["b3"], z, P["w3"])), P["w4"])
        return y * std + mean

    for step in range(steps):
        idx = torch.randint(0, n_min, (min(batch, n_min),), generator=gen)
        x = X[:, idx]
        loss = (((forward(x) - x) ** 2).mean(dim=(1, 2)) / power).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))

    info = {
        "format": FORMAT,
        "version": str(VERSION),
        "n_layers": str(1 + max(layer for _, layer in keys)),
        "head_dim": str(D),
        "latent": str(latent),
        "hidden": str(hidden),
        "steps": str(steps),
        "batch": str(batch),
        "lr": str(lr),
        "seed": str(seed),
        **{k: str(v) for k, v in (meta or {}).items()},
    }
    return _checkpoint(_weights(torch, P, mean, std, keys), info, heldout)


def _stacked(torch, data, keys):
    """``(X [M, N, D], mean, std, power [M])``: each autoencoder's vectors cut to the shortest
    set, with the statistics the model normalizes and the loss divides by."""
    X = [torch.from_numpy(np.ascontiguousarray(data[k], dtype=np.float32)) for k in keys]
    n_min = min(x.shape[0] for x in X)
    X = torch.stack([x[:n_min] for x in X])  # [M, N, D]
    mean = X.mean(dim=1, keepdim=True)
    std = X.std(dim=1, keepdim=True).clamp_min(1e-6)
    power = (X**2).mean(dim=(1, 2)).clamp_min(1e-12)  # [M]
    return X, mean, std, power


def _init_params(torch, gen, M: int, D: int, hidden: int, latent: int) -> dict:
    """The ``M`` batched autoencoders' parameters (weights drawn from ``gen``, in this order)."""

    def init(fan_in: int, *shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape, generator=gen) / fan_in**0.5)

    return {
        "w1": init(D, M, D, hidden),
        "b1": torch.nn.Parameter(torch.zeros(M, 1, hidden)),
        "w2": init(hidden, M, hidden, latent),
        "b2": torch.nn.Parameter(torch.zeros(M, 1, latent)),
        "w3": init(latent, M, latent, hidden),
        "b3": torch.nn.Parameter(torch.zeros(M, 1, hidden)),
        "w4": init(hidden, M, hidden, D),
        "b4": torch.nn.Parameter(torch.zeros(M, 1, D)),
    }


def _weights(torch, P: dict, mean, std, keys) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Each (K|V, layer) autoencoder's arrays, taken out of the batched parameters."""
    weights: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for m, (kv, layer) in enumerate(keys):
            w = {"mean": mean[m, 0].numpy(), "std": std[m, 0].numpy()}
            for name in ("w1", "w2", "w3", "w4"):
                w[name] = P[name][m].numpy().copy()
            for name in ("b1", "b2", "b3", "b4"):
                w[name] = P[name][m, 0].numpy().copy()
            weights[(kv, layer)] = w
    return weights


def _checkpoint(weights: dict, info: dict[str, str], heldout) -> Checkpoint:
    """The checkpoint of ``weights``, its held-out relative error per layer recorded."""
    ckpt = Checkpoint(
        {f"{kv}{layer}.{n}": w[n] for (kv, layer), w in weights.items() for n in _NAMES}, info
    )
    errs = {
        f"{kv}{layer}": round(rel_error(ckpt, heldout[(kv, layer)], kv, layer), 5)
        for kv, layer in weights
        if (kv, layer) in heldout
    }
    ckpt.meta["heldout_rel_err"] = json.dumps(errs, sort_keys=True)
    return ckpt


def rel_error(ckpt: Checkpoint, x: np.ndarray, kv: str, layer: int) -> float:
    """Relative error ``|x - x_hat| / |x|`` (Frobenius)
    of the float autoencoder on ``x`` [N, head_dim]."""
    y = ckpt.decode(ckpt.encode(x, kv, layer), kv, layer)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
