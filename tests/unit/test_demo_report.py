"""The demo report's figures, from hand-computed per-request per_step_accepted lists."""

from __future__ import annotations

import json

import pytest

from flywheel.demo import report as rep


def test_pooled_tau_weighs_every_verify_step():
    # 3 + 0 + 1 accepted over 3 steps -> 1 + 4/3
    assert rep.pooled_tau([[3, 0], [1]]) == pytest.approx(1 + 4 / 3)
    assert rep.pooled_tau([[], []]) is None
    assert rep.pooled_tau([]) is None


def test_rolling_tau_uses_the_trailing_window_of_requests():
    requests = [[0, 0], [2], [], [3, 3]]
    assert rep.rolling_tau(requests, 2) == pytest.approx([1.0, 1 + 2 / 3, 3.0, 4.0])
    assert rep.rolling_tau([[], [1]], 1) == [None, 2.0]
    with pytest.raises(ValueError):
        rep.rolling_tau(requests, 0)


def _point(probe: str, flywheel: float | None, after: int | None) -> dict:
    return {"probe": probe, "flywheel": flywheel, "requests_after_shift": after}


@pytest.mark.parametrize(
    ("points", "reference", "expected"),
    [
        # bar 0.9 x 2.0 = 1.8: reached at the probe after 160 post-shift requests
        (
            [_point("A", 2.5, None), _point("B0", 1.2, 0), _point("B1", 1.6, 96), _point("B", 1.8, 160)],
            2.0,
            160,
        ),
        ([_point("B0", 1.9, 0), _point("B", 1.0, 96)], 2.0, 0),  # at the shift already: 0 requests
        ([_point("A", 2.5, None), _point("B0", 1.2, 0), _point("B", 1.79, 96)], 2.0, None),  # never
        ([_point("B", 3.0, 96)], None, None),  # no reference: no recovery figure
        ([_point("B1", None, 48), _point("B", 1.9, 96)], 2.0, 96),  # a probe nobody served is skipped
    ],
)
def test_recovery_requests_counts_post_shift_requests_until_the_reference_bar(points, reference, expected):
    assert rep.recovery_requests(points, reference) == expected


def _series() -> rep.DemoSeries:
    s = rep.DemoSeries()
    for i, steps in enumerate([[0, 0], [1, 1], [2, 2], [2, 2]]):  # flywheel before the shift
        s.records.append(rep.RequestRecord("flywheel", "A", "code", i, steps, 8, 0.1))
    for i, steps in enumerate([[0, 0], [0, 1], [2, 1], [2, 2]]):  # flywheel after
        s.records.append(rep.RequestRecord("flywheel", "B", "prose", 4 + i, steps, 8, 0.1))
    for i, steps in enumerate([[1, 0], [0, 0], [1, 0], [0, 1]]):  # static after
        s.records.append(rep.RequestRecord("static", "B", "prose", i, steps, 8, 0.1))
    s.records.append(rep.RequestRecord("static", "B", "prose", 4, [], 0, 0.1, ok=False))
    for phase, server, steps in (  # the held-out probes, the same prompts to F and S
        ("A-heldout", "flywheel", [[2, 1], [3]]),
        ("A-heldout", "static", [[3, 3], [3]]),
        ("B-heldout", "flywheel", [[1, 2], [0]]),
        ("B-heldout", "static", [[0, 0], [1]]),
        ("R-heldout", "reference", [[3, 2], [1]]),
    ):
        for i, st in enumerate(steps):
            domain = "code" if phase[0] == "A" else "prose"
            s.records.append(rep.RequestRecord(server, phase, domain, i, st, 8, 0.1, prompt_id=f"p{i}"))
    return s


def test_a_server_that_never_drafted_has_tau_one():
    assert rep.served_tau([[], []]) == 1.0  # speculation off: one token per target forward
    assert rep.served_tau([]) is None and rep.served_tau([[1], []]) == 2.0


PROBES = [
    {"probe": "A", "domain": "code", "cycles": 0, "requests_after_shift": None},
    {"probe": "B", "domain": "prose", "cycles": 1, "requests_after_shift": 4},
]


