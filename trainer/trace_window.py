"""Training data from a window of the Delta table ``traces``: sequences, per-token labels, packs.

A window is a snapshot version of the table (default: latest) narrowed by an ingest-time range and/or to
the rows appended after an earlier version, and to the traces of one served target (model id, revision: a
shared table mixes targets, and traces are only comparable within one revision). Rows stream in Arrow
record batches through a bounded shuffle buffer into token-budget packs, so memory stays flat however long
the window is. The newest ``holdout_fraction`` of the window (by ingest_time) is held out for offline
evaluation.

Labels of output positions (docs/architecture.md): output[0] is a plain target token (prefill); each recorded
verify step s then emits ``per_step_accepted[s]`` accepted draft tokens and one target token, a
*correction* if the step's draft was rejected (accepted < drafted) or a *bonus* if it was all accepted.
So len(output) = 1 + sum(a_s + 1) - cut, where the last step lost ``cut`` (0..a_last) tokens to
max_tokens/stop. Methods that skip drafting on some steps (ngram, suffix) leave those steps unrecorded;
their outputs align only when the lengths match exactly, otherwise positions are UNKNOWN.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from core.heldout import is_held_out
from schemas.arrow import TRUSTED_TIME_COLUMN

# Windows select rows by the lake's trusted time (when the pipeline observed them), never by the serving
# node's finish_time, which is data (its clock can be wrong): docs/data-contract.md.
WINDOW_TIME = TRUSTED_TIME_COLUMN

SEQUENCE_COLUMNS = [
    "event_id",
    "finish_time",
    "prompt_token_ids",
    "output_token_ids",
    "per_step_accepted",
    "per_step_drafted",
    "spec_method",
    "num_spec_tokens",
    "drafter_id",
    "drafter_version",
    "domain",
    "temperature",
    "target_model_id",
    "target_revision",
]
# the served target a trace belongs to: a shared table mixes targets, and traces are only comparable within
# one revision (schemas/avro/trace_event/v1.avsc)
TARGET_COLUMNS = ("target_model_id", "target_revision")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = logging.getLogger("flywheel.trainer")
SKIPPING_METHODS = frozenset({"ngram", "ngram_gpu", "suffix"})  # steps without drafts go unrecorded


class WindowError(ValueError):
    """A window that cannot be read as asked: the message says what to change."""


class TableMissingError(WindowError):
    """No Delta table at the window's URI."""


class Label(IntEnum):
    PLAIN = 0  # target token not preceded by drafts (prefill token, spec off, unrecorded step)
    ACCEPTED = 1  # draft token the target accepted
    CORRECTION = 2  # target token replacing a rejected draft
    BONUS = 3  # target token after a fully accepted draft
    UNKNOWN = 4  # the per-step arrays do not align with the output


