"""`flywheel bench all`: every benchmark, each in its own process, gathered into one JSON document.

Each benchmark keeps its own command (`flywheel bench capture|ingest|train --json PATH`); this runs them one
after the other (they would disturb each other's timings side by side), collects their JSON and adds the
definitions of docs/architecture.md the numbers follow. A failing benchmark is recorded with its error and the
others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFINITIONS = {
    "tau": "acceptance length = mean tokens emitted per verify step = 1 + mean(per_step_accepted)",
    "measured_speedup": "output tokens/s with the drafter / output tokens/s without speculation, same "
    "prompts, same engine build, same run (interleaved), stated concurrency; never a cost-model estimate",
    "offline_replay_tau": "tau the drafter would reach on recorded traces, computed with the target's "
    "recomputed distributions (training curves and pre-screening, not promotion)",
    "ratios": "timings on shared cores are noisy, so every benchmark reports ratios measured side by side "
    "in one run",
}

# benchmark -> (full-size arguments, --quick arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "capture": ([], ["--rounds", "2", "--levels", "1,8"]),
    "ingest": ([], ["--events", "30000", "--pool", "10000"]),
    "train": ([], ["--steps", "2"]),
}


def run_one(name: str, args: list[str], workdir: Path) -> dict[str, Any]:
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "flywheel.cli", "bench", name, "--json", str(out), *args]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0 or not out.exists():
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:], "seconds": seconds}
    return json.loads(out.read_text()) | {"seconds": seconds}


def run(only: list[str] | None = None, quick: bool = False, on_start=None) -> dict[str, Any]:
    names = only or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; valid: {', '.join(BENCHMARKS)}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in names:
            if on_start is not None:
                on_start(name)
            full, small = BENCHMARKS[name]
            results[name] = run_one(name, small if quick else full, Path(tmp))
    return {
        "quick": quick,
        "definitions": DEFINITIONS,
        "benchmarks": results,
        "failed": [n for n, r in results.items() if "error" in r],
    }
