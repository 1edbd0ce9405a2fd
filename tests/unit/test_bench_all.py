"""`flywheel bench all`: the benchmark list and its validation (running them needs the stack: bench/)."""

from __future__ import annotations

import pytest

from bench import all as bench_all


def test_every_benchmark_has_full_and_quick_arguments():
    assert set(bench_all.BENCHMARKS) == {"capture", "ingest", "train"}
    for full, quick in bench_all.BENCHMARKS.values():
        assert isinstance(full, list) and isinstance(quick, list)
    assert {"tau", "measured_speedup", "offline_replay_tau"} <= set(bench_all.DEFINITIONS)


def test_unknown_benchmark_names_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="valid: capture, ingest, train"):
        bench_all.run(only=["capture", "nope"])
