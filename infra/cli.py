"""`flywheel stack ...` and `flywheel topics create`: the embedded local stack. Light top-level imports."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.settings import get_settings

console = Console()
stack_app = typer.Typer(
    help="Run the embedded local stack (Kafka KRaft broker, MLflow server, S3 object store, Airflow standalone).",
    no_args_is_help=True,
)
topics_app = typer.Typer(
    help="The project's Kafka topics and their documented configs.", no_args_is_help=True
)
Only = Annotated[list[str] | None, typer.Option("--only", help="limit to these services (repeatable)")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _status_table(rows) -> Table:
    table = Table("service", "address", "pid", "state", "log")
    colors = {"healthy": "green", "stopped": "dim"}
    for st in rows:
        color = colors.get(st.state, "yellow")
        table.add_row(st.name, st.address, str(st.pid or "-"), f"[{color}]{st.state}[/]", str(st.log))
    return table


@stack_app.command("install")
def stack_install() -> None:
    """Install without starting: fetch the Kafka jars and the schema registry with Maven, build the S3 server
    (SeaweedFS) with Go, format Kafka storage, make data dirs; build helm (deploy/helm's lint and render) from
    the Go module proxy into the cache."""
    from infra import stack
    from infra.helm import ensure_helm

    try:
        with console.status("installing the local stack (Maven fetches the jars once)..."):
            for spec in stack.services(get_settings().stack):
                spec.prepare()
        with console.status("helm for deploy/helm (built with `go install` once, minutes)..."):
            ensure_helm(get_settings().stack.cache_dir)
    except stack.StackError as e:
        _fail(str(e))
    console.print(f"stack installed under {get_settings().stack.root}")


@stack_app.command("up")
def stack_up(
    only: Only = None,
    kafka_brokers: Annotated[
        int | None,
        typer.Option(
            "--kafka-brokers",
            min=1,
            help="Kafka nodes: >1 runs a local KRaft cluster (node i on FLYWHEEL_STACK_KAFKA_PORT + 2(i-1)); "
            "default FLYWHEEL_STACK_KAFKA_BROKERS (1)",
        ),
    ] = None,
) -> None:
    """Start the stack (idempotent): fetch Kafka jars with Maven, format storage once, start, wait healthy.

    Ports and the state dir come from FLYWHEEL_STACK_* (e.g. FLYWHEEL_STACK_KAFKA_PORT=19092).
    """
    from infra import stack

    settings = get_settings().stack
    if kafka_brokers is not None:
        settings = settings.model_copy(update={"kafka_brokers": kafka_brokers})
    started = time.monotonic()
    try:
        with console.status("starting the local stack (first run fetches the Kafka jars)..."):
            rows = stack.up(settings, only=only)
    except stack.StackError as e:
        _fail(str(e))
    console.print(_status_table(rows))
    console.print(_auth_line(settings))
    if settings.kafka_brokers > 1:
        console.print(
            f"kafka bootstrap: FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS={stack.bootstrap_servers(settings)}"
        )
    if any(r.name == "registry" for r in rows):
        console.print(f"schema registry: FLYWHEEL_KAFKA_SCHEMA_REGISTRY_URL={stack.registry_url(settings)}")
    if any(r.name == "airflow" for r in rows):  # up applied the DAG settings: show the result
        console.print(_dags_table(stack.dags(get_settings().stack)))
    console.print(f"stack healthy in {time.monotonic() - started:.1f}s")


@stack_app.command("down")
def stack_down(only: Only = None) -> None:
    """Stop the stack cleanly (SIGTERM, then SIGKILL after a timeout). Data dirs are kept."""
    from infra import stack

    stopped = stack.down(get_settings().stack, only=only)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


def _dags_table(states) -> Table:
    table = Table("DAG", "state", "setting")
    for st in states:
        want = "active" if st.active else "paused"
        color = "green" if st.state == want else "yellow"
        table.add_row(st.dag_id, f"[{color}]{st.state}[/]", want)
    return table


@stack_app.command("status")
def stack_status() -> None:
    """Show each service, its address, PID and health, and which flywheel DAGs are paused.
    Exit code 1 if any service is unhealthy."""
    from infra import stack

    settings = get_settings().stack
    rows = stack.status(settings)
    console.print(_status_table(rows))
    console.print(_auth_line(settings))
    if any(r.name == "airflow" and r.healthy for r in rows):
        try:
            console.print(_dags_table(stack.dags(settings)))
        except RuntimeError as e:  # the API answered health checks but not this: say so, keep the status
            console.print(f"[yellow]DAG states unavailable:[/] {e}")
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


def _auth_line(settings) -> str:
    if not settings.auth:
        return "auth: [yellow]off[/] (open on loopback; FLYWHEEL_STACK_AUTH=true turns it on)"
    from infra.stack.credentials import secrets_file

    return f"auth: [green]on[/] (credentials in {secrets_file(settings)}; `flywheel stack credentials NAME`)"


@stack_app.command("credentials")
def stack_credentials(
    principal: Annotated[str, typer.Argument(help="admin | serving | ingest | trainer")],
) -> None:
    """Print the exports that make a process act as PRINCIPAL on the authenticated stack:
    `eval "$(flywheel stack credentials serving)"`. Needs FLYWHEEL_STACK_AUTH=true."""
    import shlex

    from core.process import StackError
    from infra.stack import credentials

    settings = get_settings().stack
    if not settings.auth:
        _fail("auth is off for this stack (FLYWHEEL_STACK_AUTH=true turns it on): there are no credentials")
    try:
        env = credentials.principal_env(settings, principal)
    except StackError as e:
        _fail(str(e))
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")


@stack_app.command("s3-env")
def stack_s3_env() -> None:
    """Print the exports that put the lake on the local object store (service s3):
    `eval "$(flywheel stack s3-env)"` sets FLYWHEEL_LAKE_ROOT=s3://flywheel/lake, the endpoint and the keys.
    For a real S3, MinIO or Ceph set the same FLYWHEEL_LAKE_* variables yourself (see README)."""
    import shlex

    from infra.stack.object_store import lake_env

    for name, value in lake_env(get_settings().stack).items():
        print(f"export {name}={shlex.quote(value)}")


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str, typer.Argument(help="kafka (kafka-2, ... in a cluster) | mlflow | s3 | airflow")],
    lines: Annotated[int, typer.Option("-n", "--lines", help="how many trailing lines")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new lines")] = False,
) -> None:
    """Print a service's log (like `tail`)."""
    from core.process import tail
    from infra import stack

    try:
        spec = stack.service(service, get_settings().stack)
    except stack.StackError as e:
        _fail(str(e))
    print(tail(spec.log_file, lines))
    if follow:
        with spec.log_file.open() as f:
            f.seek(0, 2)
            while True:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)


