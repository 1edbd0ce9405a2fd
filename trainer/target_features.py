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
        from transformers import DynamicCache

        ids = torch.as_tensor(token_ids, dtype=torch.long)[None]  # (1, T)
        cache, parts = DynamicCache(), []
        for start in range(0, ids.shape[1], self.chunk_tokens):
            chunk = ids[:, start : start + self.chunk_tokens]
            out = self.model.model(input_ids=chunk, past_key_values=cache, use_cache=True)
            final = out.last_hidden_state[0]  # (C, H) post-norm
            logits = self.model.lm_head(final).float()  # (C, V)
            logp = logits.log_softmax(-1)
            parts.append(
                TargetFeatures(
                    embeds=self.model.get_input_embeddings()(chunk[0]),
                    aux=torch.cat([self._captured[k] for k in self.aux_layer_ids], -1),  # (C, 3H)
                    logp=logp if draft_ids is None else logp[:, draft_ids],
                    argmax=logits.argmax(-1),
                )
            )
            del logits, logp
        self._captured.clear()
        return TargetFeatures.cat(parts)

    def features_many(
        self, sequences: list[list[int]], draft_ids: torch.Tensor | None = None
    ) -> list[TargetFeatures]:
        return [self.features(s, draft_ids) for s in sequences]
