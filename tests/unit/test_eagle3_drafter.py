"""The EAGLE-3 head: TTT unroll == step-by-step chain drafting with a KV cache, vLLM export format,
save -> load round trip, draft vocabulary mapping, replay chain walking."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter, doc_mask, doc_spans, rope
from trainer.replay_eval import chain_accepts
from trainer.train_loop import top_token_ids
from trainer.unroll_batch import shifted, target_index

TINY = dict(
    hidden_size=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    intermediate_size=24,
    vocab_size=40,
    draft_vocab_size=40,
    target_hidden_size=16,
)


def _smol_config(draft_vocab_size=None) -> Eagle3Config:
    target = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    return Eagle3Config.from_target(target, draft_vocab_size)


def _chain_reference(d: Eagle3Drafter, embeds, aux, root: int, steps: int) -> list[torch.Tensor]:
    """What vLLM computes for a chain rooted at ``root``: step 0 over slots 0..root (causal), then one
    query per step at position root+i attending to that cache plus the chain's own keys."""
    c, layer = d.config, d.layers[0]
    attn = layer.self_attn
    rep = c.num_attention_heads // c.num_key_value_heads
    h = d.fc(aux[: root + 1])  # (root+1, H)
    keys, values, outs = None, None, []
    for i in range(steps):
        if i == 0:
            tok, hid, pos = embeds[1 : root + 2], h, torch.arange(root + 1)
        else:
            tok, hid, pos = embeds[root + 1 + i][None], h[-1:], torch.tensor([root + i])
        x = torch.cat([layer.input_layernorm(tok), layer.hidden_norm(hid)], -1)  # (n, 2H)
        q = rope(
            attn.q_proj(x).view(-1, c.num_attention_heads, c.head_dim).transpose(0, 1)[None],
            pos[None],
            c.rope_theta,
        )[0]
        k = rope(
            attn.k_proj(x).view(-1, c.num_key_value_heads, c.head_dim).transpose(0, 1)[None],
            pos[None],
            c.rope_theta,
        )[0]
        v = attn.v_proj(x).view(-1, c.num_key_value_heads, c.head_dim).transpose(0, 1)
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        keys = k if keys is None else torch.cat([keys, k], 1)
        values = v if values is None else torch.cat([values, v], 1)
        n = q.shape[1]
        causal = torch.ones(n, keys.shape[1], dtype=torch.bool).tril(keys.shape[1] - n)
        s = (q @ keys.transpose(-1, -2) / math.sqrt(c.head_dim)).masked_fill(~causal, float("-inf"))
        o = attn.o_proj((s.softmax(-1) @ values).transpose(0, 1).reshape(n, -1))
        r = hid + o
        out = r + layer.mlp(layer.post_attention_layernorm(r))
        outs.append(d.lm_head(d.norm(out[-1])))
        h = out
    return outs


@pytest.mark.parametrize("attention", ["sdpa", "dense"])
def test_ttt_unroll_equals_chain_drafting_with_a_kv_cache(attention):
    torch.manual_seed(0)
    d = Eagle3Drafter(Eagle3Config(**TINY), attention=attention).eval()
    for p in d.parameters():  # non-trivial norms too
        p.data.normal_(0, 0.3)
    T, S = 9, 3
    embeds, aux = torch.randn(T, 16), torch.randn(T, 48)
    with torch.no_grad():
        ttt = d(embeds[None], aux[None], torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long), S)
        for root in (0, 3, 5):
            ref = _chain_reference(d, embeds, aux, root, S)
            for i in range(S):
                torch.testing.assert_close(ttt[i][0, root], ref[i], rtol=1e-4, atol=1e-5)


def test_packed_sequences_do_not_see_each_other():
    torch.manual_seed(0)
    d = Eagle3Drafter(Eagle3Config(**TINY)).eval()
    a_emb, a_aux, b_emb, b_aux = (
        torch.randn(5, 16),
        torch.randn(5, 48),
        torch.randn(7, 16),
        torch.randn(7, 48),
    )
    with torch.no_grad():
        alone = d(b_emb[None], b_aux[None], torch.arange(7)[None], torch.zeros(1, 7, dtype=torch.long), 2)
        packed = d(
            torch.cat([a_emb, b_emb])[None],
            torch.cat([a_aux, b_aux])[None],
            torch.cat([torch.arange(5), torch.arange(7)])[None],
            torch.tensor([[0] * 5 + [1] * 7]),
            2,
        )
    for i in range(2):  # the last i+1 slots of b read past its end (junk, masked in training)
        torch.testing.assert_close(
            packed[i][0, 5 : 12 - 1 - i], alone[i][0, : 7 - 1 - i], rtol=1e-4, atol=1e-5
        )


