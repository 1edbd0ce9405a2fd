"""The packages form layers in the order data flows, and every import points down (or sideways within a
package). A lazy import inside a function counts as much as one at the top of a module.

    schemas              the contract: Avro schemas, codec, the derived Arrow schema
    core                 shared definitions: settings, prompts, processes, the target, tau, drafter artifacts
    infra                the embedded local stack and the topics
    producers            serve: the vLLM plugin, emitter, hot-swap, traffic
    consumers            ingest: Kafka -> Delta exactly once, retention, the lake readers
    trainer              train: windows, target features, the EAGLE-3 head, losses, the train loop
    evaluation           evaluate and gate: served measurement, the promotion decision
    promotion            the MLflow drafter registry and promotion events
    bench, flywheel      benchmarks; the app (CLI, demo, the flywheel cycle)
    dags                 Airflow DAG files: wiring only
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = [
    "schemas",
    "core",
    "infra",
    "producers",
    "consumers",
    "trainer",
    "evaluation",
    "promotion",
    "bench",
    "flywheel",
    "dags",
]
RANK = {name: i for i, name in enumerate(LAYERS)}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of a project package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in RANK]
    return found


def upward_imports(package: str, root: Path = REPO) -> list[str]:
    problems = []
    for path in sorted((root / package).rglob("*.py")):
        for line, imported in project_imports(path):
            if RANK[imported] > RANK[package]:
                problems.append(f"{path.relative_to(root)}:{line} imports {imported} (a higher layer)")
    return problems


@pytest.mark.parametrize("package", LAYERS)
def test_imports_only_point_down(package):
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a lazy import of the app inside a stage module is reported."""
    pkg = tmp_path / "trainer"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from flywheel.cli import app\n    return app\n")
    (pkg / "good.py").write_text("from core.settings import LakeSettings\nimport trainer.bad\n")
    assert upward_imports("trainer", tmp_path) == ["trainer/bad.py:2 imports flywheel (a higher layer)"]


def test_every_package_is_ranked():
    """A new top-level package must be placed in the layer order before it can be imported."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests"} <= set(RANK), packages - set(RANK)
