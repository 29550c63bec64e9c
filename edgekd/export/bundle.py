"""The files of a bundle besides the model: tokenizer, chat template, configs, genai_config.json.

The manifest contract itself lives in ``edgekd.device.bundle``; this module writes what it describes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgekd.device.bundle import DEFAULT_CONTEXT
from edgekd.device.io import write_json

# onnxruntime-genai's model types for the architectures optimum-onnx exports (its "type" key).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "phi": "phi", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3_text", "gpt2": "gpt2",
               "granite": "granite", "olmo": "olmo", "smollm3": "smollm3", "nemotron": "nemotron"}


# transformers.js v4 picks onnx/model<suffix>.onnx by the dtype that config.json's
# "transformers.js_config" names (its utils/dtypes.js DEFAULT_DTYPE_SUFFIX_MAPPING, models/session.js).
WEB_SUFFIXES = {"fp32": "", "q8": "_quantized", "q4": "_q4"}
# onnxruntime-web's WebAssembly heap is 32-bit (4 GiB): it holds the model file's bytes and the
# session's weights at once.
WASM_MODEL_LIMIT = 2**31


def web_dtype(steps: tuple[str, ...], bits: int) -> str:
    """The transformers.js dtype of a profile's model: q4 / q8 with MatMulNBits at 4 / 8 bits."""
    return ("q4" if bits == 4 else "q8") if "matmul_nbits" in steps else "fp32"


def web_model_file(dtype: str) -> str:
    return f"onnx/model{WEB_SUFFIXES[dtype]}.onnx"


def write_transformers_js_config(out_dir: Path, dtype: str) -> None:
    """config.json's ``transformers.js_config``: the dtype whose file the bundle holds, no external data."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["transformers.js_config"] = {"dtype": dtype, "use_external_data_format": False}
    write_json(path, config)


def copy_model(src: Path, out_dir: Path, name: str, external: bool) -> list[str]:
    """Put the final model into the bundle as ``name`` (+ ``name.data`` when external); return the
    files written. ``.ort`` files are copied as they are (the format has no external data)."""
    from edgekd.export.steps import load_onnx, save_onnx

    dst = out_dir / name
    if src.suffix == ".ort":
        shutil.copyfile(src, dst)
        return [name, *write_reduced_build_configs(dst, out_dir)]
    model = load_onnx(src)
    save_onnx(model, dst, external=external or None)
    return [n for n in (name, name + ".data") if (out_dir / n).is_file()]


REDUCED_BUILD_CONFIGS = {"required_operators.config": False, "required_operators_and_types.config": True}


def write_reduced_build_configs(ort_model: Path, out_dir: Path) -> list[str]:
    """The operators (and, in the second file, the types) an ORT-format model uses, in the format
    onnxruntime's reduced-size build reads (``build.sh --include_ops_by_config FILE``, also for
    Android's ``--android``), written by onnxruntime's own ``create_config_from_models``: an app
    ships a runtime holding only what its bundle needs."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    from edgekd.device.io import quiet

    written = []
    for name, with_types in REDUCED_BUILD_CONFIGS.items():
        with quiet():
            create_config_from_models([ort_model], out_dir / name, enable_type_reduction=with_types)
        text = (out_dir / name).read_text(encoding="utf-8")  # its header names the build machine's path: keep the file name only
        (out_dir / name).write_text(text.replace(str(ort_model.resolve()), ort_model.name).replace(str(ort_model), ort_model.name), encoding="utf-8")
        written.append(name)
    return written


def write_tokenizer_and_configs(model, tokenizer, out_dir: Path) -> None:
    """tokenizer.json & co, the chat template (in tokenizer_config.json and chat_template.jinja),
    config.json and generation_config.json."""
    tokenizer.save_pretrained(out_dir)
    template = getattr(tokenizer, "chat_template", None)
    config_path = Path(out_dir) / "tokenizer_config.json"
    if isinstance(template, str) and config_path.is_file():  # transformers 4.57 writes it to chat_template.jinja
        config = json.loads(config_path.read_text(encoding="utf-8"))  # only; transformers.js reads it here
        if "chat_template" not in config:
            write_json(config_path, {**config, "chat_template": template})
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


# The decoder steps transformers' GGUF converter writes around a byte-level BPE's ByteLevel decoder.
# On a ByteLevel vocabulary they change nothing, but onnxruntime-extensions (onnxruntime-genai's
# tokenizer) reads a decoder that replaces "\u2581" as SentencePiece and encodes every space as -1.
_GGUF_DECODER_STEPS = {"ByteFallback", "Fuse", "Replace", "ByteLevel", "Strip"}
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def _byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or ())
    return pre_tokenizer.get("type") == "ByteLevel"


def normalize_decoder(out_dir: Path) -> str | None:
    """Give a byte-level BPE ``tokenizer.json`` in ``out_dir`` the plain ``ByteLevel`` decoder that
    every runtime reads alike, when that decodes every token and a run of every token exactly as
    the decoder it had. Returns what was done, or ``None`` when the tokenizer was left as it was."""
    from tokenizers import Tokenizer

    path = Path(out_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    decoder = data.get("decoder") or {}
    steps = [d.get("type") for d in decoder.get("decoders") or ()] if decoder.get("type") == "Sequence" else []
    if not (_byte_level(data.get("pre_tokenizer")) and "ByteLevel" in steps and set(steps) <= _GGUF_DECODER_STEPS):
        return None
    new = {**data, "decoder": BYTE_LEVEL_DECODER}
    old_tk, new_tk = Tokenizer.from_str(json.dumps(data)), Tokenizer.from_str(json.dumps(new))
    n = old_tk.get_vocab_size(with_added_tokens=True)
    singles = [[i] for i in range(n)]
    runs = [list(range(i, min(i + 64, n))) for i in range(0, n, 64)]  # every token inside a sequence too
    for batch in (singles, runs):
        for skip in (False, True):
            if old_tk.decode_batch(batch, skip_special_tokens=skip) != new_tk.decode_batch(batch, skip_special_tokens=skip):
                return None
    path.write_text(json.dumps(new, ensure_ascii=False, indent=2), encoding="utf-8")
    return f"decoder Sequence[{', '.join(steps)}] -> ByteLevel (all {n} tokens decode alike)"


def genai_config(facts: dict[str, Any], model_type: str, filename: str, providers: tuple[str, ...],
                 pad_token_id: int | None) -> dict[str, Any]:
    """A ``genai_config.json`` in the shape onnxruntime-genai reads for a decoder with separate
    past/present tensors (optimum's layout, so ``past_present_share_buffer`` is false)."""
    eos = facts["eos_token_ids"]
    provider_options: list[dict[str, dict]] = []
    for p in providers:
        short = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "QNNExecutionProvider": "qnn",
                 "CoreMLExecutionProvider": "coreml", "WebGpuExecutionProvider": "webgpu"}.get(p)
        if short:
            provider_options.append({short: {}})
    ctx = facts["context_length"] or DEFAULT_CONTEXT
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


JS_CHECK = "check.mjs"  # the golden replay in JavaScript (edgekd/assets/check.mjs), in every bundle


def write_js_check(out_dir: Path) -> None:
    """Copy the JavaScript golden replay into the bundle: ``node check.mjs`` (with onnxruntime-node)
    replays golden.json and applies the golden gates, as ``edgekd check`` does, where an app runs."""
    shutil.copyfile(Path(__file__).resolve().parent.parent / "assets" / JS_CHECK, out_dir / JS_CHECK)