def test_rope_matches_hf_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, pos, d, theta = torch.randn(1, 2, 5, 8), torch.arange(5)[None], 8, 100000.0
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[0].float()[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    ref, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(rope(x, pos, theta), ref)


def test_export_format_is_what_vllm_loads(tmp_path):
    d = Eagle3Drafter(_smol_config(draft_vocab_size=8192))
    d.set_vocab(torch.arange(0, 49152, 6)[:8192])
    d.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 49152 and cfg["draft_vocab_size"] == 8192 and cfg["target_hidden_size"] == 576
    assert cfg["eagle_config"] == {
        "eagle_aux_hidden_state_layer_ids": [2, 15, 27],
        "use_aux_hidden_state": True,
    }
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "model.safetensors").items()}
    assert shapes == {
        "fc.weight": (576, 1728),
        "layers.0.self_attn.q_proj.weight": (576, 1152),
        "layers.0.self_attn.k_proj.weight": (192, 1152),
        "layers.0.self_attn.v_proj.weight": (192, 1152),
        "layers.0.self_attn.o_proj.weight": (576, 576),
        "layers.0.mlp.gate_proj.weight": (1536, 576),
        "layers.0.mlp.up_proj.weight": (1536, 576),
        "layers.0.mlp.down_proj.weight": (576, 1536),
        "layers.0.input_layernorm.weight": (576,),
        "layers.0.hidden_norm.weight": (576,),
        "layers.0.post_attention_layernorm.weight": (576,),
        "norm.weight": (576,),
        "lm_head.weight": (8192, 576),
        "d2t": (8192,),
        "t2d": (49152,),
    }
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    # d2t holds offsets: target id = draft id + d2t[draft id]
    assert (torch.arange(8192) + tensors["d2t"]).tolist() == torch.arange(0, 49152, 6)[:8192].tolist()
    assert int(tensors["t2d"].sum()) == 8192


