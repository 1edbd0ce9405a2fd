"""Real trace rows without the streaming pipeline: serve real prompts with ``vllm.LLM`` offline.

Used by tests, benchmarks and demos that need a small ``traces`` table before the Kafka -> Delta sink
runs. The rows are exactly what the sink writes: a TraceEvent record built by
``producers.trace_record.record_from_request_output`` plus the lake columns (kafka_partition,
kafka_offset, ingest_time, date, hour), written with ``schemas.arrow.traces_table_schema()``.

vLLM runs in a child process (``python -m bench.offline_traces``): the engine spawns workers and
keeps global state, so callers (pytest, the trainer) stay clean. Greedy (temperature 0), so a run is
deterministic for a given target, drafter and prompt set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.prompts import Prompt, load_prompts, split

OFFLINE_NODE = "offline-vllm"


def pick_prompts(domains: list[str], per_domain: int, held_out: bool = False, skip: int = 0) -> list[Prompt]:
    """``per_domain`` prompts of each domain from the train (or held-out) split, interleaved by domain."""
    columns = []
    for d in domains:
        train, held = split(load_prompts(d))
        pool = held if held_out else train
        columns.append(pool[skip : skip + per_domain])
    return [p for row in zip(*columns, strict=False) for p in row]


def lake_rows(
    records: list[dict[str, Any]], partition: int = 0, first_offset: int = 0
) -> list[dict[str, Any]]:
    """TraceEvent records -> rows of the ``traces`` table (adds source offsets, ingest_time and date/hour
    partitions). Nothing streamed these rows, so they count as observed when they finished (offline, the
    node's clock is the only one): ``ingest_time`` = ``finish_time``."""
    rows = []
    for i, rec in enumerate(records):
        observed = datetime.fromtimestamp(rec["finish_time"] / 1e6, tz=UTC)
        rows.append(
            rec
            | {
                "kafka_partition": partition,
                "kafka_offset": first_offset + i,
                "ingest_time": rec["finish_time"],
                "date": observed.strftime("%Y-%m-%d"),
                "hour": observed.hour,
            }
        )
    return rows


def write_traces(uri: str, rows: list[dict[str, Any]], mode: str = "append") -> int:
    """Append rows to the Delta table at ``uri`` (created on first write, with the lake's table properties
    and the ingest's Parquet choices); returns the new table version."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from consumers.lake_files import delta_writer_properties
    from consumers.table import TABLE_PROPERTIES
    from schemas.arrow import PARTITION_COLUMNS, traces_table_schema

    table = pa.Table.from_pylist(rows, schema=traces_table_schema())
    write_deltalake(
        uri,
        table,
        mode=mode,
        partition_by=PARTITION_COLUMNS,
        configuration=TABLE_PROPERTIES if not DeltaTable.is_deltatable(uri) else None,
        writer_properties=delta_writer_properties(),
    )
    return DeltaTable(uri).version()


def _serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    import time

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from core.target_model import read_manifest
    from producers.trace_record import ServingIdentity, record_from_request_output

    spec = json.loads(args.spec) if args.spec else None
    method = spec["method"] if spec else "none"
    identity = ServingIdentity(
        serving_node=OFFLINE_NODE,
        target_model_id=Path(args.target).name,
        target_revision=(read_manifest(Path(args.target)) or {}).get("revision", "unknown"),
        spec_method=method,
        num_spec_tokens=int(spec["num_speculative_tokens"]) if spec else 0,
        drafter_id=(args.drafter_id or method) if spec else None,
    )
    prompts = pick_prompts(args.domains.split(","), args.per_domain, args.held_out, args.skip)
    tok = AutoTokenizer.from_pretrained(args.target)
    token_prompts = [
        {
            "prompt_token_ids": tok.apply_chat_template(
                p.messages(), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        }
        for p in prompts
    ]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            extra_args={"domain": p.domain, "prompt_id": p.prompt_id},
        )
        for p in prompts
    ]
    llm = LLM(
        model=args.target,
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        gpu_memory_utilization=0.3,
        speculative_config=spec,
        per_request_spec_decode_metrics="detailed" if spec else "none",
        seed=0,
        enforce_eager=args.enforce_eager,
    )
    records = []
    if args.batched:
        # All at once, as a batch (several times the tokens/s of one at a time on 2 cores): the engine's
        # continuous batching serves them together, so one arrival and one finish time stand for all,
        # offset by a microsecond per prompt to keep the prompt order as the finish order.
        start = time.time()
        outs = llm.generate(token_prompts, params, use_tqdm=False)
        end = time.time()
        return [
            record_from_request_output(
                identity,
                out,
                drafter_version=args.drafter_version,
                arrival_time_s=start,
                finish_time_s=end + i * 1e-6,
                sampling_params=sp,
            )
            for i, (out, sp) in enumerate(zip(outs, params, strict=True))
        ]
    # One request at a time keeps finish_time strictly ordered like real sequential traffic and makes the
    # run independent of batching; a window of ~100 short requests still takes only a minute or two.
    for prompt, sp in zip(token_prompts, params, strict=True):
        start = time.time()
        (out,) = llm.generate([prompt], sp, use_tqdm=False)
        records.append(
            record_from_request_output(
                identity,
                out,
                drafter_version=args.drafter_version,
                arrival_time_s=start,
                finish_time_s=time.time(),
                sampling_params=sp,
            )
        )
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="serve real prompts with vllm.LLM and write TraceEvent records")
    p.add_argument("--target", required=True, help="HF target model dir")
    p.add_argument("--spec", default="", help="speculative_config as JSON ('' = no speculation)")
    p.add_argument("--drafter-id", default=None)
    p.add_argument("--drafter-version", default=None)
    p.add_argument("--domains", default="code,prose,docs")
    p.add_argument("--per-domain", type=int, default=10)
    p.add_argument("--skip", type=int, default=0, help="skip this many prompts per domain")
    p.add_argument("--held-out", action="store_true", help="use the held-out prompt split")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--batched", action="store_true", help="serve every prompt in one batch (faster)")
    p.add_argument("--out", required=True, help="JSON lines file of TraceEvent records")
    args = p.parse_args(argv)
    records = _serve(args)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))


def serve_to_records(
    target_dir: Path,
    out: Path,
    *,
    spec: dict[str, Any] | None,
    drafter_id: str | None = None,
    drafter_version: str | None = None,
    domains: tuple[str, ...] = ("code", "prose", "docs"),
    per_domain: int = 10,
    skip: int = 0,
    held_out: bool = False,
    max_tokens: int = 128,
    enforce_eager: bool = True,
    batched: bool = False,
    timeout_s: float = 1200,
) -> list[dict[str, Any]]:
    """Run ``main`` in a child process and return its records (raises with the child's log tail on failure)."""
    cmd = [
        sys.executable,
        "-m",
        "bench.offline_traces",
        "--target",
        str(target_dir),
        "--spec",
        json.dumps(spec) if spec else "",
        "--domains",
        ",".join(domains),
        "--per-domain",
        str(per_domain),
        "--skip",
        str(skip),
        "--max-tokens",
        str(max_tokens),
        "--out",
        str(out),
    ]
    if drafter_id:
        cmd += ["--drafter-id", drafter_id]
    if drafter_version:
        cmd += ["--drafter-version", drafter_version]
    if held_out:
        cmd.append("--held-out")
    if enforce_eager:
        cmd.append("--enforce-eager")
    if batched:
        cmd.append("--batched")
    # Records are built here from the RequestOutputs; a capture plugin installed in the environment must
    # not also publish these runs to a live broker.
    env = os.environ | {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "TOKENIZERS_PARALLELISM": "false",
        "FLYWHEEL_SERVING_CAPTURE_ENABLED": "false",
        "FLYWHEEL_SERVING_FOLLOW_PROMOTIONS": "false",
    }
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # engine core + workers live in the child's session
            proc.wait()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"vLLM trace run failed (rc={rc}); log {log}:\n{tail}")
    return [json.loads(line) for line in out.read_text().splitlines() if line]


if __name__ == "__main__":
    main()
