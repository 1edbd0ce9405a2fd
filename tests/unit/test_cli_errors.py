"""Errors a person can act on: each is one ``error:`` line on stderr naming what to fix, a non-zero exit and
no traceback, from the real `flywheel` command (a subprocess, as an operator runs it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "trainer" / "recipes" / "scratch.yaml"


def flywheel(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flywheel.cli", *args],
        cwd=REPO,
        env=os.environ | {"COLUMNS": "80"} | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def the_error(result: subprocess.CompletedProcess) -> str:
    """The one line on stderr, which must be an ``error:`` line; nothing else, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_ingest_against_an_unreachable_broker_says_so_in_one_line(tmp_path):
    env = {"FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "FLYWHEEL_LAKE_ROOT": str(tmp_path / "lake")}
    result = flywheel("ingest", "--no-progress", env=env, timeout_s=60)  # a hang fails here
    line = the_error(result)
    assert result.returncode == 1
    assert "Kafka at 127.0.0.1:1 is unreachable" in line and "Connection refused" in line
    assert "flywheel stack status" in line
    assert not (tmp_path / "lake").exists()  # nothing is created for a pipeline that cannot run


def test_ingest_with_its_metrics_port_taken_says_so(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {
            "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "FLYWHEEL_LAKE_ROOT": str(tmp_path / "lake"),
        }
        result = flywheel("ingest", "--no-progress", "--metrics-port", str(port), env=env)
    line = the_error(result)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line


def test_train_with_an_override_into_a_value_names_the_override():
    line = the_error(flywheel("train", "--recipe", str(RECIPE), "max_steps.x=1"))
    assert "'max_steps.x=1'" in line and "max_steps is a value" in line


def test_train_with_invalid_values_lists_every_field_on_one_line():
    result = flywheel("train", "--recipe", str(RECIPE), "max_steps=many", "optim.lrr=1")
    line = the_error(result)
    assert result.returncode == 2
    assert "max_steps: Input should be a valid integer" in line and "optim.lrr: Extra inputs" in line


def test_train_on_a_missing_table_names_the_table(tmp_path):
    lake = tmp_path / "lake"
    result = flywheel(
        "train",
        "--recipe",
        str(RECIPE),
        "max_steps=1",
        env={"FLYWHEEL_LAKE_ROOT": str(lake), "FLYWHEEL_TRAINING_OUTPUT_DIR": str(tmp_path / "out")},
    )
    line = the_error(result)
    assert result.returncode == 1
    assert f"no Delta table at {lake / 'traces'}" in line and "flywheel ingest" in line


def test_prepare_drafter_on_an_unknown_domain_lists_the_domains():
    line = the_error(flywheel("models", "prepare-drafter", "--domains", "docs,poetry"))
    assert "--domains takes some of code, prose, docs, not 'docs,poetry'" in line