def test_full_vocab_export_has_no_mapping(tmp_path):
    Eagle3Drafter(_smol_config()).save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "d2t" not in keys and "t2d" not in keys and not any("embed_tokens" in k for k in keys)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    d = Eagle3Drafter(_smol_config(draft_vocab_size=1000))
    d.set_vocab(top_token_ids(torch.randint(0, 100, (49152,)), 1000))
    d.save_pretrained(tmp_path, dtype=torch.float32)
    back = Eagle3Drafter.from_pretrained(tmp_path)
    assert back.config == d.config
    for (k, v), (k2, v2) in zip(d.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    d.save_pretrained(tmp_path / "bf16")  # the default export dtype is the target's (bf16)
    half = Eagle3Drafter.from_pretrained(tmp_path / "bf16")
    torch.testing.assert_close(half.fc.weight, d.fc.weight.to(torch.bfloat16).float())
    assert torch.equal(half.d2t, d.d2t)


def test_top_token_ids_and_target_index():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    ids = top_token_ids(counts, 3)  # 9 (id 2), 9 (id 3), 7 (id 5); ties -> lower id
    assert ids.tolist() == [2, 3, 5]
    assert target_index(ids, 6).tolist() == [-1, -1, 0, 1, -1, 2]


def test_shifted_view_aligns_steps():
    x = torch.arange(5.0)[:, None].repeat(1, 2)  # rows 0..4
    v = shifted(x, 3)  # [i, t] = x[t + 1 + i], zero past the end
    assert v.shape == (3, 5, 2)
    assert v[:, :, 0].tolist() == [[1, 2, 3, 4, 0], [2, 3, 4, 0, 0], [3, 4, 0, 0, 0]]


def test_chain_accepts_walks_like_greedy_verification():
    # prompt_len 2, T = 9 tokens; greedy g_t predicts x_{t+1}. Root t=1 first.
    greedy = torch.tensor([0, 10, 11, 12, 13, 14, 15, 16, 17])
    K = 3
    prop = torch.full((K, 9), -1)
    # root 1: drafts for x3,x4,x5 must equal g2,g3,g4 = 11,12,13 -> 2 accepted (third wrong)
    prop[:, 1] = torch.tensor([11, 12, 99])
    # next root = 1 + 2 + 1 = 4: drafts x6,x7,x8 vs g5,g6,g7 = 14,15,16 -> all 3
    prop[:, 4] = torch.tensor([14, 15, 16])
    # next root = 8: t+2 = 10 > T-1 = 8 -> stop
    assert chain_accepts(prop, greedy, prompt_len=2) == [2, 3]
    # the end of the sequence caps a chain: root 6 can only verify x8
    prop2 = torch.full((K, 9), -1)
    prop2[:, 1] = torch.tensor([11, 12, 13])
    prop2[:, 5] = torch.tensor([15, 16, 17])
    assert chain_accepts(prop2, greedy, prompt_len=2) == [3, 2]


def test_attention_scores_ignore_future_slots():
    # sanity of the mask: a change to slot 6's inputs leaves the step-0/1 outputs of slots < 6 untouched
    torch.manual_seed(1)
    d = Eagle3Drafter(Eagle3Config(**TINY)).eval()
    emb, aux = torch.randn(1, 8, 16), torch.randn(1, 8, 48)
    pos, seg = torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad():
        a = d(emb, aux, pos, seg, 2)
        aux2 = aux.clone()
        aux2[0, 6] += 1.0
        b = d(emb, aux2, pos, seg, 2)
    for i in range(2):
        torch.testing.assert_close(a[i][0, :6], b[i][0, :6])
    assert not torch.allclose(F.softmax(a[0][0, 6], -1), F.softmax(b[0][0, 6], -1))


def _packed_inputs(lens: list[int], batch: int = 2, hidden: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].repeat(batch, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None].repeat(batch, 1)
    return (
        torch.randn(batch, T, hidden, generator=g),
        torch.randn(batch, T, 3 * hidden, generator=g),
        pos,
        seg,
    )


def _logits_and_grads(d: Eagle3Drafter, inputs, steps: int, bf16: bool = False):
    d.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = d(*inputs, steps)
    w = torch.linspace(-1, 1, logits[0].shape[-1])
    sum((lg.float() * w).sin().sum() * (0.7**i) for i, lg in enumerate(logits)).backward()
    return [lg.detach().float() for lg in logits], {k: p.grad.clone() for k, p in d.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("lens", [[5, 17, 1, 40, 9], [64], [1, 2, 3]])
def test_sdpa_attention_equals_dense_outputs_and_gradients(lens):
    """The fast kernel (flash per packed sequence + log-sum-exp merge of the unroll's diagonal keys) is the
    dense reference's function: logits and every parameter gradient, fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    dense = Eagle3Drafter(Eagle3Config(**TINY), attention="dense")
    for p in dense.parameters():  # non-trivial norms, peaked attention
        p.data.normal_(0, 0.3)
    fast = copy.deepcopy(dense)
    fast.attention = "sdpa"
    inputs = _packed_inputs(lens)
    ref_logits, ref_grads = _logits_and_grads(dense, inputs, 3)
    logits, grads = _logits_and_grads(fast, inputs, 3)
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, g in ref_grads.items():
        assert _rel(grads[k], g) < 1e-5, k
    # bf16 autocast: both kernels round differently; the fast one is no further from fp32 than dense is
    dense_bf, dense_bf_grads = _logits_and_grads(dense, inputs, 3, bf16=True)
    fast_bf, fast_bf_grads = _logits_and_grads(fast, inputs, 3, bf16=True)
    for a, b, r in zip(fast_bf, dense_bf, ref_logits, strict=True):
        assert _rel(a, b) < 0.03 and _rel(a, r) < 2 * _rel(b, r) + 0.01
    for k, g in ref_grads.items():
        assert _rel(fast_bf_grads[k], dense_bf_grads[k]) < 0.05, k
        assert _rel(fast_bf_grads[k], g) < 2 * _rel(dense_bf_grads[k], g) + 0.01, k


def test_doc_spans_and_non_contiguous_sequence_ids_fall_back_to_dense():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 4, 4, 4, 4, 4]])
    assert doc_spans(seg) == [(0, 0, 2), (0, 2, 5), (0, 5, 6), (1, 0, 1), (1, 1, 6)]
    split = torch.tensor([[0, 0, 1, 1, 0, 0]])  # sequence 0 in two runs: only the dense mask says that
    assert doc_spans(split) is None
    torch.manual_seed(0)
    dense = Eagle3Drafter(Eagle3Config(**TINY), attention="dense").eval()
    fast = copy.deepcopy(dense)
    fast.attention = "sdpa"
    emb, aux, pos = torch.randn(1, 6, 16), torch.randn(1, 6, 48), torch.arange(6)[None]
    with torch.no_grad():
        for a, b in zip(fast(emb, aux, pos, split, 2), dense(emb, aux, pos, split, 2), strict=True):
            torch.testing.assert_close(a, b)
    assert doc_mask(split)[0, 0, 5].tolist() == [True, True, False, False, True, True]


def test_attention_kernel_is_not_in_the_checkpoint(tmp_path):
    with pytest.raises(ValueError):
        Eagle3Drafter(Eagle3Config(**TINY), attention="flex")
    d = Eagle3Drafter(Eagle3Config(**TINY), attention="dense")
    d.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == Eagle3Config(**TINY).to_vllm_config() and "dense" not in json.dumps(cfg)
    assert Eagle3Drafter.from_pretrained(tmp_path).attention == "sdpa"
    assert Eagle3Drafter.from_pretrained(tmp_path, attention="dense").attention == "dense"


def test_bench_kernel_timing_helpers():
    from bench.train import head_step, interleaved_medians

    d = Eagle3Drafter(Eagle3Config(**TINY))
    inputs = _packed_inputs([3, 6], batch=1)

    def step(kernel):
        def fn():
            d.attention = kernel
            head_step(d, inputs, 3)

        return fn

    med = interleaved_medians({"sdpa": step("sdpa"), "dense": step("dense")}, repeats=2)
    assert set(med) == {"sdpa", "dense"} and all(v > 0 for v in med.values())
    assert d.fc.weight.grad is not None


def _prompt_output_active(lens: list[int], prompts: list[int], steps: int, batch: int = 2) -> torch.Tensor:
    """(S, B, T) the trainer's mask (``unroll_mask``, train_on_prompt=False) for packed sequences."""
    pos = torch.cat([torch.arange(n) for n in lens])
    length = torch.cat([torch.full((n,), n) for n in lens])
    prompt = torch.cat([torch.full((n,), p) for n, p in zip(lens, prompts, strict=True)])
    pred = pos[None] + 2 + torch.arange(steps)[:, None]
    return ((pred < length) & (pred >= prompt))[:, None].repeat(1, batch, 1)


@pytest.mark.parametrize(
    "lens,prompts,holes",
    [
        ([5, 17, 1, 40, 9], [2, 8, 1, 20, 9], False),  # last sequence: all prompt (no loss anywhere)
        ([64], [40], False),
        ([30, 34], [0, 33], False),
        ([12, 20, 16], [3, 10, 4], True),  # arbitrary active sets: gaps inside sequences, rows differ
    ],
)
def test_active_skip_equals_dense_on_the_active_logits_and_gradients(lens, prompts, holes):
    """fast + ``active`` (LM head on active entries only, steps >= 1 on slots active then or later) is the
    dense reference without ``active``: logits at active entries, zeros elsewhere, and every parameter
    gradient of a loss over the active entries; fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    S = 3
    dense = Eagle3Drafter(Eagle3Config(**TINY), attention="dense")
    for p in dense.parameters():
        p.data.normal_(0, 0.3)
    fast = copy.deepcopy(dense)
    fast.attention = "sdpa"
    inputs = _packed_inputs(lens)
    active = _prompt_output_active(lens, prompts, S)
    if holes:
        g = torch.Generator().manual_seed(1)
        active = active & (torch.rand(active.shape, generator=g) < 0.6)
        active[:, 1, :5] = True
    assert 0 < active.sum() < active.numel()

    def run(d, act, bf16=False):
        d.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = d(*inputs, S, active=act)
        w = torch.linspace(-1, 1, logits[0].shape[-1])
        loss = sum(
            torch.where(active[i, ..., None], (lg.float() * w).sin(), 0).sum() * 0.7**i
            for i, lg in enumerate(logits)
        )
        loss.backward()
        return [lg.detach().float() for lg in logits], {k: p.grad.clone() for k, p in d.named_parameters()}

    ref_logits, ref_grads = run(dense, None)
    for d in (fast, dense):  # dense with active: the reference computed everywhere, zeros outside
        logits, grads = run(d, active)
        for i, (a, b) in enumerate(zip(logits, ref_logits, strict=True)):
            torch.testing.assert_close(a[active[i]], b[active[i]], rtol=1e-5, atol=1e-5)
            assert not a[~active[i]].any()
        for k, g in ref_grads.items():
            assert _rel(grads[k], g) < 1e-5, k
    dense_bf, dense_bf_grads = run(dense, None, bf16=True)
    fast_bf, fast_bf_grads = run(fast, active, bf16=True)
    for i, (a, b, r) in enumerate(zip(fast_bf, dense_bf, ref_logits, strict=True)):
        a, b, r = a[active[i]], b[active[i]], r[active[i]]
        if len(r):
            assert _rel(a, b) < 0.03 and _rel(a, r) < 2 * _rel(b, r) + 0.01
    for k, g in ref_grads.items():
        assert _rel(fast_bf_grads[k], dense_bf_grads[k]) < 0.05, k
        assert _rel(fast_bf_grads[k], g) < 2 * _rel(dense_bf_grads[k], g) + 0.01, k


def test_active_with_nothing_to_train_still_backpropagates():
    d = Eagle3Drafter(Eagle3Config(**TINY))
    inputs = _packed_inputs([6, 7])
    logits = d(*inputs, 3, active=torch.zeros(2, 13, dtype=torch.bool))
    assert all(lg.shape == (2, 13, 40) and not lg.any() for lg in logits)
    sum(lg.sum() for lg in logits).backward()
    assert d.fc.weight.grad is not None
