"""trainer.device_check, the GPU machine's check of the training path, run on CPU: the script itself works
and its checks can fail."""

import torch

from trainer import device_check as dc

SMALL = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    vocab_size=64,
    draft_vocab_size=64,
    target_hidden_size=32,
)
CPU = torch.device("cpu")


def test_parity_and_autocast_pass_on_cpu():
    parity = dc.check_parity(CPU, SMALL)
    assert parity["ok"] and parity["max_rel"] < dc.PARITY_RTOL, parity
    autocast = dc.check_autocast(CPU, SMALL)
    assert autocast["ok"] and autocast["finite"], autocast


def test_parity_sees_a_kernel_that_computes_something_else():
    ref_head = dc.head(SMALL)
    b = dc.packed_batch(ref_head.config, [9, 4], seed=1, steps=2)
    ref = dc.step_outputs(ref_head, b, 2)
    other = dc.head(SMALL)
    other.layers[0].self_attn.o_proj.weight.data.mul_(1.001)  # a 0.1 % difference in one matrix
    err = dc.rel_errors(dc.step_outputs(other, b, 2), ref)
    assert max(err.values()) > dc.PARITY_RTOL


def test_ddp_replicas_stay_identical_over_gloo():
    result = dc.check_ddp("cpu", 2, SMALL)
    assert result == {"check": "ddp", "ok": True, "world": 2, "backend": "gloo", "replicas_identical": True}


def test_cuda_requested_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():  # on a GPU machine the check runs for real instead
        assert dc.main(["--device", "cuda", "--world", "1"]) == 0
        return
    assert dc.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
