"""Benchmarks: each module has a ``run(...) -> dict``; ``flywheel bench <name> --json PATH`` prints and saves it.

Timings on 2 shared cores are noisy, so every benchmark reports ratios measured side by side in one run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def _git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def emit(name: str, result: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Attach provenance, print the JSON, and write it to ``path`` if given."""
    doc = {
        "benchmark": name,
        **result,
        "_meta": {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_sha": _git_sha(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "python": platform.python_version(),
        },
    }
    text = json.dumps(doc, indent=2, default=float)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return doc
