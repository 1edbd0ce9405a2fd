"""Check the trainer's accelerator path on the machine it runs on: ``python -m trainer.device_check``.

The suite runs on CPU; this is the check a GPU machine runs before a cluster trains on it. Three checks,
one JSON line each on stdout, exit status 1 when any fails:

- ``parity``: the EAGLE-3 head's TTT unroll on the device (the dense attention path: the fused flash
  kernel is CPU-only) against the CPU flash kernel, same weights and packed batch — logits and every
  parameter gradient in fp32 (TF32 off), relative error per tensor;
- ``autocast``: the same step under bf16 autocast on the device (what ``precision: bf16`` recipes run):
  finite, and within bf16 rounding of fp32;
- ``ddp``: ``world`` processes (spawned here, the environment torchrun would give them) take the backend
  and device of ``trainer.train_loop.device_plan`` (NCCL + one GPU per LOCAL_RANK on CUDA, gloo on CPU),
  wrap the head in DistributedDataParallel, train 3 steps on different batches per rank, and compare the
  sha256 of every replica's weights: DDP replicas must stay bit-identical.

``--device cpu`` runs the same checks on CPU (the suite does, so the script itself is tested); on a GPU
machine run it with the defaults. The whole training path on the GPU is then
``torchrun --nproc-per-node N -m trainer.train_loop RECIPE.yaml device=cuda``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
from dataclasses import dataclass

import torch

from trainer.devices import device_plan, weights_digest
from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter

# SmolLM2-135M's head shape (hidden 576, 9/3 heads of 64), a smaller vocabulary: big enough for the kernels
# the GPU picks to be the ones training uses, small enough to run in seconds.
HEAD = dict(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=4096,
    draft_vocab_size=4096,
    target_hidden_size=576,
)
PARITY_RTOL = 1e-4  # fp32 on two devices: reduction order differs, nothing else may
BF16_RTOL = 0.05


@dataclass(frozen=True)
class Batch:
    embeds: torch.Tensor
    aux: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.embeds, self.aux, self.pos, self.seg, self.labels)))


def packed_batch(config: Eagle3Config, lens: list[int], seed: int, steps: int) -> Batch:
    """One row of packed sequences of ``lens`` tokens: random target features, per-sequence positions."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    embeds = torch.randn(1, T, config.hidden_size, generator=g)
    aux = torch.randn(1, T, 3 * config.target_hidden_size, generator=g)
    labels = torch.randint(0, config.draft_vocab_size, (steps, 1, T), generator=g)
    return Batch(embeds, aux, pos, seg, labels)


def head(shape: dict = HEAD, seed: int = 0) -> Eagle3Drafter:
    torch.manual_seed(seed)
    drafter = Eagle3Drafter(Eagle3Config(**shape))
    for p in drafter.parameters():  # non-trivial norms and peaked attention, as after training
        p.data.normal_(0, 0.05)
    return drafter


def loss_of(drafter: torch.nn.Module, b: Batch, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits = drafter(b.embeds, b.aux, b.pos, b.seg, steps)
    loss = sum(
        torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), y.flatten())
        for lg, y in zip(logits, b.labels, strict=True)
    )
    return loss, logits


def step_outputs(drafter: Eagle3Drafter, b: Batch, steps: int, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Logits and parameter gradients of one forward + backward, on CPU for comparison."""
    drafter.zero_grad()
    device = next(drafter.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, logits = loss_of(drafter, b, steps)
    loss.backward()
    out = {f"logits[{i}]": lg.detach().float().cpu() for i, lg in enumerate(logits)}
    return out | {f"grad.{k}": p.grad.float().cpu() for k, p in drafter.named_parameters()}


def rel_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((got[k] - r).abs().max() / r.abs().max().clamp_min(1e-12)) for k, r in ref.items()}


def check_parity(device: torch.device, shape: dict = HEAD, steps: int = 3) -> dict:
    """The device's dense unroll against the CPU flash kernel: same function, fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ref_head = head(shape)
    b = packed_batch(ref_head.config, [96, 17, 1, 140], seed=1, steps=steps)
    ref = step_outputs(ref_head, b, steps)  # CPU, flash kernel per packed sequence
    dev_head = copy.deepcopy(ref_head).to(device)
    if device.type == "cpu":
        dev_head.attention = "dense"  # on CPU compare against the other kernel, as the GPU path does
    err = rel_errors(step_outputs(dev_head, b.to(device), steps), ref)
    worst = max(err, key=err.get)
    return {"check": "parity", "ok": err[worst] <= PARITY_RTOL, "max_rel": err[worst], "worst": worst}


def check_autocast(device: torch.device, shape: dict = HEAD, steps: int = 3) -> dict:
    """bf16 autocast on the device: finite, and within bf16 rounding of the fp32 step."""
    h = head(shape).to(device)
    b = packed_batch(h.config, [96, 17, 1, 140], seed=2, steps=steps).to(device)
    fp32 = step_outputs(h, b, steps)
    bf16 = step_outputs(h, b, steps, bf16=True)
    finite = all(bool(t.isfinite().all()) for t in bf16.values())
    err = rel_errors(bf16, fp32)
    worst = max(err, key=err.get)
    return {
        "check": "autocast",
        "ok": finite and err[worst] <= BF16_RTOL,
        "finite": finite,
        "max_rel": err[worst],
        "worst": worst,
    }


def _ddp_worker(rank: int, world: int, device: str, shape: dict, port: int, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    plan = device_plan(device, rank)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    torch.distributed.init_process_group(plan.backend)
    try:
        drafter = head(shape).to(plan.device)
        ids = [plan.device.index] if plan.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(drafter, device_ids=ids, broadcast_buffers=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):  # each rank its own batch: the gradients must be all-reduced to agree
            b = packed_batch(drafter.config, [64, 33], seed=100 * step + rank, steps=2).to(plan.device)
            opt.zero_grad()
            loss_of(model, b, 2)[0].backward()
            opt.step()
        digests: list = [None] * world
        torch.distributed.all_gather_object(digests, weights_digest(drafter))
        if rank == 0:
            queue.put({"backend": plan.backend, "device": str(plan.device), "digests": digests})
    finally:
        torch.distributed.destroy_process_group()


def check_ddp(device: str, world: int, shape: dict = HEAD) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker, args=(world, device, shape, port, queue), nprocs=world, start_method="spawn"
    )
    got = queue.get()
    same = len(set(got["digests"])) == 1
    return {"check": "ddp", "ok": same, "world": world, "backend": got["backend"], "replicas_identical": same}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.device_check",
        description=__doc__.split("\n\n")[0] + " Prints one JSON line per check; exit 1 when one fails.",
    )
    p.add_argument("--device", default="cuda", help="cuda (default: the GPUs of this machine) or cpu")
    p.add_argument(
        "--world", type=int, default=None, help="DDP processes (default: every visible GPU; 2 on CPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = device_plan(args.device)
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA device visible to torch (run with --device cpu to check the CPU path)",
            file=sys.stderr,
        )
        return 2
    world = args.world or (torch.cuda.device_count() if plan.device.type == "cuda" else 2)
    results = [check_parity(plan.device), check_autocast(plan.device), check_ddp(args.device, world)]
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
