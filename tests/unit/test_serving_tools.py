"""Pure parts of `flywheel serve` / `flywheel traffic` and of the hot-swap backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.settings import ServingSettings
from producers.drafter_weights import IncompatibleDrafter, compatibility_problems, read_weights, tensor_shapes
from producers.traffic import Phase, parse_schedule, prompt_stream, spec_steps
from producers.vllm_server import serve_args, speculative_config


def test_schedule_parsing():
    assert parse_schedule("code:300, prose:20") == [Phase("code", 300), Phase("prose", 20)]
    for bad in ("code", "code:0", "code:x", ""):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="valid: code, prose, docs"):
        parse_schedule("poetry:3")


def test_prompt_stream_is_deterministic_and_respects_the_split():
    a = [p.prompt_id for _, p in zip(range(50), prompt_stream("code", "heldout", seed=1), strict=False)]
    b = [p.prompt_id for _, p in zip(range(50), prompt_stream("code", "heldout", seed=1), strict=False)]
    train = {p.prompt_id for _, p in zip(range(300), prompt_stream("code", "train", seed=1), strict=False)}
    assert a == b and not set(a) & train


def test_spec_steps_from_a_vllm_response():
    body = {"metrics": {"speculative_decoding": {"per_step_accepted": [3, 0, 1]}}}
    assert spec_steps(body) == [3, 0, 1] and spec_steps({}) == [] and spec_steps({"metrics": None}) == []


def test_serve_args_carry_capture_and_hot_swap_flags(tmp_path):
    serving = ServingSettings(models_dir=tmp_path, port=8123)
    args = serve_args(serving, "eagle3", tmp_path / "d", 3, ["--enforce-eager"])
    assert args[:2] == ["serve", str(tmp_path / "SmolLM2-135M-Instruct")]
    spec = json.loads(args[args.index("--speculative-config") + 1])
    assert spec == {"method": "eagle3", "model": str(tmp_path / "d"), "num_speculative_tokens": 3}
    assert args[args.index("--per-request-spec-decode-metrics") + 1] == "detailed"
    assert json.loads(args[args.index("--weight-transfer-config") + 1]) == {"backend": "flywheel_file"}
    assert args[args.index("--port") + 1] == "8123" and args[-1] == "--enforce-eager"
    assert "--speculative-config" not in serve_args(serving, "none", None, 3)
    assert "--weight-transfer-config" not in serve_args(serving, "ngram", None, 3)
    for eager in (True, False):  # FLYWHEEL_SERVING_ENFORCE_EAGER
        args = serve_args(serving.model_copy(update={"enforce_eager": eager}), "none", None, 3)
        assert ("--enforce-eager" in args) == eager
    with pytest.raises(ValueError):
        speculative_config("eagle3", None, 3)


def _ckpt(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path / "model.safetensors"))
    return path


def test_incompatible_drafters_are_rejected_before_loading(tmp_path):
    served = _ckpt(tmp_path / "a", {"fc.weight": (4, 12), "norm.weight": (4,), "embed_tokens.weight": (9, 4)})
    same = _ckpt(tmp_path / "b", {"fc.weight": (4, 12), "norm.weight": (4,)})
    wider = _ckpt(tmp_path / "c", {"fc.weight": (4, 8), "norm.weight": (4,), "d2t": (3,)})
    assert tensor_shapes(served) == {
        "fc.weight": (4, 12),
        "norm.weight": (4,),
    }  # embeddings come from the target
    assert compatibility_problems(tensor_shapes(same), tensor_shapes(served)) == []
    assert compatibility_problems(tensor_shapes(wider), tensor_shapes(served)) == [
        "unexpected tensor d2t",
        "fc.weight: shape (4, 8) != served (4, 12)",
    ]
    with pytest.raises(IncompatibleDrafter, match="checksum mismatch"):
        read_weights(same, sha256="0" * 64)
    with pytest.raises(IncompatibleDrafter, match="no safetensors"):
        tensor_shapes(tmp_path / "missing")
