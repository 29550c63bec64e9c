"""The files of a bundle besides the model: tokenizer, chat template, configs, genai_config.json.

The manifest contract itself lives in ``edgekd.bundle``; this module writes what it describes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgekd.io import write_json

# onnxruntime-genai's model types for the architectures optimum-onnx exports (its "type" key).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "phi": "phi", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3_text", "gpt2": "gpt2",
               "granite": "granite", "olmo": "olmo", "smollm3": "smollm3", "nemotron": "nemotron"}


def copy_model(src: Path, out_dir: Path, name: str, external: bool) -> list[str]:
    """Put the final model into the bundle as ``name`` (+ ``name.data`` when external); return the
    files written. ``.ort`` files are copied as they are (the format has no external data)."""
    from edgekd.export.steps import load_onnx, save_onnx

    dst = out_dir / name
    if src.suffix == ".ort":
        shutil.copyfile(src, dst)
        return [name]
    model = load_onnx(src)
    save_onnx(model, dst, external=external or None)
    return [p.name for p in out_dir.iterdir() if p.name in (name, name + ".data")]


def write_tokenizer_and_configs(model, tokenizer, out_dir: Path) -> None:
    """tokenizer.json & co, the chat template (in tokenizer_config.json and chat_template.jinja),
    config.json and generation_config.json."""
    tokenizer.save_pretrained(out_dir)
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def genai_config(facts: dict[str, Any], model_type: str, filename: str, providers: tuple[str, ...],
                 pad_token_id: int | None) -> dict[str, Any]:
    """A ``genai_config.json`` in the shape onnxruntime-genai reads for a decoder with separate
    past/present tensors (optimum's layout, so ``past_present_share_buffer`` is false)."""
    eos = facts["eos_token_ids"]
    provider_options = []
    for p in providers:
        short = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "QNNExecutionProvider": "qnn",
                 "CoreMLExecutionProvider": "coreml", "WebGpuExecutionProvider": "webgpu"}.get(p)
        if short:
            provider_options.append({short: {}})
    ctx = facts["context_length"] or 2048
    return {
        "model": {
            "bos_token_id": facts["bos_token_id"],
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": filename,
                "head_size": facts["head_dim"],
                "hidden_size": facts["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": facts["num_attention_heads"],
                "num_hidden_layers": facts["num_layers"],
                "num_key_value_heads": facts["num_kv_heads"],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad_token_id if pad_token_id is not None else (eos[0] if eos else 0),
            "type": GENAI_TYPES.get(model_type, model_type),
            "vocab_size": facts["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(out_dir: Path, config: dict[str, Any]) -> None:
    write_json(out_dir / "genai_config.json", config)
