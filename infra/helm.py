"""helm, built from the Go module proxy into the cache dir once: the chart's lint and render need it.

``go install helm.sh/helm/v4/cmd/helm@<version>`` with GOBIN under ``<cache_dir>/helm-<version>/bin``, so
each version is built once and shared by every state dir (a few minutes on 2 cores; `flywheel stack
install` and `make setup` call it). Needs Go 1.26+ on PATH (helm v4.3.2's go.mod).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from core.process import StackError
from infra.stack.kafka_broker import require_tool

HELM_VERSION = "4.3.2"


def helm_path(cache_dir: Path, version: str = HELM_VERSION) -> Path:
    return cache_dir / f"helm-{version}" / "bin" / "helm"


def ensure_helm(cache_dir: Path, version: str = HELM_VERSION) -> Path:
    """The helm binary of ``version`` in the cache, built first if missing. Returns its path."""
    path = helm_path(cache_dir, version)
    if path.exists():
        return path
    go = require_tool("go", "Install Go 1.26+ (https://go.dev/dl/); helm is built from the Go module proxy.")
    env = os.environ | {"GOBIN": str(path.parent)}
    result = subprocess.run(
        ["nice", "-n", "10", go, "install", f"helm.sh/helm/v4/cmd/helm@v{version}"],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not path.exists():
        raise StackError(f"could not build helm v{version} with `go install`:\n{result.stderr[-2000:]}")
    return path