@topics_app.command("create")
def topics_create() -> None:
    """Create the project's Kafka topics, or bring existing ones back to their documented configs.

    Idempotent. Replication follows the cluster (min(3, brokers); min.insync.replicas one less) unless
    FLYWHEEL_KAFKA_REPLICATION_FACTOR / FLYWHEEL_KAFKA_MIN_INSYNC_REPLICAS pin it; existing topics get every
    documented config that differs and the declared partition count (never fewer). On an authenticated
    stack (FLYWHEEL_STACK_AUTH=true) this runs as admin unless FLYWHEEL_KAFKA_SASL_USERNAME says otherwise,
    and also creates the ACLs of infra/acls.py.

    Then registers every released schema version of each topic's values under its subject (`<topic>-value`)
    in the schema registry (FLYWHEEL_KAFKA_SCHEMA_REGISTRY_URL), with compatibility BACKWARD set on the
    subject first, so the registry refuses a version old data cannot be read with.
    """
    from core.settings import get_settings
    from infra.topics import admin_client, cluster_topics, sync_topics
    from schemas.schema_ids import COMPATIBILITY, RegistryUnavailable, SchemaIds, register_all

    settings = get_settings()
    kafka = settings.kafka
    if settings.stack.auth and kafka.sasl_username is None:
        from infra.stack.credentials import kafka_settings

        kafka = kafka_settings(settings.stack, "admin", kafka)
    admin = admin_client(kafka)
    specs = cluster_topics(kafka, admin)
    results = {r.name: r for r in sync_topics(admin, specs)}
    if settings.stack.auth:
        from infra.acls import ensure_acls

        acls = ensure_acls(admin, kafka)
    table = Table("partitions", "replicas", "purpose", "state")
    table.add_column("configs", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    table.add_column("topic", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for s in specs:
        configs = "\n".join(f"{k}={v}" for k, v in s.config.items())
        r = results[s.name]
        state = "\n".join([r.state, *(f"[yellow]warning:[/] {w}" for w in r.warnings)])
        table.add_row(s.name, configs, str(s.partitions), str(s.replication_factor), s.purpose, state)
    Console(width=160).print(table)
    if settings.stack.auth:
        rules = Table("principal", "operation", "resource", "pattern")
        for b in acls:
            rules.add_row(
                b.principal.removeprefix("User:"),
                b.operation.name,
                f"{b.restype.name.lower()} {b.name}",
                b.resource_pattern_type.name.lower(),
            )
        Console(width=160).print(rules)
    try:
        registered = register_all(kafka, SchemaIds.connect(kafka))
    except (RegistryUnavailable, ValueError) as e:
        _fail(f"{e} (is the registry up? `flywheel stack up --only registry`)")
    schemas = Table("subject", "schema version", "schema id", "compatibility")
    for r in registered:
        schemas.add_row(r.subject, f"v{r.version}", str(r.schema_id), COMPATIBILITY)
    Console(width=160).print(schemas)


def register(app: typer.Typer) -> None:
    """Add `flywheel stack` and `flywheel topics` to the main app."""
    app.add_typer(stack_app, name="stack")
    app.add_typer(topics_app, name="topics")
