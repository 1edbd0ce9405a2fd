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


@pytest.mark.parametrize("command", ["evaluate", "promote", "rollback", "drafters"])
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
    evaluation = {
        "version": "3",
        "champion_version": "2",
        "domains": ["code", "prose"],
        "metrics": {
            **{
                f"speedup_c{c}_{a}": s
                for c in (1, 4)
                for a, s in (("baseline", 1.0), ("champion", 1.1), ("challenger", 1.2))
            },
            **{
                f"tokens_per_s_c{c}_{a}": 10.0 * c
                for c in (1, 4)
                for a in ("baseline", "champion", "challenger")
            },
            "tau_champion": 1.5,
            "tau_champion_code": 1.6,
            "tau_champion_prose": 1.4,
            "tau_challenger": 1.7,
            "tau_challenger_code": 1.8,
            "tau_challenger_prose": 1.6,
        },
    }
    table = served_table(evaluation, "t")
    assert table.row_count == 6  # 3 arms x 2 concurrency levels
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "v3" in text and "v2" in text and "1.200" in text and "1.800" in text
