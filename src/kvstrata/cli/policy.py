"""``kvstrata policy ...``: check a configuration file, explain the decision for a request.

Mounted by :mod:`kvstrata.cli.main` as ``app.add_typer(policy_app, name="policy")``.
Exit status: 0 when the file is valid, 1 with the ConfigError's lines otherwise.
No input prints a traceback: an unexpected exception while checking a file
(a bug in kvstrata, never the file's fault alone) is one ``file:1: internal
error`` line and exit status 1 too.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvstrata.config import ConfigError, Problem, StrataConfig, load_config
from kvstrata.policy.engine import MAX_BUDGET_MS, MAX_TOKENS
from kvstrata.policy.route import Decision, RequestContext, Route

policy_app = typer.Typer(
    help="Check routing policies and explain their decisions.", no_args_is_help=True
)


INTERNAL_ERROR = "internal error while checking this file (please report it)"


def _checked(path: Path) -> StrataConfig:
    """``load_config(path)``, every failure a ConfigError
    (the unexpected ones as an internal error)."""
    try:
        return load_config(path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the one place a bug must not become a traceback
        raise ConfigError(
            str(path), [Problem(1, "", f"{INTERNAL_ERROR}: {type(exc).__name__}")]
        ) from exc


def _load(path: Path) -> StrataConfig:
    try:
        return _checked(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


@policy_app.command()
def check(files: list[Path] = typer.Argument(..., help="configuration files (YAML)")) -> None:
    """Validate configuration files: print "ok: N tiers, M rules" or every problem as file:line."""
    failed = False
    for path in files:
        try:
            cfg = _checked(path)
        except ConfigError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        prefix = f"{path}: " if len(files) > 1 else ""
        typer.echo(f"{prefix}ok: {len(cfg.tiers)} tiers, {len(cfg.policy.rules)} rules")
    if failed:
        raise typer.Exit(1)


@policy_app.command()
def explain(
    file: Path = typer.Argument(..., help="configuration file (YAML)"),
    context_tokens: int = typer.Option(0, min=0, max=MAX_TOKENS, help="prompt length in tokens"),
    reuse: float = typer.Option(0.0, min=0.0, max=1.0, help="predicted prefix reuse, 0..1"),
    budget_ms: float | None = typer.Option(
        None, min=0.0, max=MAX_BUDGET_MS, help="latency budget (default: the file's)"
    ),
    tenant: str = typer.Option("", help="tenant"),
    model: str = typer.Option("", help="model name"),
    tag: list[str] = typer.Option([], help="request tag (repeatable)"),
    hint: list[str] = typer.Option([], help="request hint key=value (repeatable)"),
    kv_bytes_per_token: int = typer.Option(
        46 * 1024,
        min=1,
        max=1 << 30,
        help="KV bytes per token (default: SmolLM2-135M in fp32; Llama-3.1-8B bf16: 131072)",
    ),
) -> None:
    """Show which rule a request matches, its route, why, and what the cost model expects."""
    cfg = _load(file)
    ctx = RequestContext(
        context_tokens, reuse, budget_ms, tenant, model, frozenset(tag), _hints(hint)
    )
    decision = cfg.policy.decide(ctx, verbose=True)
    console = Console()
    console.print(_route_table(decision))
    console.print("[bold]why[/bold]")
    for reason in decision.why:
        console.print(f"  - {escape(reason)}")
    budget = budget_ms if budget_ms is not None else cfg.orchestrator.default_budget_ms
    _print_costs(console, cfg, decision.route, context_tokens, budget, kv_bytes_per_token)


def _hints(pairs: list[str]) -> dict[str, str]:
    hints = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--hint")
        hints[key] = value
    return hints


def _route_table(decision: Decision) -> Table:
    route = decision.route
    table = Table(title=f"rule: {escape(decision.rule)}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in [
        ("read", _list(route.read)),
        ("write", _list(route.write)),
        ("admission", _map(route.admission)),
        ("codec", _map(route.codec)),
        ("retrieval", route.retrieval),
        ("ttl_s", _map(route.ttl_s)),
        ("promote", str(route.promote).lower()),
        ("demote", _map(route.demote)),
        ("load", route.load),
    ]:
        table.add_row(field, escape(value))
    return table


def _list(items) -> str:
    return ", ".join(items) or "-"


def _map(mapping) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items()) or "-"


def _print_costs(
    console: Console,
    cfg: StrataConfig,
    route: Route,
    context_tokens: int,
    budget_ms: float,
    bytes_per_token: int,
) -> None:
    """The cost model's prior estimates for a full hit in each read tier."""
    from kvstrata.policy.cost import CostModel

    rows = CostModel.from_config(cfg).explain(
        route,
        context_tokens=context_tokens,
        budget_ms=budget_ms,
        chunk_tokens=cfg.chunk_tokens,
        bytes_per_token=bytes_per_token,
    )
    table = Table(title="cost model", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    for label, value in rows:
        table.add_row(escape(str(label)), escape(str(value)))
    console.print(table)