def test_tau_figures_come_from_the_heldout_probes_and_recovery_from_the_reference():
    figures = rep.compute_figures(_series(), PROBES)
    assert figures["tau_before_shift"] == pytest.approx(1 + 6 / 3)
    assert figures["tau_before_shift_static"] == pytest.approx(1 + 9 / 3)
    assert figures["tau_after_shift_flywheel"] == pytest.approx(1 + 3 / 3)
    assert figures["tau_after_shift_static"] == pytest.approx(1 + 1 / 3)
    assert figures["reference_tau"] == pytest.approx(1 + 6 / 3)
    # F's held-out prose tau 2.0 < 0.9 x 3.0: not recovered; per prompt F 2.5, 1.0 vs reference 3.5, 2.0
    assert figures["recovery_requests"] is None
    paired = figures["flywheel_vs_reference_after_shift"]
    assert paired["n"] == 2 and paired["point"] == pytest.approx((2.5 / 3.5 * 1.0 / 2.0) ** 0.5)
    series = _series()
    series.records = [r for r in series.records if r.server != "reference"]
    series.records.append(
        rep.RequestRecord("reference", "R-heldout", "prose", 0, [1, 1], 8, 0.1, prompt_id="p0")
    )
    recovered = rep.compute_figures(series, PROBES)  # reference tau 2.0: bar 1.8, F's 2.0 clears it
    assert recovered["reference_tau"] == pytest.approx(2.0) and recovered["recovery_requests"] == 4
    assert rep.compute_figures(series, PROBES[:1])["recovery_requests"] is None  # no post-shift probe


def test_flywheel_vs_static_is_paired_per_heldout_prompt_with_an_interval():
    figures = rep.compute_figures(_series(), PROBES)
    before, after = figures["flywheel_vs_static_before_shift"], figures["flywheel_vs_static_after_shift"]
    # before: F 2.5, 4.0 vs S 4.0, 4.0 -> ratios 0.625, 1.0; after: F 2.5, 1.0 vs S 1.0, 2.0 -> 2.5, 0.5
    assert before["n"] == 2 and before["point"] == pytest.approx(0.625**0.5)
    assert after["n"] == 2 and after["point"] == pytest.approx(1.25**0.5)
    assert after["low"] < 1 < after["high"]  # two prompts that disagree: the t interval says so
    assert rep.verdict(figures | {"tau_after_shift_static": 1.5})["flywheel_beats_static_paired"] is None

    s = rep.DemoSeries()
    for i in range(3):  # F accepts 3 of 3 drafts where S accepts 1: tau 4 vs 2 on every prompt
        s.records.append(
            rep.RequestRecord("flywheel", "B-heldout", "prose", i, [3], 4, 0.1, prompt_id=f"q{i}")
        )
        s.records.append(rep.RequestRecord("static", "B-heldout", "prose", i, [1], 2, 0.1, prompt_id=f"q{i}"))
    s.records.append(rep.RequestRecord("static", "B-heldout", "prose", 3, [0], 1, 0.1, prompt_id="only-S"))
    decisive = rep.paired_tau_ratio(s, "B-heldout")
    assert decisive == {
        "point": pytest.approx(2.0),
        "low": pytest.approx(2.0),
        "high": pytest.approx(2.0),
        "n": 3,
    }
    assert rep.verdict({"flywheel_vs_static_after_shift": decisive})["flywheel_beats_static_paired"] is True


def test_verdict_against_the_issue_targets():
    report = {
        "tau_after_shift_flywheel": 2.3,
        "tau_after_shift_static": 2.0,
        "reference_tau": 2.5,
        "recovery_requests": 2500,
        "speedup_champion": 1.31,
    }
    v = rep.verdict(report)
    assert v["flywheel_beats_static"] is True
    assert v["flywheel_vs_static_ratio"] == pytest.approx(1.15)
    assert v["flywheel_vs_static_target_met"] is True
    assert v["recovery_target_met"] is False and v["speedup_target_met"] is True
    assert rep.verdict(report | {"recovery_requests": 27})["recovery_target_met"] is True
    # never reached the bar in the demo: not met
    assert rep.verdict(report | {"recovery_requests": None})["recovery_target_met"] is False
    # S, never adapted, already at 90 % of the reference (2.25 >= 0.9 x 2.5): nothing to recover from
    assert rep.verdict(report | {"tau_after_shift_static": 2.25})["recovery_target_met"] is None
    # a reference barely above tau 1: any served tau clears its 90 %, so never judged
    assert (
        rep.verdict(report | {"reference_tau": 1.1, "tau_after_shift_static": 1.0})["recovery_target_met"]
        is None
    )
    assert rep.verdict(report | {"reference_tau": None})["recovery_target_met"] is None
    missing = rep.verdict({"tau_after_shift_flywheel": None, "tau_after_shift_static": 1.2})
    assert set(missing.values()) == {None}


