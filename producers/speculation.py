"""Speculation off and on again in a running engine: how the gate's "no drafter" decision is applied.

When every drafter the gate measured serves slower than no speculation, the registry publishes a
DrafterPromotion with ``action="disable"``; each serving node then stops speculating without a restart and
starts again on the next promote or rollback event.

The switch is vLLM's own dynamic speculative decoding: its scheduler looks up how many draft tokens to
schedule for the running batch size in ``dynamic_sd_lookup`` (``num_speculative_tokens_per_batch_size``),
and K=0 is a value the scheduler, the model runner and the EAGLE proposer all handle (the proposer still
runs its cheap first pass so that the drafter's KV cache stays in sync, then drafts nothing, and nothing is
verified). Switching off replaces that lookup with zeros for every batch size; switching on restores what
the engine started with. The scheduler lives in the engine-core process, so the switch is an engine-core
utility method that the plugin adds there (plugins load in every vLLM process) and the frontend calls
through ``engine_core.call_utility_async``; it runs between two engine steps.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("flywheel.speculation")
UTILITY = "flywheel_set_speculation"
_SAVED = "_flywheel_sd_lookup"


def set_speculation(scheduler: Any, enabled: bool) -> int:
    """Switch a vLLM scheduler's speculation; returns the draft tokens it now schedules per step (0: off)."""
    k = int(getattr(scheduler, "num_spec_tokens", 0) or 0)
    if k == 0:
        return 0  # the engine was started without speculation: nothing to switch
    if not hasattr(scheduler, _SAVED):
        setattr(scheduler, _SAVED, scheduler.dynamic_sd_lookup)
    if enabled:
        scheduler.dynamic_sd_lookup = getattr(scheduler, _SAVED)
        return k
    scheduler.dynamic_sd_lookup = [0] * (scheduler.scheduler_config.max_num_seqs + 1)
    return 0


def _utility(self: Any, enabled: bool) -> int:
    k = set_speculation(self.scheduler, bool(enabled))
    log.warning("speculative decoding %s (%d draft tokens per step)", "ON" if k else "OFF", k)
    return k


def install_engine_core_utility() -> None:
    """Give vLLM's EngineCore the ``flywheel_set_speculation(enabled)`` utility method (idempotent)."""
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, UTILITY):
        setattr(EngineCore, UTILITY, _utility)


async def switch_engine(engine: Any, enabled: bool) -> int:
    """Switch speculation of an in-process ``AsyncLLM`` (every engine core it drives)."""
    return await engine.engine_core.call_utility_async(UTILITY, enabled)
