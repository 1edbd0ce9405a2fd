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


class Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, pos, mask0, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x (B, T, 2H); mask0 (B, 1, T, T) step-0 visibility; cache: (k, v) of earlier steps, appended."""
        B, T, _ = x.shape
        c, rep = self.c, self.c.num_attention_heads // self.c.num_key_value_heads
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)  # (B, kv, T, d)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        cache.append((k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))  # (B, h, T, d) each
        (k0, v0), diag = cache[0], cache[1:]
        scale = 1.0 / math.sqrt(c.head_dim)
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
    def __init__(self, config: Eagle3Config):
        super().__init__()
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

    def forward(self, embeds, aux, pos, seg, steps: int) -> list[torch.Tensor]:
        """TTT unroll. embeds (B, T, H) frozen target embeddings of x_0..x_{T-1}; aux (B, T, 3H_t);
        pos (B, T) rope positions; seg (B, T) sequence ids of packed slots. Returns ``steps`` logits
        (B, T, Vd): entry i at slot t predicts x_{t+2+i}."""
        B, T, _ = embeds.shape
        dtype = self.fc.weight.dtype
        same = seg[:, :, None] == seg[:, None, :]
        mask0 = (same & torch.ones(T, T, dtype=torch.bool, device=seg.device).tril())[:, None]  # (B,1,T,T)
        h = self.fc(aux.to(dtype))  # (B, T, H)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = []
        for i in range(steps):
            tok = F.pad(embeds[:, 1 + i :], (0, 0, 0, 1 + i)).to(dtype)  # x_{t+1+i}; tail slots are junk
            h = self.layers[0](tok, h, pos + i, mask0, cache)
            logits.append(self.lm_head(self.norm(h)))
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
    def from_pretrained(cls, path: Path | str, dtype: torch.dtype = torch.float32) -> Eagle3Drafter:
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(Eagle3Config.from_vllm_config(json.loads((path / CONFIG_FILE).read_text())))
        sd = load_file(str(path / WEIGHTS_FILE))
        sd.pop("t2d", None)
        sd.setdefault("d2t", torch.zeros(model.config.draft_vocab_size, dtype=torch.long))
        model.load_state_dict(sd)
        return model.to(dtype)

    def config_dict(self) -> dict:
        return asdict(self.config)
