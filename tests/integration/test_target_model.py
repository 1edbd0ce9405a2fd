"""The target converted from the GGUF wheel is a working model."""

from __future__ import annotations

import json

from core.prompts import load_prompts
from core.target_model import MANIFEST, prepare_target, sha256_file


def test_prepare_is_idempotent_and_checksummed(target_model):
    again = prepare_target(target_model.path.parent)
    assert again.reused and again.revision == target_model.revision
    manifest = json.loads((target_model.path / MANIFEST).read_text())
    assert sha256_file(target_model.path / "model.safetensors") == manifest["files"]["model.safetensors"]
    assert manifest["revision"] == manifest["files"]["model.safetensors"][:16]


def test_prepared_model_generates_text_for_a_real_prompt(target_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_model.path)
    model = AutoModelForCausalLM.from_pretrained(target_model.path, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = load_prompts("code")[0]
    inputs = tok.apply_chat_template(
        prompt.messages(), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 10
