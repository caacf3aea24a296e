"""Model identity: which weights a KV cache was computed with.

KV is a function of the weights, so two checkpoints may share keys only if
their weights are the same. :func:`model_identity` names a checkpoint by
content, never by its path:

* a **local checkpoint** (a directory, or one weight file): the architecture
  and sizes from ``config.json`` plus :func:`checkpoint_fingerprint` -- a
  SHA-256 over the config files, every weight file's name and size, and
  sampled bytes of every tensor (below);
* a **hub model** (``org/name``): the commit its revision resolves to in the
  local Hugging Face cache (``snapshots/<commit>/``, present once vLLM has
  read ``config.json``), plus the architecture and sizes. A hub snapshot is
  immutable, so the commit names the weights exactly; a snapshot directory
  given by path is named by its commit too, so both spellings share KV. The
  weight files themselves are not read here: vLLM's worker builds its
  connector before it downloads them, and both roles must agree.

Identical copies (any directory name, any host) get the same identity, so
cross-host sharing still works; a fine-tune saved under the same name, or a
model updated in place, gets a new one.

The sampled hash (why not hash everything): SHA-256 runs at ~0.7 GB/s on one
core here, so hashing a 16 GB checkpoint would add ~20 s to every start-up.
Instead, for a ``.safetensors`` file: its whole header (every tensor's name,
dtype, shape and byte range) and, for **every** tensor, :data:`SAMPLE_BYTES`
blocks at evenly spaced offsets -- ``clamp(size / 1 MiB, 4, 256)`` blocks
(the whole tensor if it is smaller than that). An update that rewrites
whole tensors (a fine-tune, a merged LoRA, re-quantization, scaled
projections) changes every sampled block of those tensors, and every tensor
is sampled, so it is caught even when the header is unchanged. What it can
miss: a change to a few isolated values of a large tensor (a sparse edit
falling entirely between samples). Other weight formats (``.bin``, ``.pt``,
``.gguf``...) are sampled as plain files, ``clamp(size / 1 MiB, 16, 4096)``
blocks. An operator who needs exactness, or to share KV across checkpoints
they know to be equivalent, sets ``model_id``.

Cost: computed once per process per checkpoint and memoized by the files'
(path, size, mtime, inode); see docs/connector.md for the measured time.
Nothing is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_BYTES = 4096
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".npz",
)
#: Files besides the weights that change what the model computes (its shape, its quantization).
CONFIG_NAMES = ("config.json", "params.json")
_CONFIG_PATTERN = re.compile(r".*quant.*\.json$")
_MAX_HEADER = 100 << 20  # the safetensors format's own limit
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_memo: dict[tuple, str] = {}
_memo_lock = threading.Lock()


def model_label(model: str, hf_config: Any) -> str:
    """The human name of a model: its directory's or hub
    name's last component, architecture and sizes."""
    return "/".join([os.path.basename(model.rstrip("/")), _shape(hf_config)])


def _shape(hf_config: Any) -> str:
    return "/".join(
        [
            ",".join(getattr(hf_config, "architectures", None) or []),
            f"h{getattr(hf_config, 'hidden_size', 0)}",
            f"v{getattr(hf_config, 'vocab_size', 0)}",
        ]
    )


