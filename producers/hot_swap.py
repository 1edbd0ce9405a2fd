"""The drafter hot-swap protocol: one sequence, two transports.

vLLM's draft-weight update API swaps a running engine's drafter without a restart. The sequence is

    pause (in-flight requests kept) -> start_draft_weight_update -> update_weights(path, sha256)
    -> finish_weight_update(version: what later traces carry) -> resume (always, even after a failure)

and the ``flywheel_file`` weight-transfer backend (``producers.drafter_weights``) checks and loads the
weights inside each worker, keeping the old drafter if anything fails. Two transports drive it:
:class:`HttpSwap` through a dev-mode server's routes (served evaluation, the demo, tests) and
:class:`EngineSwap` in-process on the engine (the serving plugin's promotion listener).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Step = tuple[str, dict[str, Any]]
RESUME: Step = ("resume", {})


def swap_steps(path: str | Path, version: str, sha256: str | None = None) -> list[Step]:
    """The protocol's steps in order, up to (not including) the resume that always follows."""
    update_info = {"path": str(path)} | ({"sha256": sha256} if sha256 else {})
    return [
        ("pause", {"mode": "keep"}),
        ("start_draft_weight_update", {}),
        ("update_weights", {"update_info": update_info}),
        ("finish_weight_update", {"weight_version": str(version)}),
    ]


class HttpSwap:
    """The protocol over a dev-mode vLLM server's HTTP routes (``VLLM_SERVER_DEV_MODE=1``)."""

    def __init__(self, base_url: str, timeout_s: float = 600):
        import httpx

        self.client = httpx.Client(base_url=base_url, timeout=timeout_s)

    def call(self, step: str, args: dict[str, Any]) -> None:
        if step == "pause":
            response = self.client.post("/pause", params=args)
        else:
            response = self.client.post(f"/{step}", json=args or None)
        response.raise_for_status()

    def close(self) -> None:
        self.client.close()


class EngineSwap:
    """The protocol on an in-process engine (``AsyncLLM``), awaited on the engine's event loop."""

    def __init__(self, engine: Any):
        self.engine = engine

    async def call(self, step: str, args: dict[str, Any]) -> None:
        engine = self.engine
        if step == "pause":
            await engine.pause_generation(mode=args["mode"], clear_cache=False)
        elif step == "resume":
            await engine.resume_generation()
        elif step == "update_weights":
            from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

            await engine.update_weights(WeightTransferUpdateRequest(update_info=args["update_info"]))
        else:
            await getattr(engine, step)(**args)


def swap_drafter(transport: HttpSwap, path: str | Path, version: str, sha256: str | None = None) -> None:
    """Run the protocol over HTTP; raises if the swap failed (the server then still serves the old drafter)."""
    first, *rest = swap_steps(path, version, sha256)
    transport.call(*first)
    try:
        for step in rest:
            transport.call(*step)
    finally:
        transport.call(*RESUME)


async def swap_drafter_async(
    transport: EngineSwap, path: str | Path, version: str, sha256: str | None = None
) -> None:
    """Run the protocol in-process; the same steps as :func:`swap_drafter`, awaited."""
    first, *rest = swap_steps(path, version, sha256)
    await transport.call(*first)
    try:
        for step in rest:
            await transport.call(*step)
    finally:
        await transport.call(*RESUME)


def swap_server(base_url: str, path: str | Path, version: str, sha256: str | None = None) -> None:
    """Swap the drafter of the dev-mode server at ``base_url`` (HTTP transport, closed afterwards)."""
    transport = HttpSwap(base_url)
    try:
        swap_drafter(transport, path, version, sha256)
    finally:
        transport.close()
