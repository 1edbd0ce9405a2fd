"""`flywheel promote | rollback | speculation | drafters`: the drafter registry and promotion events. Light top-level imports."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _registry():
    from core.settings import get_settings
    from promotion.drafter_registry import DrafterRegistry

    settings = get_settings()
    return DrafterRegistry(settings.serving.target_model, settings.mlflow, settings.kafka)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _print_event(event: dict) -> None:
    table = Table("field", "value", title=f"DrafterPromotion published ({event['action']})")
    for key, value in event.items():
        table.add_row(key, str(value))
    console.print(table)


def promote(
    version: Annotated[str, typer.Argument(help="registered drafter version to serve")],
    reason: Annotated[str | None, typer.Option(help="why (stored in the event)")] = None,
    force: Annotated[bool, typer.Option(help="promote even if the gate rejected this version")] = False,
) -> None:
    """Make VERSION the champion (the old one becomes `previous`) and publish a DrafterPromotion to Kafka.

    Serving nodes that follow the promotions topic hot-swap to it without a restart.
    Re-running only re-publishes. A version the gate rejected needs --force.
    """
    from mlflow.exceptions import MlflowException

    registry = _registry()
    try:
        tags = registry.get(version).tags
    except MlflowException as e:
        _fail(f"{registry.name} v{version}: {e.message}")
    if tags.get("gate_decision") == "reject" and not force:
        _fail(f"the gate rejected v{version} ({tags.get('gate_summary', '')}); use --force to promote anyway")
    try:
        passed = tags.get("gate_decision") == "promote"
        event = registry.promote(
            version, reason=reason or (tags["gate_summary"] if passed else "manual promotion")
        )
    except RuntimeError as e:  # aliases moved, the event did not reach Kafka: re-running re-publishes
        _fail(f"v{version} is the champion in the registry, but {e}; re-run this command to publish it")
    _print_event(event)
    console.print(f"champion: v{version}; previous: v{event['previous_version'] or '-'}")


def rollback(
    reason: Annotated[str | None, typer.Option(help="why (stored in the event)")] = None,
) -> None:
    """Restore the previous champion in one step and publish a DrafterPromotion (action=rollback) to Kafka.

    The rolled-back version gets a `rolled_back_at` tag and stays loadable by version.
    """
    from promotion.drafter_registry import RegistryError

    registry = _registry()
    try:
        event = registry.rollback(reason=reason)
    except RegistryError as e:
        _fail(str(e))
    except RuntimeError as e:  # aliases moved, the event did not reach Kafka
        champion = registry.by_alias("champion")
        _fail(
            f"rolled back to v{champion.version} in the registry, but {e}; publish it with `flywheel promote {champion.version}`"
        )
    _print_event(event)
    console.print(f"champion: v{event['drafter_version']} (rolled back from v{event['previous_version']})")


class Switch(StrEnum):
    on = "on"
    off = "off"
    status = "status"


def speculation(
    state: Annotated[Switch, typer.Argument(help="off: stop speculating; on: serve the champion again")],
    reason: Annotated[str | None, typer.Option(help="why (stored in the event)")] = None,
) -> None:
    """Switch speculative decoding off or on across the fleet, without a restart.

    off: publish a DrafterPromotion with action=disable; every node stops drafting and keeps the champion.

    on: re-publish the champion (action=promote). status: what the registry last told the fleet.

    The gate switches it off itself when champion and challenger both serve slower than no speculation.
    """
    from promotion.drafter_registry import RegistryError

    registry = _registry()
    champion = registry.by_alias("champion")
    if state is Switch.status:
        off = registry.speculation_off()
        served = "no drafter (speculation off)" if off else f"v{champion.version}" if champion else "-"
        console.print(f"{registry.name}: serving {served}; champion v{champion.version if champion else '-'}")
        return
    try:
        if state is Switch.off:
            event = registry.disable(reason=reason or "switched off by hand")
        elif champion is None:
            raise RegistryError(f"{registry.name}: no champion to serve")
        else:
            event = registry.promote(champion.version, reason=reason or "speculation switched on by hand")
    except RegistryError as e:
        _fail(str(e))
    except RuntimeError as e:  # the registry changed, the event did not reach Kafka
        _fail(f"{e}; re-run this command to publish it")
    _print_event(event)
    console.print(f"speculation {state.value}; champion v{event['drafter_version']}")


def drafters(
    limit: Annotated[int, typer.Option(help="show the newest N versions")] = 20,
) -> None:
    """Registered drafter versions of the served target: aliases, window, evaluation and gate decision."""
    from mlflow.exceptions import MlflowException

    registry = _registry()
    try:
        model = registry.client.get_registered_model(registry.name)
    except MlflowException:
        _fail(
            f"no registered model {registry.name} yet (the flywheel registers one after its first training)"
        )
    aliases: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    versions = registry.client.search_model_versions(f"name='{registry.name}'")
    versions = sorted(versions, key=lambda mv: int(mv.version), reverse=True)[:limit]
    table = Table(
        "version",
        "aliases",
        "window",
        "rows",
        "parent",
        "speedup",
        "tau",
        "gate",
        "created",
        title=registry.name,
    )
    for mv in versions:
        t = mv.tags
        gate = t.get("gate_decision", "-") + (" (rolled back)" if "rolled_back_at" in t else "")
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            mv.version,
            ",".join(sorted(aliases.get(str(mv.version), []))) or "-",
            t.get("window_key", "-"),
            t.get("window_rows", "-"),
            t.get("parent_version", "-"),
            t.get("eval_speedup", "-"),
            t.get("eval_tau", "-"),
            gate,
            created,
        )
    console.print(table)
    console.print(f"champion history: {registry.history()}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("speculation")(speculation)
    app.command("drafters")(drafters)
