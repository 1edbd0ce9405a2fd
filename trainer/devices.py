"""Where a training rank runs and how ranks agree: the device plan (CUDA + NCCL or CPU + gloo) and the
weights digest DDP replicas are compared by. Torch only, so a spawned rank (``trainer.device_check``) or a
pod's entry imports it without the trainer's data stack."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device  # where this rank's drafter and batches live
    backend: str  # torch.distributed backend between ranks

    @property
    def autocast(self) -> str:
        """``torch.autocast`` device type."""
        return self.device.type


def device_plan(device: str, local_rank: int = 0) -> DevicePlan:
    """Where a rank trains: on CUDA the GPU of its LOCAL_RANK (an explicit ``cuda:N`` is kept) with NCCL
    between ranks; on CPU gloo. ``auto`` is CUDA when torch sees a GPU, else CPU: one image and one recipe
    train in a GPU pod and on a CPU-only worker."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda":
        return DevicePlan(torch.device("cuda", local_rank if d.index is None else d.index), "nccl")
    if d.type == "cpu":
        return DevicePlan(torch.device("cpu"), "gloo")
    raise ValueError(f"unsupported training device {device!r}: auto, cpu or cuda[:N]")


def weights_digest(model: torch.nn.Module) -> str:

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