def test_report_outputs(tmp_path):
    series = _series()
    report = rep.compute_figures(series, PROBES) | {
        "speedup_champion": 1.1,
        "speedup_champion_interval": {"point": 1.1, "low": 1.02, "high": 1.19, "n": 8},
        "flywheel_vs_static_speed": {"point": 1.05, "low": 0.97, "high": 1.14, "n": 8},
        "static_steps": 24,
        "flywheel_trained_steps": 24,
        "trace_bytes_per_token": 1.5,
        "hidden_state_bytes_per_token": 4608,
        "promotions": 1,
        "rejections": 0,
        "stage_seconds": {"stack up": 3.0},
        "heldout_tau_by_probe": rep.heldout_tau_by_probe(series, PROBES),
        "reference": {"steps": 24},
    }
    report["verdict"] = rep.verdict(report)
    rep.write_json(tmp_path / "report.json", report)
    assert set(rep.REPORT_KEYS) <= set(json.loads((tmp_path / "report.json").read_text()))
    rep.plot_tau(series, 2, [{"version": "1", "at_request": 2}], tmp_path / "tau.png")
    cycles = [
        {
            "phase": "B",
            "version": "2",
            "decision": "promote",
            "speedup": 1.1,
            "speedup_interval": {"point": 1.1, "low": 1.0, "high": 1.2, "n": 8},
            "champion_speedup": 0.9,
            "champion_speedup_interval": None,  # an older run's cycle: points without intervals still plot
        }
    ]
    rep.plot_speedups(cycles, tmp_path / "s.png")
    rep.plot_heldout_tau(report["heldout_tau_by_probe"], cycles, tmp_path / "h.png", report["reference_tau"])
    assert all((tmp_path / f).stat().st_size > 0 for f in ("tau.png", "s.png", "h.png"))
    context = {
        "mode": "quick",
        "target": "t",
        "k": 3,
        "finished_at": "now",
        "window": 1,
        "cycles": [{"run_id": "r", "phase": "A", "state": "success", "version": "1", "decision": "promote"}],
        "notes": ["a note"],
        "settings": {},
    }
    md = rep.render_markdown(report, context)
    assert "| promotions | 1 |" in md and "a note" in md and "n/a" in md
    assert "1.100 [1.020, 1.190] (95 %, n=8)" in md and "| 24 / 24 | equal |" in md
    assert "| B | prose | 1 | 4 | 2.000 | 1.333 |" in md  # held-out tau per cycle
    assert "| reference_tau (in-domain reference: the start head + 24 steps" in md
    assert "| 1.050 [0.970, 1.140] (95 %, n=8) | > 1 |" in md  # F ÷ S by served speed
    assert "Recovery target met: False" in md  # F's 2.0 < 0.9 x the reference's 3.0


def test_heldout_tau_per_probe_pairs_f_and_s_on_each_probe():
    probes = [{"probe": "A", "domain": "code", "cycles": 1}, {"probe": "B", "domain": "prose", "cycles": 3}]
    points = rep.heldout_tau_by_probe(_series(), probes)
    assert [(p["probe"], p["cycles"]) for p in points] == [("A", 1), ("B", 3)]
    assert points[0]["flywheel"] == pytest.approx(3.0) and points[0]["static"] == pytest.approx(4.0)
    assert points[1]["flywheel"] == pytest.approx(2.0) and points[1]["static"] == pytest.approx(4 / 3)
    paired = rep.compute_figures(_series(), PROBES)["flywheel_vs_static_after_shift"]
    assert points[1]["flywheel_vs_static"] == paired
    # a probe nobody served (a run that stopped before it) has no figures, not zeros
    missing = rep.heldout_tau_by_probe(_series(), [{"probe": "B1", "domain": "prose", "cycles": 1}])[0]
    assert missing["flywheel"] is None and missing["flywheel_vs_static"] is None


