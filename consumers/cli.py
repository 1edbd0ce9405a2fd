"""`flywheel ingest`, `flywheel retention`, `flywheel dlq inspect|replay`, `flywheel topics create` and `flywheel bench ingest`
(registered by flywheel/cli.py). Keep top-level imports light: implementations load inside the commands.
"""

from __future__ import annotations

import json
import logging
import resource
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, never wrapped, then exit."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


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
    compact_hours: Annotated[
        bool, typer.Option(help="compact each hour partition once it is closed (keeps the live table small)")
    ] = True,
    stats_json: Annotated[
        Path | None, typer.Option(help="write final stats (and peak RSS) as JSON here")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="serve Prometheus metrics at :PORT/metrics (default: FLYWHEEL_INGEST_METRICS_PORT, off)"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG | INFO | WARNING")] = "WARNING",
) -> None:
    """Consume TraceEvents into the Delta table `traces`, exactly once (offsets live in the Delta log).

    Undecodable or invalid messages go to the dead-letter topic with the reason in headers. SIGTERM/SIGINT flush what is buffered and exit.

    Lake location: FLYWHEEL_LAKE_ROOT (local path or object-store URI); topics: FLYWHEEL_KAFKA_TRACES_TOPIC / FLYWHEEL_KAFKA_DLQ_TOPIC (create them with `flywheel topics create`).

    Windows: every FLYWHEEL_CYCLE_MIN_WINDOW_ROWS committed rows, a WindowAnnouncement goes to FLYWHEEL_KAFKA_WINDOWS_TOPIC (what schedules the drafter_flywheel DAG); FLYWHEEL_INGEST_ANNOUNCE_WINDOWS=false turns it off.

    Metrics (lag per partition, rows, dead letters, commit latency, table version): --metrics-port, bound to FLYWHEEL_INGEST_METRICS_HOST (127.0.0.1).
    """
    from confluent_kafka import KafkaError, KafkaException

    from consumers.delta_sink import IngestError, IngestOptions, TraceIngest
    from consumers.flush_policy import FlushPolicy
    from consumers.ingest_metrics import IngestMetrics, serve
    from consumers.table import SchemaMismatchError
    from consumers.window_announcements import WindowAnnouncer
    from core.settings import get_settings

    _setup_logging(log_level)
    settings = get_settings()
    served = settings.ingest
    port = metrics_port if metrics_port is not None else served.metrics_port
    opts = IngestOptions(
        group=group,
        policy=FlushPolicy(flush_events, flush_mib * 1024 * 1024, flush_latency_s),
        consume_batch=consume_batch,
        max_events=max_events,
        until_idle_s=until_idle_s,
        instance_id=instance_id,
        session_timeout_ms=session_timeout_ms,
        compact_closed_hours=compact_hours,
        connect_timeout_s=served.connect_timeout_s,
        stats_interval_s=served.stats_interval_s if port is not None else None,
    )
    metrics = IngestMetrics(topic or settings.kafka.traces_topic, group, settings.lake.traces_uri)
    stop_serving = None
    if port is not None:
        try:
            bound, stop_serving = serve(metrics, served.metrics_host, port)
        except OSError as e:
            _fail(f"cannot serve metrics on {served.metrics_host}:{port}: {e.strerror or e}")
        logging.getLogger("flywheel.ingest").info(
            "metrics at http://%s:%d/metrics", served.metrics_host, bound
        )
    try:
        announcer = (
            WindowAnnouncer(settings.kafka, settings.lake, settings.cycle)
            if served.announce_windows
            else None
        )
        sink = TraceIngest(
            settings.kafka, settings.lake, opts, topic=topic, metrics=metrics, announcer=announcer
        )
        stats = _run_with_progress(sink, max_events) if progress else sink.run()
    except (IngestError, SchemaMismatchError) as e:
        _fail(str(e))
    except KafkaException as e:
        why = e.args[0].str() if e.args and isinstance(e.args[0], KafkaError) else str(e)
        _fail(f"Kafka: {why}; run `flywheel stack status` (local stack) or check FLYWHEEL_KAFKA_*")
    finally:
        if stop_serving is not None:
            stop_serving()
    result = stats.as_dict() | {"peak_rss_mib": round(_peak_rss_mib(), 1), "table": settings.lake.traces_uri}
    if stats_json:
        stats_json.write_text(json.dumps(result, indent=2))
    console.print(
        f"ingested {stats.rows} rows, {stats.dead_letters} dead letters in {stats.commits} commits "
        f"({stats.conflicts} conflicts, {stats.resets} resets) into {settings.lake.traces_uri}; "
        f"{stats.windows_announced} windows announced"
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


dlq_app = typer.Typer(
    help="The dead-letter topic (FLYWHEEL_KAFKA_DLQ_TOPIC): what failed and why; redrive what decodes now.",
    no_args_is_help=True,
)


@dlq_app.command("inspect")
def dlq_inspect(
    samples: Annotated[int, typer.Option(help="letters shown per reason")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")] = False,
) -> None:
    """Count the dead letters the DLQ retains by reason and source topic, with samples (read-only)."""
    from consumers.dead_letter_replay import inspect
    from core.settings import get_settings

    kafka = get_settings().kafka
    with console.status(f"reading {kafka.dlq_topic}...") as status:
        summary = inspect(kafka, samples, on_batch=lambda n: status.update(f"reading {kafka.dlq_topic}: {n}"))
    if as_json:
        print(json.dumps(summary.as_dict(), indent=2))
        return
    table = Table(
        "reason", "letters", "sample (source, detail)", title=f"{kafka.dlq_topic}: {summary.letters} letters"
    )
    for reason, n in summary.by_reason.most_common():
        first = summary.samples.get(reason, [{}])[0]
        table.add_row(reason, str(n), f"{first.get('source', '')}  {first.get('detail', '')}"[:120])
    Console().print(table)
    if summary.letters:
        span = [
            datetime.fromtimestamp(t / 1000, UTC)
            for t in (summary.first_received_ms, summary.last_received_ms)
        ]
        console.print(f"received {span[0]:%Y-%m-%d %H:%M} .. {span[1]:%Y-%m-%d %H:%M} UTC")


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[
        list[str] | None, typer.Option(help="only letters with this dlq.reason (repeatable; default: all)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="decode and count, write nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
) -> None:
    """Redrive dead letters that decode now (a schema learnt, a rule fixed) into `traces`, exactly once.

    Each becomes the row the ingest would have written (source partition/offset, ingest_time = when the DLQ got
    it), inserted by a Delta MERGE only if the table lacks its source coordinates: replaying twice, or a letter
    the DLQ holds twice, writes each event once. Letters that still fail stay in the DLQ, counted by reason.
    """
    from consumers.dead_letter_replay import replay
    from core.settings import get_settings

    settings = get_settings()
    with console.status("replaying dead letters...") as status:
        report = replay(
            settings.kafka,
            settings.lake,
            set(reason) if reason else None,
            dry_run=dry_run,
            on_batch=lambda r: status.update(
                f"replaying dead letters: {r.letters} read, {r.selected} selected"
            ),
        )
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    new_rows = report.decoded - report.duplicates if dry_run else report.inserted
    console.print(
        f"{report.letters} letters, {report.selected} selected, {report.decoded} decode now "
        f"({report.duplicates} duplicates): {'would insert' if dry_run else 'inserted'} {new_rows} rows, "
        f"{report.already_in_table} already in {settings.lake.traces_uri}"
    )
    for why, n in report.still_invalid.most_common():
        console.print(f"  still failing, left in the DLQ: {n} x {why}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("ingest")(ingest)
    app.command("retention")(retention)
    app.add_typer(dlq_app, name="dlq")
