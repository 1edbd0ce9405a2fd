"""Pure parts of `flywheel serve` / `flywheel traffic` and of the hot-swap backend."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.process import StackError
from core.settings import ServingSettings, StackSettings
from producers.drafter_weights import IncompatibleDrafter, compatibility_problems, read_weights, tensor_shapes
from producers.traffic import Phase, parse_schedule, prompt_stream, spec_steps
from producers.vllm_server import UnsafeBind, VllmServer, check_bind, main, serve_args, speculative_config

DEV = {"VLLM_SERVER_DEV_MODE": "1"}


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


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_dev_mode_servers_bind_loopback(tmp_path, host):
    serving = ServingSettings(models_dir=tmp_path, host=host)
    args = serve_args(serving, "eagle3", tmp_path / "d", 3)
    check_bind(args, DEV)
    VllmServer(StackSettings(state_dir=tmp_path), serving, args, DEV).prepare()


def test_dev_mode_beyond_loopback_is_refused_even_with_an_api_key(tmp_path):
    """vLLM's API key guards /v1 (and /v2, /inference, /cohere), never the weight-update routes."""
    keyed = DEV | {"VLLM_API_KEY": "secret"}
    for host in ("0.0.0.0", "::", "10.1.2.3", "serving-node"):
        serving = ServingSettings(models_dir=tmp_path, host=host)
        args = serve_args(serving, "eagle3", tmp_path / "d", 3, ["--api-key", "secret"])
        with pytest.raises(UnsafeBind, match=f"VLLM_SERVER_DEV_MODE=1 to '{host}'.* no authentication"):
            check_bind(args, keyed)
        with pytest.raises(StackError, match=f"vllm: refusing to bind .* to '{host}'"):
            VllmServer(StackSettings(state_dir=tmp_path), serving, args, keyed).prepare()
    loopback = serve_args(ServingSettings(models_dir=tmp_path), "none", None, 3)
    for extra in (["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--hos", "0.0.0.0"]):  # the last one wins
        with pytest.raises(UnsafeBind, match="'0.0.0.0'"):
            check_bind(loopback + extra, DEV)
    with pytest.raises(UnsafeBind, match="every interface"):
        check_bind(["serve", "model"], DEV)
    with pytest.raises(UnsafeBind):  # a value vLLM cannot read counts as on
        check_bind(loopback + ["--host", "0.0.0.0"], {"VLLM_SERVER_DEV_MODE": "yes"})
    for env in ({}, {"VLLM_SERVER_DEV_MODE": "0"}):  # no dev-mode routes: the bind is the deployment's
        check_bind(loopback + ["--host", "0.0.0.0"], env)


def test_the_evaluation_servers_and_main_refuse_too(tmp_path, monkeypatch):
    from evaluation.served import EvalServers

    stack = StackSettings(state_dir=tmp_path)
    exposed = ServingSettings(models_dir=tmp_path, host="0.0.0.0")
    with pytest.raises(StackError, match="vllm-eval-8031: refusing"):
        EvalServers.server(stack, exposed, 8031, "none", None, 3).prepare()
    EvalServers.server(stack, ServingSettings(models_dir=tmp_path), 8031, "none", None, 3).prepare()

    def vllm_main():
        raise AssertionError("vLLM was started")

    monkeypatch.setitem(sys.modules, "vllm.entrypoints.cli.main", types.SimpleNamespace(main=vllm_main))
    monkeypatch.setattr(sys, "argv", ["producers.vllm_server", "serve", "model", "--host", "0.0.0.0"])
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    with pytest.raises(SystemExit, match="error: refusing to bind"):
        main()


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