def model_identity(model: str, hf_config: Any, revision: str | None = None) -> str:
    """``"<architectures>/h<hidden>/v<vocab>/<weights>"`` for the model vLLM was given as ``model``.

    ``<weights>`` is ``w:<32 hex>`` (:func:`checkpoint_fingerprint`) for a local
    path, ``rev:<commit>`` for a hub model found in the local cache, else
    ``hub:<model>@<revision>`` (logged: a branch name is not a fixed weight set).
    Deterministic: the scheduler and the worker, and every host, compute the same.
    """
    shape = _shape(hf_config)
    path = Path(model).expanduser()
    snapshot = _snapshot_commit(path)
    if snapshot is not None:  # a hub snapshot given by path: named as the hub id would be
        return f"{shape}/rev:{snapshot}"
    if path.exists():
        try:
            return f"{shape}/w:{checkpoint_fingerprint(path)}"
        except (OSError, ValueError) as exc:  # weights elsewhere (a streamer, a plugin loader)
            log.warning(
                "kvstrata: cannot fingerprint the weights at %s (%s); its KV is keyed by the "
                "directory name -- set model_id to name the weights",
                path,
                exc,
            )
            return f"{shape}/name:{path.name}"
    commit = hub_commit(model, revision)
    if commit is not None:
        return f"{shape}/rev:{commit}"
    log.warning(
        "kvstrata: model %r (revision %r) is neither a local path nor in the Hugging Face cache; "
        "its KV is keyed by name and revision only -- set model_id to name the weights",
        model,
        revision,
    )
    return f"{shape}/hub:{model}@{revision or 'main'}"


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit ``revision`` of hub model ``repo_id``
    resolves to in the local cache (no network), or None."""
    if revision and _COMMIT.match(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 -- not a hub id (a bad path), no huggingface_hub: no commit known
        return None
    if isinstance(found, str):
        commit = Path(found).parent.name  # .../snapshots/<commit>/config.json
        return commit if _COMMIT.match(commit) else None
    return None


def _snapshot_commit(path: Path) -> str | None:
    """``<commit>`` if ``path`` is a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>``)."""
    try:
        parts = path.resolve().parts
    except OSError:
        return None
    if (
        len(parts) >= 3
        and parts[-2] == "snapshots"
        and parts[-3].startswith("models--")
        and _COMMIT.match(parts[-1])
    ):
        return parts[-1]
    return None


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """32 hex digits naming the weights at ``path`` (a checkpoint directory or one weight file).

    Memoized per process on every input file's (name, size, mtime, inode): a
    second call for an unchanged checkpoint costs a few ``stat`` calls.
    OSError if ``path`` cannot be read; ValueError if it holds no weight file.
    """
    files = _inputs(Path(path).expanduser().resolve())
    key = tuple(
        (str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f, st in ((f, f.stat()) for f in files)
    )
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256(b"kvstrata-checkpoint-v1")
    for f in files:
        _field(h, f.name.encode())
        _field(h, f.stat().st_size.to_bytes(8, "little"))
        _hash_file(h, f)
    digest = h.hexdigest()[:32]
    with _memo_lock:
        _memo[key] = digest
    return digest


def _inputs(path: Path) -> list[Path]:
    """The files that decide the fingerprint, sorted: config files and weight files (top level)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file())
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise ValueError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    configs = [p for p in files if p.name in CONFIG_NAMES or _CONFIG_PATTERN.match(p.name)]
    return sorted({*weights, *configs})


def _field(h, raw: bytes) -> None:
    h.update(len(raw).to_bytes(8, "little"))
    h.update(raw)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        if path.suffix == ".json" or size <= 64 * SAMPLE_BYTES:
            _field(h, f.read())
            return
        ranges = _safetensors_ranges(fd, size) if path.suffix == ".safetensors" else None
        if ranges is None:
            ranges = [(0, size, max(16, min(4096, size >> 20)))]
        for start, end, blocks in ranges:
            for offset in _offsets(start, end, blocks):
                _field(h, os.pread(fd, SAMPLE_BYTES, offset))


def _safetensors_ranges(fd: int, size: int) -> list[tuple[int, int, int]] | None:
    """[(start, end, blocks)]: the header whole, then
    every tensor's byte range; None if not safetensors."""
    head = os.pread(fd, 8, 0)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(_MAX_HEADER, size - 8):
        return None
    try:
        header = json.loads(os.pread(fd, n, 8))
        spans = sorted(
            (int(v["data_offsets"][0]), int(v["data_offsets"][1]))
            for k, v in header.items()
            if k != "__metadata__"
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        log.warning(
            "kvstrata: unreadable safetensors header in fd %d; sampling the file as a whole", fd
        )
        return None
    base = 8 + n
    out = [(8, base, -(-n // SAMPLE_BYTES))]  # the whole header: names, dtypes, shapes, offsets
    for begin, end in spans:
        if not 0 <= begin <= end <= size - base:
            return None
        length = end - begin
        out.append((base + begin, base + end, max(4, min(256, length >> 20))))
    return out


def _offsets(start: int, end: int, blocks: int) -> list[int]:
    """``blocks`` offsets of SAMPLE_BYTES-blocks spread
    evenly over [start, end) (all of it if it is short)."""
    length = end - start
    if length <= blocks * SAMPLE_BYTES:
        return list(range(start, end, SAMPLE_BYTES))
    last = end - SAMPLE_BYTES
    return [start + (last - start) * i // (blocks - 1) for i in range(blocks)]
