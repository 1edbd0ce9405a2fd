"""`flywheel evaluate|promote|rollback|drafters`: documented, fast to start, and the served table reads the
evaluation's flat metrics (the live commands run against the real stack in test_flywheel_dag.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.evaluate_cli import served_table


@pytest.mark.parametrize("command", ["evaluate", "promote", "rollback", "speculation", "drafters"])
def test_commands_have_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_start_stays_light():
    code = (
        "import sys; from flywheel.cli import app\n"
        "print([m for m in ('torch', 'vllm', 'mlflow', 'deltalake', 'airflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_served_table_rows():
    def iv(point, low, high):
        return {"point": point, "low": low, "high": high, "n": 24}

    evaluation = {
        "version": "3",
        "champion_version": "2",
        "domains": ["code", "prose"],
        "traffic": "lake",
        "rounds": 2,
        "requests_used": 144,
        "metrics": {
            "tokens_per_s_baseline": 10.0,
            "tokens_per_s_champion": 11.0,
            "tokens_per_s_challenger": 12.0,
        },
        "champion": {
            "speedup": iv(1.1, 1.05, 1.15),
            "tau": 1.5,
            "tau_by_domain": {"code": 1.6, "prose": 1.4},
        },
        "challenger": {
            "speedup": iv(1.2, 1.12, 1.28),
            "vs_champion": iv(1.09, 1.04, 1.14),
            "tau": 1.7,
            "tau_by_domain": {"code": 1.8, "prose": None},
            "samples": 24,
        },
    }
    table = served_table(evaluation, "t")
    assert table.row_count == 2  # champion and challenger
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "v3" in text and "v2" in text and "1.200 [1.120, 1.280]" in text and "1.090 [1.040, 1.140]" in text
    assert "1.800" in text and "24 paired prompts (lake held-out traffic)" in text
