"""`flywheel ingest`, `flywheel retention`, `flywheel topics create` and `flywheel bench ingest`
(registered by flywheel/cli.py). Keep top-level imports light: implementations load inside the commands.
"""

from __future__ import annotations

import json
import logging
import resource
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _setup_logging(level: str) -> None:
    """Rich logs on a terminal; plain one-line records otherwise (files, supervisors, tests)."""
    if console.is_terminal:
        from rich.logging import RichHandler

        logging.basicConfig(
            level=level.upper(), format="%(message)s", handlers=[RichHandler(console=console)]
        )
    else:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _peak_rss_mib() -> float:
    """Peak RSS of this process. Linux: VmHWM, because ru_maxrss also counts the parent's image when the
    process was forked + exec'd from a big parent (a benchmark harness)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ingest(
    group: Annotated[
        str, typer.Option(help="consumer group (partitions are shared among its members)")
    ] = "flywheel-ingest",
    topic: Annotated[
        str | None, typer.Option(help="source topic (default: FLYWHEEL_KAFKA_TRACES_TOPIC)")
    ] = None,
    max_events: Annotated[
        int | None, typer.Option(help="stop after this many messages are committed (bounded runs)")
    ] = None,
    until_idle_s: Annotated[
        float | None, typer.Option(help="stop after this many seconds without a message")
    ] = None,
    flush_events: Annotated[
        int, typer.Option(help="flush policy: commit after this many messages")
    ] = 250_000,
    flush_mib: Annotated[int, typer.Option(help="flush policy: commit after this many MiB of messages")] = 32,
    flush_latency_s: Annotated[
        float, typer.Option(help="flush policy: commit when the oldest message waited this long")
    ] = 30.0,
    consume_batch: Annotated[
        int, typer.Option(help="messages per consume() call, decoded as one batch")
    ] = 10_000,
    instance_id: Annotated[
        str | None, typer.Option(help="static group membership id (a restart keeps the partitions)")
    ] = None,
    session_timeout_ms: Annotated[int, typer.Option(help="group session timeout")] = 45_000,
    stats_json: Annotated[
        Path | None, typer.Option(help="write final stats (and peak RSS) as JSON here")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    log_level: Annotated[str, typer.Option(help="DEBUG | INFO | WARNING")] = "WARNING",
) -> None:
    """Consume TraceEvents into the Delta table `traces`, exactly once (offsets live in the Delta log).

    Undecodable or invalid messages go to the dead-letter topic with the reason in headers. SIGTERM/SIGINT flush what is buffered and exit.

    Lake location: FLYWHEEL_LAKE_ROOT (local path or object-store URI); topics: FLYWHEEL_KAFKA_TRACES_TOPIC / FLYWHEEL_KAFKA_DLQ_TOPIC (create them with `flywheel topics create`).
    """
    from consumers.delta_sink import IngestError, IngestOptions, TraceIngest
    from consumers.flush_policy import FlushPolicy
    from consumers.table import SchemaMismatchError
    from core.settings import get_settings

    _setup_logging(log_level)
    settings = get_settings()
    opts = IngestOptions(
        group=group,
        policy=FlushPolicy(flush_events, flush_mib * 1024 * 1024, flush_latency_s),
        consume_batch=consume_batch,
        max_events=max_events,
        until_idle_s=until_idle_s,
        instance_id=instance_id,
        session_timeout_ms=session_timeout_ms,
    )
    try:
        sink = TraceIngest(settings.kafka, settings.lake, opts, topic=topic)
        stats = _run_with_progress(sink, max_events) if progress else sink.run()
    except (IngestError, SchemaMismatchError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    result = stats.as_dict() | {"peak_rss_mib": round(_peak_rss_mib(), 1), "table": settings.lake.traces_uri}
    if stats_json:
        stats_json.write_text(json.dumps(result, indent=2))
    console.print(
        f"ingested {stats.rows} rows, {stats.dead_letters} dead letters in {stats.commits} commits "
        f"({stats.conflicts} conflicts, {stats.resets} resets) into {settings.lake.traces_uri}"
    )


def _run_with_progress(sink, total: int | None):
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    last = [0.0]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("ingest", total=total, info="")

        def update(stats) -> None:
            if time.monotonic() - last[0] >= 0.5:
                last[0] = time.monotonic()
                info = (
                    f"{stats.dead_letters} dead letters, {stats.commits} commits, {stats.conflicts} conflicts"
                )
                bar.update(task, completed=stats.processed, info=info)

        stats = sink.run(on_progress=update)
        last[0] = 0.0
        update(stats)
    return stats


def retention(
    dry_run: Annotated[
        bool, typer.Option(help="only show what would be deleted, compacted and vacuumed")
    ] = False,
    now: Annotated[
        str | None, typer.Option(help="evaluate as of this UTC time (ISO 8601); default: now")
    ] = None,
    retention_days: Annotated[
        int | None, typer.Option(help="keep this many days (default: FLYWHEEL_LAKE_RETENTION_DAYS)")
    ] = None,
    vacuum_retention_hours: Annotated[
        int | None,
        typer.Option(help="override delta.deletedFileRetentionDuration (only with no ingest running)"),
    ] = None,
) -> None:
    """Bound the `traces` table: delete expired days, compact closed hours, vacuum, checkpoint + trim the log.

    Days are UTC days of ingest_time (when the pipeline observed each trace), never of the serving node's clock.

    Safe next to a running `flywheel ingest` (it only appends), except with --vacuum-retention-hours below the age of files the ingest is still writing.
    """
    from consumers.retention import run_retention
    from core.settings import get_settings

    when = datetime.fromisoformat(now) if now else datetime.now(UTC)
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    with console.status("applying retention..." if not dry_run else "planning retention..."):
        report = run_retention(
            get_settings().lake,
            when,
            retention_days=retention_days,
            dry_run=dry_run,
            vacuum_retention_hours=vacuum_retention_hours,
        )
    plan = report.plan
    verb = "would" if dry_run else "did"
    table = Table(
        "action",
        "partitions / files",
        title=f"retention as of {when:%Y-%m-%d %H:%M} UTC (cutoff {plan.cutoff_date})",
    )
    table.add_row(f"{verb} delete", ", ".join(f"{p.date}/{p.hour:02d}" for p in plan.expired) or "-")
    table.add_row(
        f"{verb} compact", ", ".join(f"{p.date}/{p.hour:02d} ({p.files} files)" for p in plan.compact) or "-"
    )
    table.add_row(f"{verb} vacuum", f"{len(report.vacuumed)} files")
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("ingest")(ingest)
    app.command("retention")(retention)
