"""The capture benchmark's statistics and profile summary, on hand-made rounds and stacks."""

from __future__ import annotations

import math

import pytest

from bench.capture import (
    collapsed,
    crossover_interval,
    percentile,
    requests_for,
    summarise_level,
    summarise_profile,
)
from producers.spill import SpillDir
from producers.traffic import RequestResult, TrafficReport


def _report(tokens_per_s: float, latencies: list[float]) -> TrafficReport:
    wall = 10.0
    per = tokens_per_s * wall / len(latencies)
    return TrafficReport(
        [RequestResult("code", f"p{i}", True, lat, int(per)) for i, lat in enumerate(latencies)], wall
    )


def test_level_ratio_is_the_geometric_mean_of_round_pairs_with_an_interval():
    on = [_report(98, [1.0, 2.0]), _report(102, [1.0, 2.0]), _report(99, [1.0, 2.2])]
    off = [_report(100, [1.0, 2.0]), _report(100, [1.0, 2.0]), _report(100, [1.0, 2.0])]
    level = summarise_level([on], [off])
    expected = math.exp(sum(math.log(r) for r in (0.98, 1.02, 0.99)) / 3)
    assert level["throughput_ratio"] == pytest.approx(expected, rel=1e-3)
    assert level["throughput_ratio_ci_low"] < level["throughput_ratio"] < level["throughput_ratio_ci_high"]
    assert level["pairs"] == 3
    assert level["rounds_tokens_per_s_with_plugin"] == [98.0, 102.0, 99.0]
    # pooled latencies: with = [1, 2, 1, 2, 1, 2.2], without = [1, 2] * 3
    assert level["latency_p50_ratio"] == pytest.approx(1.0)
    assert level["latency_p99_ratio"] == pytest.approx(1.1)


def test_a_consistent_slowdown_has_an_interval_below_one():
    on = [_report(95 + 0.1 * i, [1.0]) for i in range(6)]
    off = [_report(100 + 0.1 * i, [1.0]) for i in range(6)]
    level = summarise_level([on], [off])
    assert level["throughput_ratio_ci_high"] < 0.99


def test_crossover_cancels_a_server_difference_and_keeps_the_interval_tight():
    # the plugin costs nothing; the first-started server is 3 % slower than the second
    first = [0.97 * (1 + e) for e in (0.002, -0.003, 0.001, -0.001, 0.002)]  # plugin on the slow server
    second = [1 / 0.97 * (1 + e) for e in (-0.002, 0.001, 0.003, -0.002, 0.0)]  # plugin on the fast one
    both = crossover_interval([first, second])
    assert both.n == 10 and both.low < 1.0 < both.high and both.high / both.low < 1.01
    pooled = crossover_interval([first + second, []])  # ignoring the halves: far wider
    assert pooled.high / pooled.low > 1.02
    on = [[_report(97, [1.0])], [_report(103, [1.0])]]
    off = [[_report(100, [1.0])], [_report(100, [1.0])]]
    level = summarise_level(on, off)
    assert level["half_ratios"] == pytest.approx([0.97, 1.03])
    assert level["server_difference"] == pytest.approx((0.97 / 1.03) ** 0.5)


def test_percentile_is_nearest_rank():
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def test_requests_per_round_keep_every_slot_busy():
    assert requests_for(1) == 6 and requests_for(8) == 16 and requests_for(32) == 64


def test_profile_summary_counts_samples_in_our_code_by_innermost_frame(tmp_path):
    root = "/repo"
    with_plugin = tmp_path / "with.txt"
    with_plugin.write_text(
        "main (/repo/producers/vllm_server.py:120);process_outputs (/venv/vllm/output_processor.py:700) 90\n"
        "run (/usr/lib/asyncio/events.py:80);_update_stats_from_finished (/repo/producers/vllm_capture.py:230);"
        "on_finished (/repo/producers/vllm_capture.py:160);build_trace_record (/repo/producers/trace_record.py:60) 4\n"
        "_run (/repo/producers/emitter.py:120);encode (/repo/schemas/codec.py:40);writer (fastavro) 6\n"
    )
    without = tmp_path / "without.txt"
    without.write_text("run (/usr/lib/asyncio/events.py:80) 95\n")
    assert collapsed(without) == [(["run (/usr/lib/asyncio/events.py:80)"], 95)]
    summary = summarise_profile(with_plugin, without, root)
    assert summary["samples_with_plugin"] == 100 and summary["samples_without_plugin"] == 95
    assert summary["flywheel_samples"] == 10 and summary["flywheel_share"] == pytest.approx(0.10)
    assert summary["flywheel_top_functions"] == {
        "encode (schemas/codec.py:40)": 6,
        "build_trace_record (producers/trace_record.py:60)": 4,
    }


def test_spill_dir_lists_once_and_tracks_its_own_files(tmp_path):
    spill = SpillDir(tmp_path / "spill")
    assert not spill.pending()
    spill.append(b"k", b"v")
    spill.seal()
    spill.append(b"k", b"w")
    assert [p.name for p in spill.files()] == ["spill-00000000.bin", "spill-00000001.bin"]
    first = spill.files()[0]
    first.with_suffix(".acked").write_text("1")
    spill.remove(first)
    assert not first.exists() and not first.with_suffix(".acked").exists()
    assert [p.name for p in spill.files()] == ["spill-00000001.bin"]
    assert [p.name for p in SpillDir(tmp_path / "spill").files()] == [
        "spill-00000001.bin"
    ]  # a fresh listing agrees