def test_stage_board_logs_plain_lines_without_a_terminal():
    import io

    from rich.console import Console

    from flywheel.demo.ui import StageBoard

    out = io.StringIO()
    board = StageBoard(Console(file=out, force_terminal=False, width=120))
    board.plain_every_s = 0.0
    with board.stage("phase A", total=2) as st:
        st.info("12/32 requests [x]")
        st.info("12/32 requests [x]")  # unchanged: not repeated
    with pytest.raises(RuntimeError), board.stage("cycle A1"):
        raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["▶ phase A", "  phase A: 12/32 requests [x]"]
    assert lines[2].startswith("✓ phase A in ") and lines[3] == "▶ cycle A1"
    assert lines[4].startswith("✗ cycle A1 after ") and set(board.seconds) == {"phase A", "cycle A1"}


def test_both_demos_start_from_the_day0_drafter_and_scratch_is_an_option():
    from flywheel.demo.plan import sized

    assert sized(True).start == "day0" and sized(False).start == "day0"
    # the reference trains as many steps as F's lineage has after its cycles
    assert sized(False).reference and sized(False).reference_steps == 240
    assert not sized(True).reference  # the quick demo does not measure recovery
    assert sized(False, start="day0").start == "day0" and sized(True, start="scratch").start == "scratch"
    with pytest.raises(ValueError, match="day0 or scratch"):
        sized(True, start="warm")


def test_the_notes_do_not_call_a_switched_off_flywheel_noise():
    from flywheel.demo.plan import sized

    report = {
        "verdict": {"flywheel_beats_static": False},
        "promotions": 0,
        "cycles": [{"phase": "B", "run_id": "r", "speculation_off": True, "gate": "NO DRAFTER"}],
        "recovery_requests": None,
        "tau_before_shift": 1.3,
        "speedup_champion": 0.9,
    }
    notes = " ".join(rep.explain(report, sized(True)))
    assert "F stopped speculating" in notes and "tau after the switch is 1.0 by construction" in notes
    assert "differ only by measurement noise" not in notes
    assert "in cycle B1 (run r)" in notes and "until a challenger clears the floor" in notes
    on = report | {"cycles": []}
    assert "differ only by measurement noise" in " ".join(rep.explain(on, sized(True)))
    # the full run of 2026-12-05: off after B1, back on when B2's challenger cleared the floor
    back = report | {
        "promotions": 1,
        "cycles": report["cycles"] + [{"phase": "B", "run_id": "r2", "decision": "promote", "version": "3"}],
    }
    notes = " ".join(rep.explain(back, sized(False)))
    assert "in cycle B1 (run r)" in notes and "until v3 cleared the floor" in notes
    # a promotion that itself switches speculation off does not end the no-drafter spell
    still_off = {"phase": "B", "run_id": "r2", "decision": "promote", "version": "3", "speculation_off": True}
    notes = " ".join(
        rep.explain(report | {"promotions": 1, "cycles": report["cycles"] + [still_off]}, sized(False))
    )
    assert "until a challenger clears the floor" in notes and "until v3" not in notes


def test_the_final_champion_is_read_from_the_last_post_shift_cycle_only_when_it_kept_it():
    def measured(point):
        return {"speedup": {"point": point, "low": point - 0.1, "high": point + 0.1, "n": 7}, "tau": 1.2}

    cycles = [{"phase": "A", "run_id": "a1"}, {"phase": "B", "run_id": "b1"}, {"phase": "B", "run_id": "b2"}]
    evaluations = {
        "a1": {
            "version": "2",
            "champion_version": "1",
            "challenger": measured(1.3),
            "champion": measured(0.9),
        },
        "b1": {
            "version": "3",
            "champion_version": "2",
            "challenger": measured(0.8),
            "champion": measured(1.1),
        },
        "b2": {
            "version": "4",
            "champion_version": "2",
            "challenger": measured(0.95),
            "champion": measured(1.05),
            "domains": ["prose"],
            "traffic": "lake",
            "rounds": 2,
            "requests_used": 28,
        },
    }
    kept = rep.measured_in_last_cycle(cycles, evaluations, "2", "B")
    assert kept["speedup"]["point"] == 1.05 and "cycle B2" in kept["source"]
    assert "the champion it kept" in kept["source"]
    # a promoted challenger's figure is the one that won its promotion: it gets a run of its own
    assert rep.measured_in_last_cycle(cycles, evaluations, "4", "B") is None
    # a version the last post-shift cycle did not run (v3, rejected in B1) needs its own run
    assert rep.measured_in_last_cycle(cycles, evaluations, "3", "B") is None
    assert rep.measured_in_last_cycle(cycles[:1], evaluations, "2", "B") is None
    assert rep.measured_in_last_cycle(cycles, {"b2": {}}, "2", "B") is None


