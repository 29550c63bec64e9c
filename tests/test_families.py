"""The families people ship, as tiny random models built from a config (no downloads): each exports
for the cpu target with its 8-bit layers, its tied head and embedding stored once, and its golden
reference (issue 30's matrix; docs/export.md has the table). Where attention is not fused, the
recipe says why, and that reason is pinned here so that a change to it is seen."""

from __future__ import annotations

import json

import pytest

from tests.conftest import VOCAB, build_tokenizer, save_model

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)

# family -> (config class, model class, config overrides, why attention stays unfused or None when it is fused)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, None),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, None),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8}, None),  # soft-capped
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, None),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, "no q_proj MatMul"),  # packed qkv_proj
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, None),  # attention multiplier as the kernel's scale
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0}, None),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}, "partial rotary"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_exports_for_cpu(tmp_path, family):
    import torch
    import transformers

    from edgekd.bundle import read_manifest
    from edgekd.export import export_bundle

    config_cls, model_cls, overrides, unfused = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **overrides})).eval()
    folder = save_model(model, build_tokenizer(), tmp_path / family)
    export_bundle(str(folder), "cpu", tmp_path / "bundle")
    manifest = read_manifest(tmp_path / "bundle")
    recipe = {r["step"]: r for r in manifest["recipe"]}
    assert recipe["quantize_head_embedding"]["shared"]  # the tied embedding stored once
    assert recipe["matmul_nbits"]["quantized_matmuls"] >= 2 * 4  # every layer's weights, 8-bit
    assert json.loads((tmp_path / "bundle" / "golden.json").read_text())["examples"]
    fused = recipe["fuse_attention"]
    if unfused is None:
        assert fused["fused_layers"] == 2, fused
        assert fused["rotary_tables"] == (2 if family == "gemma3_text" else 1)
        assert fused["qk_norm_layers"] == (2 if family in ("qwen3", "olmo2", "gemma3_text") else 0)
        assert fused["sliding_window_layers"] == {"mistral": 2, "gemma2": 1, "gemma3_text": 1}.get(family, 0)
    else:
        assert fused["fused_layers"] == 0 and unfused in fused["not_fused"], fused
