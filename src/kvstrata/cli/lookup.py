"""``kvstrata lookup``: how many prefix tokens of a prompt each tier holds, and the load estimate.

Two ways to ask (see :mod:`kvstrata.lookup` for what the answer means):

* ``--url http://engine:9400`` asks a running engine's exporter (``/lookup``):
  every tier that engine reads, its own DRAM pool included, with the cost
  model that engine has learned.
* ``--config strata.yaml --model DIR`` builds the configuration's tiers in this
  process and asks them: the shared tiers (Redis, S3, a shared disk) answer as
  they would to any engine; a DRAM tier here is this process's own (empty), and
  the cost model holds only the configured priors.

The prompt is ``--tokens 1,2,3``, ``--tokens-file ids.json`` (a JSON list) or
``--text "..."`` (tokenized with ``--model``'s tokenizer). Request hints as
vLLM's ``kv_transfer_params``: ``--param tier=shared`` (repeat), ``--salt``.
Mounted in the main CLI with ``app.add_typer(lookup_app)``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

lookup_app = typer.Typer(
    help="Routing hint: per-tier prefix tokens of a prompt.", no_args_is_help=True
)
console = Console()


@lookup_app.command()
def lookup(
    url: str = typer.Option(
        None, "--url", help="a running engine's exporter, e.g. http://127.0.0.1:9400"
    ),
    config: Path = typer.Option(
        None, "--config", help="strata.yaml: ask its tiers from this process"
    ),
    model: Path = typer.Option(
        None, "--model", help="model directory (geometry; tokenizer for --text)"
    ),
    model_id: str = typer.Option(
        None, "--model-id", help="the connector's model_id, if it was set"
    ),
    dtype: str = typer.Option("float32", help="the engine's KV dtype (with --config)"),
    page_layout: str = typer.Option(
        "cpu-vec/128",
        help="the engine's page layout and block size, for tiers with codec pages (with --config)",
    ),
    tokens: str = typer.Option(None, "--tokens", help="comma-separated token ids"),
    tokens_file: Path = typer.Option(None, "--tokens-file", help="a JSON list of token ids"),
    text: str = typer.Option(None, "--text", help="prompt text (needs --model)"),
    param: list[str] = typer.Option(
        None, "--param", help="a kv_transfer_params entry key=value (repeat)"
    ),
    salt: str = typer.Option(None, "--salt", help="the request's cache_salt (tenant)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Per read tier: prefix tokens held and estimated
    load time; and what a request now would load."""
    ids = _prompt(tokens, tokens_file, text, model)
    params = dict(_pair(p) for p in param or ())
    if url:
        report = _ask(url, {"tokens": ids, "cache_salt": salt, "kv_transfer_params": params})
    elif config and model:
        report = _local(config, model, model_id, dtype, page_layout, ids, salt, params)
    else:
        raise typer.BadParameter("give --url (a running engine) or --config with --model")
    if as_json:
        print(json.dumps(report))
        return
    console.print(render(report))


def render(report: dict) -> Table:
    plan = report["plan"]
    table = Table(
        title=f"{report['prompt_tokens']} prompt tokens, rule {report['rule']}: "
        f"load {plan['tokens'] or 'nothing'} ({plan['reason']})"
    )
    for column in ("tier", "prefix tokens", "load est.", "recompute est.", "saved"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for t in report["tiers"]:
        table.add_row(
            t["tier"],
            f"{t['tokens']:,}",
            f"{t['load_s'] * 1e3:,.1f} ms",
            f"{t['recompute_s'] * 1e3:,.1f} ms",
            f"{t['saved_s'] * 1e3:,.1f} ms",
        )
    return table


def _prompt(
    tokens: str | None, tokens_file: Path | None, text: str | None, model: Path | None
) -> list[int]:
    if tokens:
        return [int(t) for t in tokens.split(",") if t.strip()]
    if tokens_file:
        return [int(t) for t in json.loads(tokens_file.read_text())]
    if text is not None:
        if model is None:
            raise typer.BadParameter("--text needs --model (its tokenizer)")
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(str(model)).encode(text))
    raise typer.BadParameter("give --tokens, --tokens-file or --text")


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"--param {text!r}: expected key=value")
    return key, value


def _ask(url: str, body: dict) -> dict:
    base = url.rstrip("/").removesuffix("/metrics").removesuffix("/lookup")
    request = urllib.request.Request(
        base + "/lookup",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        console.print(f"[red]lookup at {base} failed[/red]: {exc}")
        raise typer.Exit(1) from None


def _local(
    config: Path,
    model: Path,
    model_id: str | None,
    dtype: str,
    page_layout: str,
    ids: list[int],
    salt,
    params,
) -> dict:
    from kvstrata import lookup as lk
    from kvstrata.config import load_config
    from kvstrata.orchestrator import Orchestrator

    layout, _, block = page_layout.partition("/")
    if not block.isdigit():
        raise typer.BadParameter(f"--page-layout: LAYOUT/BLOCK_SIZE, not {page_layout!r}")
    spec = replace(model_spec(model, dtype, model_id), page_layout=layout, page_block=int(block))
    orch = Orchestrator(load_config(config), spec)
    try:
        return lk.lookup(orch, ids, lk.context(salt, params, spec.name)).to_dict()
    finally:
        orch.close()


def model_spec(model: Path, dtype: str, model_id: str | None = None):
    """The ModelSpec the vLLM connector builds for ``model`` (see
    connectors.vllm_setup.model_spec)."""
    from kvstrata.model import ModelSpec

    hf = json.loads((model / "config.json").read_text())
    heads = hf["num_attention_heads"]
    name = model_id or "/".join(
        [
            str(model).rstrip("/").rsplit("/", 1)[-1],
            ",".join(hf.get("architectures") or []),
            f"h{hf.get('hidden_size', 0)}",
            f"v{hf.get('vocab_size', 0)}",
        ]
    )
    return ModelSpec(
        name=name,
        n_layers=hf["num_hidden_layers"],
        kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        dtype=dtype,
    )


if __name__ == "__main__":  # pragma: no cover
    lookup_app()
