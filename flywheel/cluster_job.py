"""A flywheel cycle's train or evaluate step as a Kubernetes pod runs it (FLYWHEEL_CLUSTER_TASKS=kubernetes).

The DAG (dags/flywheel_tasks.py) launches ``torchrun --nproc-per-node N -m flywheel.cluster_job train ...``
on the worker image (one process per GPU, NCCL between them; without GPUs one process on CPU, gloo) and
``python -m flywheel.cluster_job evaluate ...`` on the serving image, whose two vLLM servers then run in that
pod, not on the Airflow worker. The step is the same function the local task calls (flywheel/cycle.py); its
result goes to ``/airflow/xcom/return.json``, where the KubernetesPodOperator's sidecar reads it as the
task's XCom. Under torchrun every rank trains, rank 0 registers and writes the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

XCOM_FILE = Path("/airflow/xcom/return.json")  # the KubernetesPodOperator's XCom sidecar reads this file

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False)
WindowJson = Annotated[str, typer.Option("--window", help="the window task's XCom: a TraceWindow as JSON")]
CycleJson = Annotated[
    str,
    typer.Option("--cycle", help="the run's `cycle` param (CycleSettings overrides, allow-listed) as JSON"),
]
XcomPath = Annotated[
    Path, typer.Option("--xcom", help="where the result JSON goes (the operator's sidecar file)")
]


def _inputs(window: str, cycle: str):
    from consumers.windows import TraceWindow
    from core.run_params import cycle_settings
    from core.settings import Settings

    try:
        settings = Settings(cycle=cycle_settings({"cycle": json.loads(cycle or "{}")}))
        return settings, TraceWindow.model_validate_json(window)
    except ValueError as e:  # pydantic's ValidationError and json's errors are ValueErrors
        first = str(e).strip().splitlines()
        raise typer.BadParameter(" ".join(first[:3])) from None


def _write(result, xcom: Path) -> None:
    xcom.parent.mkdir(parents=True, exist_ok=True)
    xcom.write_text(result.model_dump_json())
    print(result.model_dump_json())


@app.command()
def train(window: WindowJson, cycle: CycleJson = "{}", xcom: XcomPath = XCOM_FILE) -> None:
    """Train the challenger on the window and register it (rank 0 registers and writes the result)."""
    from flywheel.cycle import train_challenger

    settings, w = _inputs(window, cycle)
    trained = train_challenger(settings, w)
    if int(os.environ.get("RANK", "0")) == 0:
        _write(trained, xcom)


@app.command()
def evaluate(
    version: Annotated[str, typer.Option("--version", help="the registered challenger version")],
    window: WindowJson,
    cycle: CycleJson = "{}",
    xcom: XcomPath = XCOM_FILE,
) -> None:
    """Paired served evaluation of the challenger (its vLLM servers start in this pod)."""
    from flywheel.cycle import evaluate_challenger

    settings, w = _inputs(window, cycle)
    _write(evaluate_challenger(settings, version, w), xcom)


if __name__ == "__main__":
    app()