def output_labels(
    n_output: int, accepted: list[int], drafted: list[int], method: str = "eagle3"
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, depth) per output position; depth = index of the token within its verify step
    (draft depth 0..K-1 for accepted drafts, a_s for the step's target token), -1 for PLAIN/UNKNOWN."""
    labels = np.full(n_output, Label.UNKNOWN, dtype=np.int8)
    depth = np.full(n_output, -1, dtype=np.int8)
    if n_output == 0:
        return labels, depth
    if not accepted:
        labels[:] = Label.PLAIN
        return labels, depth
    labels[0] = Label.PLAIN
    cut = 1 + sum(a + 1 for a in accepted) - n_output
    exact = cut == 0 if method in SKIPPING_METHODS else 0 <= cut <= accepted[-1]
    if not exact:
        return labels, depth
    j = 1
    for a, d in zip(accepted, drafted, strict=True):
        kinds = [Label.ACCEPTED] * a + [Label.CORRECTION if a < d else Label.BONUS]
        for i, kind in enumerate(kinds):
            if j < n_output:
                labels[j], depth[j] = kind, i
            j += 1
    return labels, depth


@dataclass
class TraceSequence:
    """One trace as training data: prompt + output token ids and the output's labels."""

    tokens: np.ndarray  # (T,) int64, prompt + output
    prompt_len: int
    labels: np.ndarray  # (T - prompt_len,) Label
    depth: np.ndarray  # (T - prompt_len,)
    domain: str | None = None
    spec_method: str = "none"
    num_spec_tokens: int = 0
    drafter_id: str | None = None
    drafter_version: str | None = None
    finish_time: datetime | None = None
    per_step_accepted: list[int] = field(default_factory=list)
    event_id: str = ""
    temperature: float | None = None  # the request's sampling temperature (0 = greedy); None if unknown
    target_model_id: str | None = None
    target_revision: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def truncated(self, max_len: int) -> TraceSequence:
        if len(self) <= max_len:
            return self
        n_out = max(0, max_len - self.prompt_len)
        return replace(
            self,
            tokens=self.tokens[:max_len],
            prompt_len=min(self.prompt_len, max_len),
            labels=self.labels[:n_out],
            depth=self.depth[:n_out],
        )


def sequence_from_row(row: dict) -> TraceSequence:
    prompt, output = row["prompt_token_ids"], row["output_token_ids"]
    method = row.get("spec_method") or "none"
    labels, depth = output_labels(
        len(output), row["per_step_accepted"] or [], row["per_step_drafted"] or [], method
    )
    return TraceSequence(
        tokens=np.asarray(prompt + output, dtype=np.int64),
        prompt_len=len(prompt),
        labels=labels,
        depth=depth,
        domain=row.get("domain"),
        spec_method=method,
        num_spec_tokens=row.get("num_spec_tokens") or 0,
        drafter_id=row.get("drafter_id"),
        drafter_version=row.get("drafter_version"),
        finish_time=row.get("finish_time"),
        per_step_accepted=list(row["per_step_accepted"] or []),
        event_id=row.get("event_id", ""),
        temperature=None if (t := row.get("temperature")) is None else round(float(t), 6),  # float32 column
        target_model_id=row.get("target_model_id"),
        target_revision=row.get("target_revision"),
    )


@dataclass(frozen=True)
class Window:
    """Which rows of the traces table: snapshot ``version`` (None = latest), ingest_time in [start, end),
    and, if ``after_version`` is set, only rows appended by commits after that version; if
    ``target_model_id`` / ``target_revision`` are set, only traces of that served target.

    ``storage_options`` are the lake's (``LakeSettings.storage_options``: object-store credentials), passed
    to every ``DeltaTable`` the reader opens; they stay out of ``repr`` and ``provenance()``."""

    uri: str
    start: datetime | None = None
    end: datetime | None = None
    version: int | None = None
    after_version: int | None = None
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    # held-out traffic (core/heldout.py): "exclude" for training, "only" for measuring, None: every row
    heldout_fraction: float = 0.0
    heldout: str | None = None
    # the target whose traces are read (None: any); readers pass the target they serve or train (target_identity)
    target_model_id: str | None = None
    target_revision: str | None = None


class WindowReader:
    """Reads one window; ``provenance()`` records exactly which table version and files were read."""

    def __init__(self, window: Window):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        self.window = window
        try:
            self.table = DeltaTable(
                window.uri, version=window.version, storage_options=window.storage_options
            )
        except TableNotFoundError:
            raise TableMissingError(
                f"no Delta table at {window.uri}: `flywheel ingest` creates it, or point the recipe's "
                "window.table (or FLYWHEEL_LAKE_ROOT) at an existing one"
            ) from None
        self.version = self.table.version()
        self._files = self._select_files()
        self._targets: dict[tuple[str, str], int] | None = None

    def _add_actions(self, version: int | None) -> pa.Table:
        from deltalake import DeltaTable

        table = (
            self.table
            if version is None
            else DeltaTable(self.window.uri, version=version, storage_options=self.window.storage_options)
        )
        return pa.table(table.get_add_actions(flatten=True))

    def _select_files(self) -> list[dict]:
        adds = self._add_actions(None).to_pylist()
        if self.window.after_version is not None:
            before = {a["path"] for a in self._add_actions(self.window.after_version).to_pylist()}
            # appended files only: compaction rewrites (data_change=False) hold rows seen before
            adds = [a for a in adds if a["path"] not in before and a.get("data_change", True)]
        start, end = (_utc(t) if t is not None else None for t in (self.window.start, self.window.end))
        keep = []
        for a in adds:  # prune files by their WINDOW_TIME statistics when the writer recorded them
            lo, hi = a.get(f"min.{WINDOW_TIME}"), a.get(f"max.{WINDOW_TIME}")
            # Delta statistics keep milliseconds: the true max can be up to 1 ms above ``hi``
            if start is not None and hi is not None and hi + timedelta(milliseconds=1) <= start:
                continue
            if end is not None and lo is not None and lo >= end:
                continue
            keep.append(a)
        return keep

    @property
    def trace_bytes(self) -> int:
        """Bytes on disk of the Parquet files this window reads."""
        return int(sum(a["size_bytes"] for a in self._files))

    def dataset(self) -> ds.Dataset:
        full = self.table.to_pyarrow_dataset()
        paths = {a["path"] for a in self._files}
        frags = [f for f in full.get_fragments() if _relative(f.path, self.table.table_uri) in paths]
        return ds.FileSystemDataset(frags, full.schema, full.format, full.filesystem)

    def time_filter(self, start: datetime | None = None, end: datetime | None = None) -> pc.Expression | None:
        lo = max((t for t in (self.window.start, start) if t is not None), default=None)
        hi = min((t for t in (self.window.end, end) if t is not None), default=None)
        expr = None
        for op, t in ((pc.greater_equal, lo), (pc.less, hi)):
            if t is not None:
                e = op(pc.field(WINDOW_TIME), pa.scalar(_utc(t), pa.timestamp("us", tz="UTC")))
                expr = e if expr is None else expr & e
        return expr

    def target_filter(self) -> pc.Expression | None:
        """The window's target as a scan predicate (None: every target)."""
        w = self.window
        return _all(
            pc.field(col) == pa.scalar(value, pa.string())
            for col, value in zip(TARGET_COLUMNS, (w.target_model_id, w.target_revision), strict=True)
            if value is not None
        )

    def row_filter(self, start: datetime | None = None, end: datetime | None = None) -> pc.Expression | None:
        """Time range and target, pushed into the Parquet scan (row groups pruned by their statistics)."""
        return _all(e for e in (self.time_filter(start, end), self.target_filter()) if e is not None)

    def is_window_target(self, model_id: str | None, revision: str | None) -> bool:
        w = self.window
        return (w.target_model_id is None or model_id == w.target_model_id) and (
            w.target_revision is None or revision == w.target_revision
        )

    def targets(self) -> dict[tuple[str, str], int]:
        """Rows per (target_model_id, target_revision) in the window's files and time range, whatever the
        target filter and held-out split (cached: one scan of the two target columns)."""
        if self._targets is None:
            counts: dict[tuple[str, str], int] = {}
            for batch in self.dataset().to_batches(
                columns=list(TARGET_COLUMNS), filter=self.time_filter(), batch_size=65536
            ):
                grouped = (
                    pa.Table.from_batches([batch])
                    .group_by(list(TARGET_COLUMNS))
                    .aggregate([([], "count_all")])
                )
                for row in grouped.to_pylist():
                    key = (row["target_model_id"], row["target_revision"])
                    counts[key] = counts.get(key, 0) + row["count_all"]
            self._targets = counts
            if len(counts) > 1 and self.target_filter() is None:
                log.warning(
                    "window of %s mixes %d targets and reads them all (set Window.target_model_id/"
                    "target_revision): %s",
                    self.window.uri,
                    len(counts),
                    _describe(counts),
                )
        return self._targets

    def other_target_rows(self) -> int:
        """Rows of the window (files, time range) that the target filter skips."""
        if self.target_filter() is None:
            return 0
        return sum(n for (m, r), n in self.targets().items() if not self.is_window_target(m, r))

    def require_target_rows(self) -> None:
        """Fail clearly when the target filter leaves nothing although the window holds other targets'
        traces (a trainer pointed at the wrong target, or a served name that differs from the dir name)."""
        targets = self.targets()
        if self.target_filter() is not None and not any(self.is_window_target(*k) for k in targets):
            w = self.window
            raise WindowError(
                f"window of {w.uri} holds no traces of target {w.target_model_id or '*'}@"
                f"{w.target_revision or '*'}; it holds {_describe(targets) or 'no traces'}"
            )

    def _split(self) -> str | None:
        """The held-out filter rows go through: None when every row is read (no hashing needed)."""
        w = self.window
        return None if w.heldout == "exclude" and w.heldout_fraction == 0 else w.heldout

    def batches(
        self, columns: list[str], start=None, end=None, batch_size: int = 256
    ) -> Iterator[pa.RecordBatch]:
        """The window's rows (time range, held-out split) as record batches of ``columns``."""
        split = self._split()
        read = columns if split is None or "prompt_token_ids" in columns else [*columns, "prompt_token_ids"]
        for batch in self.dataset().to_batches(
            columns=read, filter=self.row_filter(start, end), batch_size=batch_size
        ):
            if split is not None:
                held = [
                    is_held_out(p, self.window.heldout_fraction)
                    for p in batch.column("prompt_token_ids").to_pylist()
                ]
                batch = batch.filter(pa.array(held) if split == "only" else pc.invert(pa.array(held)))
                batch = batch.select(columns)
            if batch.num_rows:
                yield batch

    def rows(self, start=None, end=None) -> Iterator[dict]:
        for batch in self.batches(SEQUENCE_COLUMNS, start, end):
            yield from batch.to_pylist()

    def sequences(self, start=None, end=None) -> Iterator[TraceSequence]:
        for row in self.rows(start, end):
            yield sequence_from_row(row)

    def holdout_cutoff(self, fraction: float) -> datetime | None:
        """WINDOW_TIME at which the newest ``fraction`` of rows begins (None when nothing is held out)."""
        if fraction <= 0:
            return None
        times = [b.column(0) for b in self.batches([WINDOW_TIME], batch_size=65536)]
        if not times:
            return None
        arr = np.sort(pa.concat_arrays(times).cast(pa.int64()).to_numpy())  # 8 bytes/row
        k = min(len(arr) - 1, int(np.floor(len(arr) * (1 - fraction))))
        return EPOCH + timedelta(microseconds=int(arr[k]))

    def token_counts(self, vocab_size: int, end=None, include_prompt: bool = True) -> np.ndarray:
        """Frequency of each token id in the window's traffic (drives draft-vocabulary pruning)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        cols = ["output_token_ids"] + (["prompt_token_ids"] if include_prompt else [])
        for batch in self.batches(cols, end=end, batch_size=1024):
            for col in cols:
                flat = pc.list_flatten(batch.column(col)).to_numpy(zero_copy_only=False)
                counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
        return counts

    def num_rows(self, start=None, end=None) -> int:
        if self._split() is not None:
            return sum(b.num_rows for b in self.batches(["finish_time"], start, end, batch_size=65536))
        return self.dataset().count_rows(filter=self.row_filter(start, end))

    def provenance(self) -> dict:
        w = self.window
        return {
            "uri": w.uri,
            "table_version": self.version,
            "after_version": w.after_version,
            "start": w.start.isoformat() if w.start else None,
            "end": w.end.isoformat() if w.end else None,
            "heldout": w.heldout,
            "heldout_fraction": w.heldout_fraction,
            "files": len(self._files),
            "trace_bytes": self.trace_bytes,
            "target_model_id": w.target_model_id,
            "target_revision": w.target_revision,
            # rows of the window's files and time range that belong to other targets (0 without a filter)
            "other_target_rows": self.other_target_rows(),
        }


def _all(exprs: Iterable[pc.Expression]) -> pc.Expression | None:
    out = None
    for e in exprs:
        out = e if out is None else out & e
    return out


def _describe(targets: dict[tuple[str, str], int]) -> str:
    return ", ".join(f"{m}@{r}: {n} rows" for (m, r), n in sorted(targets.items()))


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _relative(path: str, table_uri: str) -> str:
    root = table_uri.removeprefix("file://").rstrip("/") + "/"
    return path.removeprefix("file://").removeprefix(root)


def target_identity(path: Path | str) -> tuple[str, str | None]:
    """(target_model_id, target_revision) that serving stamps on the traces of the target at ``path``.

    The id is the dir's name (vLLM is served with ``--served-model-name`` = ServingSettings.target_model,
    the dir under models_dir); the revision is the manifest's (core/target_model.py, as the capture plugin
    reads it), None for a dir without one (its traces say 'unknown': the revision is then not checked).
    Cheap (no weights or torch are loaded): a trainer narrows its window to these before loading the target.
    """
    from core.target_model import read_manifest

    path = Path(path)
    manifest = read_manifest(path) or {}
    return path.name, manifest.get("revision")


def version_order(reader: WindowReader) -> list[str]:
    """Drafter versions seen in the window, oldest first (by the first time each served a trace)."""
    first: dict[str, int] = {}
    for b in reader.batches(["drafter_version", WINDOW_TIME], batch_size=65536):
        vs, ts = b.column(0).to_pylist(), b.column(1).cast(pa.int64()).to_pylist()
        for v, t in zip(vs, ts, strict=True):
            if v is not None and (v not in first or t < first[v]):
                first[v] = t
    return sorted(first, key=first.__getitem__)


def shuffled(items: Iterable, buffer: int, rng: random.Random) -> Iterator:
    """Bounded-memory shuffle: keep ``buffer`` items, emit a random one for each new arrival."""
    pool: list = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def packs(
    sequences: Iterable[TraceSequence], pack_tokens: int, max_seq_len: int
) -> Iterator[list[TraceSequence]]:
    """Greedy packing in arrival order into packs of at most ``pack_tokens`` tokens (a longer sequence,
    cut to ``max_seq_len``, is a pack of its own)."""
    pack, used = [], 0
    for seq in sequences:
        seq = seq.truncated(max_seq_len)
        if pack and used + len(seq) > pack_tokens:
            yield pack
            pack, used = [], 0
        pack.append(seq)
        used += len(seq)
    if pack:
        yield pack