@pytest.mark.parametrize(
    ("quick", "expected"),
    [
        # one segment before the shift, no cycle; after it one cycle, whose probe is the final one
        (True, ["A:48", "B:48", "cycle B1", "B:16", "probe B (1 cycles)"]),
        # the full run: a probe at the shift, one after B1, and the final one after B2 and the last segment
        (
            False,
            [
                "A:64",
                "probe B0 (0 cycles)",
                "B:96",
                "cycle B1",
                "probe B1 (1 cycles)",
                "B:64",
                "cycle B2",
                "B:32",
                "probe B (2 cycles)",
            ],
        ),
    ],
)
def test_the_phases_probe_held_out_tau_at_the_shift_and_after_each_cycle(quick, expected):
    from flywheel.demo.plan import sized
    from flywheel.demo.stages import Demo

    demo = object.__new__(Demo)  # the orchestration only: traffic, cycles and probes are recorded
    demo.plan, demo.cycles, demo.probes, calls = sized(quick), [], [], []
    demo._traffic = lambda phase, domain, n, servers, seed: calls.append(f"{phase}:{n}")

    def cycle(phase, n, start):
        calls.append(f"cycle {phase}{n}")
        demo.cycles.append({"phase": phase})

    def probe(label, domain):
        calls.append(f"probe {label} ({len(demo.cycles)} cycles)")

    demo._cycle, demo._probe = cycle, probe
    demo._phase("A", "code", demo.plan.segments_a, None)
    demo._phase("B", "prose", demo.plan.segments_b, None)
    demo._probe("B", "prose")  # run() probes the phase's end itself
    assert calls == expected


def test_probe_requests_opt_out_of_capture_and_phase_traffic_does_not(monkeypatch):
    """No drafter may train on the prompts it is judged on: the first full run's F captured the probe at
    the shift into the next cycle's window and trained on it."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    import producers.traffic as traffic
    from flywheel.demo.plan import sized
    from flywheel.demo.stages import Demo
    from flywheel.demo.ui import StageBoard

    sent = []

    async def replay(url, model, phases, **kwargs):
        sent.append((kwargs["subset"], kwargs.get("extra_xargs")))
        return SimpleNamespace(results=[])

    monkeypatch.setattr(traffic, "replay", replay)
    demo = object.__new__(Demo)
    demo.plan, demo.series = sized(False), rep.DemoSeries()
    demo.board = StageBoard(Console(file=io.StringIO(), force_terminal=False))
    demo.serving = SimpleNamespace(target_model="t")
    server = SimpleNamespace(url="http://f", weight_version=lambda: "1")
    demo.servers = {"flywheel": server, "static": server}
    demo._traffic("B", "prose", 4, ["flywheel", "static"], seed=1)
    demo._traffic("B0-heldout", "prose", 4, ["flywheel", "static"], seed=900, subset="heldout")
    assert sent[:2] == [("train", None)] * 2
    assert sent[2:] == [("heldout", {"flywheel_opt_out": "true"})] * 2


def test_speculation_off_is_what_the_last_deciding_cycle_left():
    off = {"phase": "B", "decision": "reject", "speculation_off": True}
    on = {"phase": "B", "decision": "promote", "speculation_off": False}
    kept = {"phase": "B", "decision": "reject", "speculation_off": False}
    assert rep._speculation_off_after([off]) and rep._speculation_off_after([off, kept])
    assert not rep._speculation_off_after([off, on]) and not rep._speculation_off_after([])
    assert rep._speculation_off_after([on, {"phase": "B", "decision": "promote", "speculation_off": True}])
