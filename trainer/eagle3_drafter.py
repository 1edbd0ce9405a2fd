"""The EAGLE-3 drafter head, in the layout vLLM's ``Eagle3LlamaForCausalLM`` loads (llama_eagle3.py).

    fc:      cat(aux_2, aux_{L/2}, aux_{L-3}) (3H_t) -> H
    layer 0: x = cat(input_layernorm(embed(tok)), hidden_norm(h))        (2H)
             r = h + attn(x);  out = r + mlp(post_attention_layernorm(r))
    head:    logits = lm_head(norm(out));  ``out`` (pre-norm) is the next draft step's ``h``

Token embeddings come from the target and stay frozen: the caller passes them in and the checkpoint does
not ship ``embed_tokens`` (vLLM then shares the target's). With a pruned draft vocabulary, draft id ``i``
is target id ``i + d2t[i]`` (vLLM reads ``d2t`` and ignores ``t2d``).

Training-time test (TTT): step 0 runs over every slot t with (token x_{t+1}, target hidden at t) at
rope position t and predicts x_{t+2}; step i reuses step i-1's pre-norm output at slot t with token
x_{t+1+i} at position t+i and predicts x_{t+2+i}. Step-i queries attend to step-0 keys of the slots <= t
of the same sequence and to the keys that steps 1..i made at slot t, exactly the KV cache vLLM holds when
it drafts token i+1 of a chain rooted at t.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Eagle3Config:
    hidden_size: int = 576
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    vocab_size: int = 49152  # target vocabulary
    draft_vocab_size: int = 49152
    target_hidden_size: int = 576
    aux_layer_ids: tuple[int, ...] = (2, 15, 27)
    passthrough: dict = field(default_factory=dict)  # other config.json keys of the target: rope, eos, ...

    @classmethod
    def from_target(cls, target_config: dict, draft_vocab_size: int | None = None) -> Eagle3Config:
        """Drafter dims = target dims; aux layers (2, L//2, L-3), vLLM's default for Llama targets."""
        L, rope = target_config["num_hidden_layers"], target_config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or target_config.get("rope_scaling"):
            # vLLM would apply the scaled rope from config.json; training here implements plain rope only
            raise NotImplementedError(f"only default rope is implemented, target has {rope}")
        h = target_config["hidden_size"]
        return cls(
            hidden_size=h,
            num_attention_heads=target_config["num_attention_heads"],
            num_key_value_heads=target_config.get(
                "num_key_value_heads", target_config["num_attention_heads"]
            ),
            head_dim=target_config.get("head_dim") or h // target_config["num_attention_heads"],
            intermediate_size=target_config["intermediate_size"],
            rms_norm_eps=target_config.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", target_config.get("rope_theta", 10000.0)),
            vocab_size=target_config["vocab_size"],
            draft_vocab_size=draft_vocab_size or target_config["vocab_size"],
            target_hidden_size=h,
            aux_layer_ids=(2, L // 2, L - 3),
            passthrough=_passthrough(target_config),
        )

    def to_vllm_config(self) -> dict:
        """config.json for ``speculative_config={"method": "eagle3", "model": DIR}``."""
        return self.passthrough | self.own_keys()

    def own_keys(self) -> dict:
        """The config.json keys the drafter sets itself (all others pass through from the target)."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": False,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                "use_aux_hidden_state": True,
            },
        }

    @classmethod
    def from_vllm_config(cls, cfg: dict) -> Eagle3Config:
        rope = cfg.get("rope_parameters") or {}
        return cls(
            hidden_size=cfg["hidden_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_dim"],
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            vocab_size=cfg["vocab_size"],
            draft_vocab_size=cfg.get("draft_vocab_size") or cfg["vocab_size"],
            target_hidden_size=cfg.get("target_hidden_size", cfg["hidden_size"]),
            aux_layer_ids=tuple(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
            passthrough=_passthrough(cfg),
        )


def _passthrough(cfg: dict) -> dict:
    """config.json keys the drafter copies from the target as they are (rope settings, special tokens...)."""
    own = Eagle3Config().own_keys()
    return {k: v for k, v in cfg.items() if k not in own and not k.startswith(("_", "quantization"))}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding (HF Llama / vLLM): x (B, h, T, d), pos (B, T)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None, :, None] * inv  # (B, 1, T, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


ATTENTION_KERNELS = ("sdpa", "dense")
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def doc_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) step-0 visibility: same packed sequence and not in the future."""
    T = seg.shape[1]
    same = seg[:, :, None] == seg[:, None, :]
    return (same & torch.ones(T, T, dtype=torch.bool, device=seg.device).tril())[:, None]


def doc_spans(seg: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(row, start, end) of each packed sequence, or None when a sequence id is not one contiguous run
    (then only the dense mask describes the visibility)."""
    spans = []
    for b, row in enumerate(seg.tolist()):
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
        if len({row[t] for t in starts}) != len(starts):
            return None
        spans += [(b, a, e) for a, e in zip(starts, starts[1:] + [len(row)], strict=True)]
    return spans


class _DocCausalUnrollAttention(torch.autograd.Function):
    """softmax over [step-0 keys of the same sequence, causal ; the slot's own keys of steps 1..i] @ values,
    exactly the dense path's function. The step-0 part runs the fused CPU flash-attention kernel once per
    packed sequence (``is_causal``: no cross-sequence or future blocks are computed), which also returns its
    log-sum-exp; the diagonal terms (one key per slot per earlier step) merge in by log-sum-exp.

    Backward: the merged softmax's gradient on the step-0 block is the flash kernel's backward called with
    grad_out * exp(lse0 - lse) and the *merged* output (its rowsum(grad_out * out) term is then the merged
    softmax's), the usual split-KV combination; the diagonal terms' gradients are elementwise."""

    @staticmethod
    def forward(ctx, spans, scale, q, k0, v0, *diag):
        out0, lse0 = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
        for b, a, e in spans:
            o, lse = _flash(
                q[b : b + 1, :, a:e], k0[b : b + 1, :, a:e], v0[b : b + 1, :, a:e], 0.0, True, scale=scale
            )
            out0[b : b + 1, :, a:e], lse0[b : b + 1, :, a:e] = o, lse
        ks, vs = diag[0::2], diag[1::2]
        if not ks:
            out, lse, p = out0, lse0, q.new_empty(0)
        else:
            qf = q.float()
            s = torch.stack([(qf * k.float()).sum(-1) for k in ks]) * scale  # (i, B, h, T)
            lse = torch.logsumexp(torch.cat([lse0[None], s]), 0)  # (B, h, T)
            p = (s - lse).exp()  # merged softmax weights of the diagonal keys
            out = (lse0 - lse).exp()[..., None] * out0.float()
            for pj, v in zip(p, vs, strict=True):
                out = out + pj[..., None] * v.float()
            out = out.to(q.dtype)
        ctx.spans, ctx.scale = spans, scale
        ctx.save_for_backward(q, k0, v0, out, lse0, lse, p, *diag)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k0, v0, out, lse0, lse, p, *diag = ctx.saved_tensors
        ks, vs, scale = diag[0::2], diag[1::2], ctx.scale
        dout = dout.contiguous()
        g0 = dout if not ks else (dout.float() * (lse0 - lse).exp()[..., None]).to(q.dtype)
        dq, dk0, dv0 = torch.empty_like(q), torch.empty_like(k0), torch.empty_like(v0)
        for b, a, e in ctx.spans:
            r = slice(b, b + 1), slice(None), slice(a, e)
            dq[r], dk0[r], dv0[r] = _flash_backward(
                g0[r], q[r], k0[r], v0[r], out[r], lse0[r], 0.0, True, scale=scale
            )
        grads = []
        if ks:
            df, qf = dout.float(), q.float()
            D = (df * out.float()).sum(-1)  # (B, h, T)
            dqf = dq.float()
            for pj, k, v in zip(p, ks, vs, strict=True):
                ds = (pj * ((df * v.float()).sum(-1) - D) * scale)[..., None]
                dqf = dqf + ds * k.float()
                grads += [(ds * qf).to(k.dtype), (pj[..., None] * df).to(v.dtype)]
            dq = dqf.to(q.dtype)
        return None, None, dq, dk0, dv0, *grads


@dataclass(frozen=True)
class QueryRuns:
    """Step >= 1 of an ``active`` unroll: the computed (alive) slots, compacted into one row of ``n``
    queries. ``runs``: (row, qa, qe, a, c): the slots qa..qe-1 of ``row`` (a maximal run of alive slots
    inside the packed sequence that starts at slot ``a``) sit at compact indices c..c+qe-qa-1."""

    runs: list[tuple[int, int, int, int, int]]
    n: int


def query_runs(alive: torch.Tensor, doc_start: torch.Tensor) -> QueryRuns:
    """``alive`` (B, T) bool; ``doc_start`` (B, T) long: first slot of each slot's packed sequence."""
    T = alive.shape[1]
    flat = alive.flatten().nonzero().squeeze(1)  # (n,) b * T + t, ascending
    if not len(flat):
        return QueryRuns([], 0)
    start = doc_start.flatten()[flat] + flat // T * T  # flat index of the sequence's first slot
    brk = torch.ones(len(flat), dtype=torch.bool, device=flat.device)
    brk[1:] = (flat[1:] != flat[:-1] + 1) | (start[1:] != start[:-1])
    c = brk.nonzero().squeeze(1)
    ends = torch.cat([c[1:], c.new_tensor([len(flat)])])
    runs = []
    for ci, ce, f, a in zip(c.tolist(), ends.tolist(), flat[c].tolist(), start[c].tolist(), strict=True):
        runs.append((f // T, f % T, f % T + ce - ci, a % T, ci))
    return QueryRuns(runs, len(flat))


class _RunsUnrollAttention(torch.autograd.Function):
    """``_DocCausalUnrollAttention`` for a compacted set of queries (``QueryRuns``, one row of n queries)
    against the full step-0 keys/values (B, h, T, d): a run of queries at slots qa..qe-1 of a sequence
    starting at a sees step-0 keys a..t, i.e. the causal block [qa, qe) (flash, ``is_causal``: aligned)
    plus the fully visible prefix block [a, qa) (flash, not causal); both blocks and the diagonal keys
    merge by log-sum-exp. Backward: each block's flash backward with grad_out * exp(lse_block - lse) and
    the merged output (the split-KV combination), summed."""

    @staticmethod
    def forward(ctx, qr, scale, q, k0, v0, *diag):
        out0, lse0 = torch.zeros_like(q), q.new_zeros(q.shape[:-1], dtype=torch.float32)
        outp = torch.zeros_like(q)
        lsep = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        for b, qa, qe, a, c in qr.runs:
            r, kr = (
                (slice(None), slice(None), slice(c, c + qe - qa)),
                (slice(b, b + 1), slice(None), slice(qa, qe)),
            )
            out0[r], lse0[r] = _flash(q[r], k0[kr], v0[kr], 0.0, True, scale=scale)
            if qa > a:
                kp = slice(b, b + 1), slice(None), slice(a, qa)
                outp[r], lsep[r] = _flash(q[r], k0[kp], v0[kp], 0.0, False, scale=scale)
        ks, vs = diag[0::2], diag[1::2]
        qf = q.float()
        s = [(qf * k.float()).sum(-1) * scale for k in ks]  # each (1, h, n)
        lse = torch.logsumexp(torch.stack([lse0, lsep, *s]), 0)  # (1, h, n)
        out = (lse0 - lse).exp()[..., None] * out0.float() + (lsep - lse).exp()[..., None] * outp.float()
        p = torch.stack([(sj - lse).exp() for sj in s]) if ks else q.new_empty(0)
        for pj, v in zip(p, vs, strict=True):
            out = out + pj[..., None] * v.float()
        out = out.to(q.dtype)
        ctx.qr, ctx.scale = qr, scale
        ctx.save_for_backward(q, k0, v0, out, lse0, lsep, lse, p, *diag)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k0, v0, out, lse0, lsep, lse, p, *diag = ctx.saved_tensors
        ks, vs, scale = diag[0::2], diag[1::2], ctx.scale
        df = dout.float()
        g0 = (df * (lse0 - lse).exp()[..., None]).to(q.dtype)
        gp = (df * (lsep - lse).exp()[..., None]).to(q.dtype)
        dqf = torch.zeros_like(q, dtype=torch.float32)
        dk0, dv0 = torch.zeros_like(k0, dtype=torch.float32), torch.zeros_like(v0, dtype=torch.float32)
        for b, qa, qe, a, c in ctx.qr.runs:
            r = slice(None), slice(None), slice(c, c + qe - qa)
            blocks = [(g0, lse0, qa, qe, True)] + ([(gp, lsep, a, qa, False)] if qa > a else [])
            for g, lse_b, ka, ke, causal in blocks:
                kr = slice(b, b + 1), slice(None), slice(ka, ke)
                dq, dk, dv = _flash_backward(
                    g[r].contiguous(),
                    q[r],
                    k0[kr],
                    v0[kr],
                    out[r],
                    lse_b[r].contiguous(),
                    0.0,
                    causal,
                    scale=scale,
                )
                dqf[r] += dq.float()
                dk0[kr] += dk.float()
                dv0[kr] += dv.float()
        grads = []
        if ks:
            qf = q.float()
            D = (df * out.float()).sum(-1)  # (1, h, n)
            for pj, k, v in zip(p, ks, vs, strict=True):
                ds = (pj * ((df * v.float()).sum(-1) - D) * scale)[..., None]
                dqf = dqf + ds * k.float()
                grads += [(ds * qf).to(k.dtype), (pj[..., None] * df).to(v.dtype)]
        return None, None, dqf.to(q.dtype), dk0.to(k0.dtype), dv0.to(v0.dtype), *grads


class Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, pos, mask0, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x (B, T, 2H); mask0 step-0 visibility: the (B, 1, T, T) dense mask, or the packed sequences'
        (row, start, end) spans for the flash kernel; cache: (k, v) of earlier steps, appended."""
        B, T, _ = x.shape
        c, rep = self.c, self.c.num_attention_heads // self.c.num_key_value_heads
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)  # (B, kv, T, d)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        cache.append((k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))  # (B, h, T, d) each
        (k0, v0), diag = cache[0], cache[1:]
        scale = 1.0 / math.sqrt(c.head_dim)
        if isinstance(mask0, QueryRuns):  # compacted queries against the full step-0 keys
            kv = [t.to(q.dtype) for kj_vj in diag for t in kj_vj]
            out = _RunsUnrollAttention.apply(mask0, scale, q, k0.to(q.dtype), v0.to(q.dtype), *kv)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, c.num_attention_heads * c.head_dim))
        if isinstance(mask0, list):  # flash kernel per packed sequence + log-sum-exp merge
            kv = [t.to(q.dtype) for kj_vj in diag for t in kj_vj]
            out = _DocCausalUnrollAttention.apply(mask0, scale, q, k0.to(q.dtype), v0.to(q.dtype), *kv)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        scores = [(q @ k0.transpose(-1, -2) * scale).masked_fill(~mask0, float("-inf"))]  # (B, h, T, T)
        scores += [(q * kj).sum(-1, keepdim=True) * scale for kj, _ in diag]  # each (B, h, T, 1)
        p = torch.softmax(torch.cat(scores, -1).float(), -1).to(q.dtype)  # (B, h, T, T + i)
        out = p[..., :T] @ v0
        for j, (_, vj) in enumerate(diag):
            out = out + p[..., T + j : T + j + 1] * vj
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H)


class MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # on token embeddings
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # on fc output / previous step
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, embeds, h, pos, mask0, cache) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(h)], -1)  # (B, T, 2H)
        r = h + self.self_attn(x, pos, mask0, cache)
        return r + self.mlp(self.post_attention_layernorm(r))  # pre-norm output (B, T, H)


class Eagle3Drafter(nn.Module):
    """``attention``: "sdpa" (default) runs the step-0 attention with the fused CPU flash kernel per packed
    sequence and merges the unroll's diagonal terms by log-sum-exp; "dense" is the reference: full (T, T)
    masked scores. Same function either way; a runtime choice, not part of the checkpoint or config.json."""

    def __init__(self, config: Eagle3Config, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        self.attention = attention
        c = self.config = config
        self.fc = nn.Linear(len(c.aux_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        # draft id -> target id offsets; identity when the draft vocabulary is the full target vocabulary
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def draft_to_target(self) -> torch.Tensor:
        """(Vd,) target id of each draft id."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def set_vocab(self, draft_ids: torch.Tensor) -> None:
        """Use the sorted target ids ``draft_ids`` as the draft vocabulary (len must equal draft_vocab_size)."""
        draft_ids = torch.sort(draft_ids.long()).values
        assert len(draft_ids) == self.config.draft_vocab_size
        self.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))

    def forward(self, embeds, aux, pos, seg, steps: int, active=None, rows=None) -> list[torch.Tensor]:
        """TTT unroll. embeds (B, T, H) frozen target embeddings of x_0..x_{T-1}; aux (B, T, 3H_t);
        pos (B, T) rope positions; seg (B, T) sequence ids of packed slots. Returns ``steps`` logits
        (B, T, Vd): entry i at slot t predicts x_{t+2+i}.

        ``rows``: None, or (R,) long flat slot indices (into B * T, ascending) to return instead: every
        step's logits are then (R, Vd), row r for slot ``rows[r]``, so the losses run on the slots they
        read and the full (B, T, Vd) tensors are never built (``active`` must lie inside ``rows``).

        ``active``: None (every logit), or (S, B, T) / (B, T) (same at every step) bool: the logits the
        caller reads. Then entries outside ``active`` are zeros (no gradient flows through them) and the
        fast kernel skips their work: the LM head (and final norm) runs only on active entries; steps >= 1
        run only on the slots active at that step or a later one (step i+1 of a slot reads only its own
        step-i output; step 0 still runs on every slot: its keys/values are everyone's). The dense
        reference computes every slot and zeros the inactive logits: the same function."""
        dtype = self.fc.weight.dtype
        spans = doc_spans(seg) if self.attention == "sdpa" and seg.device.type == "cpu" else None
        mask0 = spans if spans is not None else doc_mask(seg)  # dense: the reference, also off CPU
        if active is not None:
            active = active.to(torch.bool).expand(steps, *seg.shape) if active.dim() == 2 else active.bool()
            assert active.shape == (steps, *seg.shape), (active.shape, steps, seg.shape)
        h = self.fc(aux.to(dtype))  # (B, T, H)
        if active is not None and spans is not None:
            return self._forward_active(embeds, h, pos, spans, steps, active, dtype, rows)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = []
        for i in range(steps):
            tok = F.pad(embeds[:, 1 + i :], (0, 0, 0, 1 + i)).to(dtype)  # x_{t+1+i}; tail slots are junk
            h = self.layers[0](tok, h, pos + i, mask0, cache)
            lg = self.lm_head(self.norm(h))
            lg = lg if active is None else lg.masked_fill(~active[i, ..., None], 0)
            logits.append(lg if rows is None else lg.flatten(0, 1)[rows])
        return logits

    def _forward_active(self, embeds, h, pos, spans, steps, active, dtype, rows) -> list[torch.Tensor]:
        """``forward`` with ``active`` on the flash kernel: step 0 on every slot, steps >= 1 on the
        compacted alive slots (active at that step or later), the LM head on the active ones."""
        B, T = pos.shape
        out_rows = B * T if rows is None else len(rows)
        if rows is not None:  # row of each returned slot; active slots outside ``rows`` would be lost
            row_of = torch.full((B * T,), -1, dtype=torch.long, device=pos.device)
            row_of[rows] = torch.arange(len(rows), device=pos.device)
        alive = active.flip(0).cummax(0).values.flip(0)  # (S, B, T): active at step i or later
        doc_start = torch.zeros(B, T, dtype=torch.long, device=pos.device)
        for b, a, e in spans:
            doc_start[b, a:e] = a
        layer, Vd = self.layers[0], self.config.draft_vocab_size
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = []
        idx = torch.arange(B * T, device=pos.device)  # flat slots computed at the current step
        for i in range(steps):
            tok = F.pad(embeds[:, 1 + i :], (0, 0, 0, 1 + i)).to(dtype)  # x_{t+1+i}; tail slots are junk
            if i == 0:
                h = layer(tok, h, pos, spans, cache).reshape(B * T, -1)
            else:
                prev = torch.full((B * T,), -1, dtype=torch.long, device=pos.device)
                prev[idx] = torch.arange(len(idx), device=pos.device)
                idx = alive[i].flatten().nonzero().squeeze(1)
                rel = prev[idx]  # alive(i) is a subset of alive(i-1): rows of the previous step's tensors
                h = h[rel]
                cache[1:] = [(k[:, :, rel], v[:, :, rel]) for k, v in cache[1:]]
                qr = query_runs(alive[i], doc_start)
                x = tok.reshape(B * T, -1)[idx][None]
                h = layer(x, h[None], (pos + i).flatten()[idx][None], qr, cache)[0]
            where = torch.full((B * T,), -1, dtype=torch.long, device=pos.device)
            where[idx] = torch.arange(len(idx), device=pos.device)
            need = active[i].flatten().nonzero().squeeze(1)
            lg = self.lm_head(self.norm(h[where[need]]))  # (n_active, Vd)
            at = need if rows is None else row_of[need]  # -1 (outside rows): index_copy_ raises
            out = lg.new_zeros(out_rows, Vd).index_copy_(0, at, lg)  # one write
            logits.append(out.view(B, T, Vd) if rows is None else out)
        return logits

    # -- vLLM checkpoint format -------------------------------------------------------------------
    def vllm_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items() if k != "d2t"}
        if self.config.draft_vocab_size != self.config.vocab_size:
            sd["d2t"] = self.d2t.detach().clone()
            t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            t2d[self.draft_to_target.cpu()] = True
            sd["t2d"] = t2d  # EAGLE/SpecForge convention; vLLM ignores it
        return sd

    def save_pretrained(
        self, out_dir: Path | str, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None
    ):
        """Write config.json + model.safetensors that vLLM loads as an eagle3 drafter."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.config.to_vllm_config(), indent=1))
        save_file(self.vllm_state_dict(dtype), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        if extra is not None:
            (out / "flywheel-drafter.json").write_text(json.dumps(extra, indent=1, default=str))
        return out

    @classmethod
    def from_pretrained(
        cls, path: Path | str, dtype: torch.dtype = torch.float32, attention: str = "sdpa"
    ) -> Eagle3Drafter:
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(Eagle3Config.from_vllm_config(json.loads((path / CONFIG_FILE).read_text())), attention)
        sd = load_file(str(path / WEIGHTS_FILE))
        sd.pop("t2d", None)
        sd.setdefault("d2t", torch.zeros(model.config.draft_vocab_size, dtype=torch.long))
        model.load_state_dict(sd)
        return model.to(dtype)

    def config_dict(self) -> dict:
        return asdict(self.config)
