"""The families people ship, as tiny random models built from a config (no downloads): issue 30's
matrix (docs/export.md has the table). Each family
- exports for the cpu target (its 8-bit layers, its tied head and embedding stored once, its golden
  reference) and for the mobile target (4-bit, GPTQ: these models are on no grid);
- is faithful: the bundle replays PyTorch's golden reference on onnxruntime (`edgekd check`);
- loads in onnxruntime-genai and answers with edgekd's greedy tokens, where onnxruntime-genai
  supports the family (where it does not, its refusal is pinned here);
- gives a `--student layers:1` that `edgekd distill` builds and trains for a step.
Where attention is not fused, the recipe says why, and that reason is pinned here so that a change
to it is seen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import VOCAB, build_tokenizer, genai_greedy, save_model

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
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, None),  # its packed qkv_proj feeds the kernel as it is
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, None),  # attention multiplier as the kernel's scale
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0}, None),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}, "partial rotary"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"num_key_value_heads": 4}, "no q_proj MatMul"),  # one c_attn; MHA
}

# What onnxruntime-genai 0.18 says when it cannot load a family's bundle (None: it loads and answers).
GENAI_REFUSES = {
    "olmo2": "Unsupported model_type in config.json: olmo2",
    "stablelm": "Unsupported model_type in config.json: stablelm",
    "gpt2": "Model input was not found",  # its gpt2 type expects its own builder's inputs
}

PROMPT = "Explain why the sky is blue, please."


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model, saved once for the module (weights at std 0.08, so that the
    logits are not near uniform and top-1 means something)."""
    import torch
    import transformers

    root, tok, out = tmp_path_factory.mktemp("families"), build_tokenizer(), {}
    for family, (config_cls, model_cls, overrides, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **overrides})).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.08)
        out[family] = save_model(model, tok, root / family)
    return out


def replay(bundle: Path) -> dict[str, float]:
    """The bundle against PyTorch's golden reference, as `edgekd check` measures it."""
    from edgekd.device.check import CheckConfig, check_bundle

    return check_bundle(bundle, CheckConfig(speed=False)).fidelity["reference"]


def assert_genai_as_edgekd(family: str, bundle: Path, n: int = 8) -> None:
    pytest.importorskip("onnxruntime_genai")
    from edgekd.device.runtime import Runtime

    rt = Runtime(bundle)
    ids = rt.encode_prompt(PROMPT)
    if GENAI_REFUSES.get(family):
        with pytest.raises(RuntimeError, match=GENAI_REFUSES[family]):
            genai_greedy(bundle, ids, n)
        return
    theirs = genai_greedy(bundle, ids, n)
    assert theirs and theirs == list(rt.generate_ids(ids, n, stop_at_eos=False))[: len(theirs)]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_exports_for_cpu(tmp_path, family_models, family):
    from edgekd.device.bundle import read_manifest
    from edgekd.export import export_bundle

    unfused = FAMILIES[family][3]
    export_bundle(str(family_models[family]), "cpu", tmp_path / "bundle")
    manifest = read_manifest(tmp_path / "bundle")
    recipe = {r["step"]: r for r in manifest["recipe"]}
    assert recipe["quantize_head_embedding"]["shared"]  # the tied embedding stored once
    assert recipe["matmul_nbits"]["quantized_matmuls"] >= 2 * (3 if family in ("phi3", "gpt2") else 4)  # 8-bit
    assert json.loads((tmp_path / "bundle" / "golden.json").read_text())["examples"]
    fused = recipe["fuse_attention"]
    if unfused is None:
        assert fused["fused_layers"] == 2, fused
        assert fused["rotary_tables"] == (2 if family == "gemma3_text" else 1)
        assert fused["qk_norm_layers"] == (2 if family in ("qwen3", "olmo2", "gemma3_text") else 0)
        assert fused["sliding_window_layers"] == {"mistral": 2, "gemma2": 1, "gemma3_text": 1}.get(family, 0)
    else:
        assert fused["fused_layers"] == 0 and unfused in fused["not_fused"], fused
    figures = replay(tmp_path / "bundle")
    assert figures["top1"] >= 0.9 and figures["kl_mean"] < 0.005, figures
    assert_genai_as_edgekd(family, tmp_path / "bundle")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_exports_for_mobile(tmp_path, family_models, family):
    from edgekd.device.bundle import read_manifest
    from edgekd.export import export_bundle

    export_bundle(str(family_models[family]), "mobile", tmp_path / "bundle")
    manifest = read_manifest(tmp_path / "bundle")
    recipe = {r["step"]: r for r in manifest["recipe"]}
    assert (tmp_path / "bundle" / "model.ort").is_file() and recipe["matmul_nbits"]["bits"] == 4
    assert recipe["matmul_nbits"]["gptq"]["layers"] == 2  # a model on no grid is rounded by GPTQ
    figures = replay(tmp_path / "bundle")
    # 4 bits on a random model's near-flat logits: top-1 flips where two tokens are close; KL says how close
    assert figures["kl_mean"] < 0.01 and 0.95 < figures["ppl_ratio"] < 1.06, figures
    assert_genai_as_edgekd(family, tmp_path / "bundle")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_distills_a_pruned_student(tmp_path, family_models, family):
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.models import load_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Explain the {w}", "response": f"The {w} is blue and near."}) + "\n"
                            for w in ("sea", "stars", "wind", "Paris", "Rome", "poem")))
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(family_models[family]), "--student", "layers:1", "--out", str(out),
                                 "--data", str(data), "--heldout", str(data), "--max-steps", "1", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "distill.json").read_text())
    assert info["steps"] == 1 and len(info["student"]["scan"]["block_influence"]) == 2
    student, _ = load_model(str(out))
    assert type(student).__name__ == FAMILIES[family][1] and student.config.num_hidden_layers == 1
