"""Target features recomputed at training time: a frozen HF target forward, nothing written to disk.

For a token sequence x_0..x_{T-1} the target gives, per position t:
- ``embeds``: its input embedding of x_t (the drafter's frozen token embeddings),
- ``aux``: the residual stream entering layers (2, L//2, L-3), i.e. HF ``hidden_states[k]``, the same
  tensors vLLM's ``_maybe_add_hidden_state`` hands to an EAGLE-3 drafter (hidden + residual entering k),
- ``logp``: log p_target(v | x_<=t) over the FULL target vocabulary, gathered at the draft vocabulary ids
  (mass outside the draft vocabulary stays outside: sum(exp(logp)) <= 1),
- ``argmax``: the target's greedy next token over the full vocabulary (greedy verification).

Runs in bf16 under ``torch.inference_mode`` in chunks of ``chunk_tokens`` with the target's KV cache, so
activation memory is bounded by the chunk, not the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.trace_window import target_identity


@dataclass
class TargetFeatures:
    embeds: torch.Tensor  # (T, H) target dtype
    aux: torch.Tensor  # (T, 3H) target dtype
    logp: torch.Tensor  # (T, Vd) float32, log-probs normalised over the full vocabulary
    argmax: torch.Tensor  # (T,) long, target greedy next token (target ids)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: list[TargetFeatures]) -> TargetFeatures:
        return TargetFeatures(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("embeds", "aux", "logp", "argmax"))
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, self.aux, self.logp, self.argmax))


def default_dtype() -> torch.dtype:
    """bf16 where matmuls run it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32.

    On a CPU without native bf16, PyTorch emulates bf16 matmuls and the target forward (most of a training
    step) runs ~2.7x slower than in fp32 (SmolLM2-135M, 512 tokens, measured on this project's CI box).
    """
    if torch.cuda.is_available():
        return torch.bfloat16
    flags = _cpu_flags()
    return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else torch.float32


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


class TargetModel:
    """A frozen HF causal LM (Llama/Qwen family: ``model.model.layers``) that computes drafter features."""

    def __init__(self, path: Path | str, dtype: torch.dtype | None = None, chunk_tokens: int = 512):
        from transformers import AutoModelForCausalLM

        self.path = Path(path)
        self.model_id, self.revision = target_identity(self.path)  # which traces are this target's
        dtype = dtype or default_dtype()
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.config = self.model.config.to_dict()
        n = self.model.config.num_hidden_layers
        self.aux_layer_ids = (2, n // 2, n - 3)
        self.chunk_tokens = chunk_tokens
        self._captured: dict[int, torch.Tensor] = {}
        for k in self.aux_layer_ids:
            self.model.model.layers[k].register_forward_pre_hook(self._capture(k), with_kwargs=True)

    def _capture(self, k: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._captured[k] = hidden[0]  # (chunk, H): HF keeps the full residual stream here

        return hook

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def features(
        self, token_ids: list[int] | torch.Tensor, draft_ids: torch.Tensor | None = None
    ) -> TargetFeatures:
        """Features of one sequence; ``draft_ids`` (Vd,) selects the logp columns (None = full vocab)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        aux, final = self.hidden(ids)
        return self.from_hidden(ids, aux, final, draft_ids)

    @torch.inference_mode()
    def hidden(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux (T, 3H), final (T, H) post-norm): the transformer layers' part of the features."""
        from transformers import DynamicCache

        ids = token_ids[None]  # (1, T)
        cache, aux, final = DynamicCache(), [], []
        for start in range(0, ids.shape[1], self.chunk_tokens):
            out = self.model.model(
                input_ids=ids[:, start : start + self.chunk_tokens], past_key_values=cache, use_cache=True
            )
            final.append(out.last_hidden_state[0])
            aux.append(torch.cat([self._captured[k] for k in self.aux_layer_ids], -1))
        self._captured.clear()
        return torch.cat(aux), torch.cat(final)

    @torch.inference_mode()
    def from_hidden(
        self, token_ids: torch.Tensor, aux: torch.Tensor, final: torch.Tensor, draft_ids: torch.Tensor | None
    ) -> TargetFeatures:
        """Embeddings, and logp/argmax from the final hidden state through the LM head, chunked so the
        (chunk, V) float32 logits stay bounded."""
        logp, argmax = [], []
        for start in range(0, len(final), self.chunk_tokens):
            logits = self.model.lm_head(final[start : start + self.chunk_tokens]).float()  # (C, V)
            lp = logits.log_softmax(-1)
            logp.append(lp if draft_ids is None else lp[:, draft_ids])
            argmax.append(logits.argmax(-1))
            del logits, lp
        return TargetFeatures(
            embeds=self.model.get_input_embeddings()(token_ids),
            aux=aux,
            logp=torch.cat(logp),
            argmax=torch.cat(argmax),
        )

    def features_many(
        self, sequences: list[list[int]], draft_ids: torch.Tensor | None = None
    ) -> list[TargetFeatures]:
        return [self.features(s, draft_ids) for s in sequences]


class CachedTarget:
    """A ``TargetModel`` that remembers each sequence's transformer outputs (aux + final hidden, in the
    target's dtype) up to ``max_bytes``, so epochs after the first skip the target's layers and rerun only
    the LM head. Keyed by the token ids' content, so a hit is exactly what a recompute would give.

    Memory grows with the window until ``max_bytes`` (then further sequences are recomputed each epoch):
    ``(3H + H) * dtype bytes`` per token, 9.2 KB for SmolLM2-135M in float32. Off (``max_bytes=0``) the
    trainer's memory is flat in the window's length.
    """

    def __init__(self, target: TargetModel, max_bytes: int):
        self.target = target
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._memo: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getattr__(self, name: str):  # config, embed_weight, hidden_size, model, ... of the target
        return getattr(self.target, name)

    @staticmethod
    def key(ids: torch.Tensor) -> bytes:
        import hashlib

        return hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).digest()

    def features(
        self, token_ids: list[int] | torch.Tensor, draft_ids: torch.Tensor | None = None
    ) -> TargetFeatures:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        key = self.key(ids)
        got = self._memo.get(key)
        if got is None:
            self.misses += 1
            got = self.target.hidden(ids)
            size = sum(t.numel() * t.element_size() for t in got)
            if self.nbytes + size <= self.max_bytes:
                self._memo[key] = got
                self.nbytes += size
        else:
            self.hits += 1
        return self.target.from_hidden(ids, *got, draft_ids)
