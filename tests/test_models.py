from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_smollm2

from edgekd.device.errors import UsageError
from edgekd.models import describe, load_model, resolve_source


def test_folder_loads_with_pad_and_chat_template(tiny_teacher_dir):
    model, tok = load_model(str(tiny_teacher_dir))
    assert model.config.num_hidden_layers == 4
    assert tok.pad_token == "<|im_end|>"  # no pad in the folder: eos is used
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    facts = describe(model, tok, resolve_source(str(tiny_teacher_dir)))
    assert facts["tied_embeddings"] is True
    assert facts["layers"] == 4 and facts["kv_heads"] == 2 and facts["vocab_size"] == 384
    assert facts["size_on_disk_bytes"] > facts["parameters"] * 4 * 0.9


def test_chat_template_survives_round_trip(tiny_teacher_dir, tmp_path):
    _, tok = load_model(str(tiny_teacher_dir))
    tok.save_pretrained(tmp_path)
    shutil.copy(tiny_teacher_dir / "config.json", tmp_path)
    shutil.copy(tiny_teacher_dir / "model.safetensors", tmp_path)
    _, tok2 = load_model(str(tmp_path))
    assert tok2.chat_template == tok.chat_template
    assert tok2.pad_token == tok.pad_token


def test_pickle_only_folder_refused_unless_allowed(tiny_teacher_dir, tmp_path):
    model, tok = load_model(str(tiny_teacher_dir))
    model.save_pretrained(tmp_path, safe_serialization=False)
    tok.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(UsageError, match="pickle"):
        load_model(str(tmp_path))
    model2, _ = load_model(str(tmp_path), allow_pickle=True)
    x = torch.tensor([[1, 5, 9]])
    assert torch.allclose(model(x).logits, model2(x).logits)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no config.json"),
        (lambda p: _write(p / "x.gguf", b"NOPE" * 10), "not a GGUF file"),
        (lambda p: _write(p / "y.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 5), "truncated"),
        (lambda p: _write(p / "w.txt", b"hi"), "not a .gguf model"),
    ],
)
def test_bad_sources_give_one_line_errors(tmp_path, make, message):
    with pytest.raises(UsageError, match=message) as e:
        resolve_source(str(make(tmp_path)))
    assert "\n" not in str(e.value)


def test_config_only_folder(tmp_path, tiny_teacher_dir):
    shutil.copy(tiny_teacher_dir / "config.json", tmp_path)
    with pytest.raises(UsageError, match="no weights"):
        resolve_source(str(tmp_path))


def test_truncated_safetensors(tmp_path, tiny_teacher_dir):
    for f in tiny_teacher_dir.iterdir():
        shutil.copy(f, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="could not load"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path, tiny_teacher_dir):
    for f in tiny_teacher_dir.iterdir():
        shutil.copy(f, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="no-such-arch|unsupported"):
        load_model(str(tmp_path))


def test_hub_id_not_in_cache_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UsageError, match="local Hugging Face cache"):
        resolve_source("some-org/some-model")


def test_hub_id_from_local_cache(monkeypatch, tmp_path, tiny_teacher_dir):
    """A hub id resolves from a snapshot laid out the way huggingface_hub caches it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in tiny_teacher_dir.iterdir():
        shutil.copy(f, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model, tok = load_model("acme/tiny")
    assert model.config.num_hidden_layers == 4


def _write_tiny_gguf(path: Path, tokenizer, config) -> None:
    """A real GGUF file (f32 tensors, llama names, gpt2-style BPE tokenizer) written by `gguf`."""
    import gguf
    from conftest import build_model

    model = build_model(config)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_file_type(0)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(tokenizer.chat_template)
    sd = model.state_dict()
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads

    def permute(weights, heads):  # HF -> GGUF rotary layout (transformers reverses this)
        return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"].numpy(), n_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"].numpy(), n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_gguf_file_loads_and_matches(tmp_path, tokenizer, monkeypatch):
    from conftest import tiny_llama_config

    from edgekd.models import _load_kwargs

    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    config = tiny_llama_config(layers=2)
    path = tmp_path / "tiny.gguf"
    reference = _write_tiny_gguf(path, tokenizer, config)
    ids = None
    for load in ("converts the GGUF file", "reads the conversion cache"):
        model, tok = load_model(str(path))
        assert model.config.num_hidden_layers == 2, load
        assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None, load
        ids = ids if ids is not None else torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
        assert tok("The capital of France is Paris.")["input_ids"] == ids[0].tolist(), load
        np.testing.assert_allclose(model(ids).logits.detach().numpy(), reference(ids).logits.detach().numpy(), atol=1e-4)
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()  # one folder, no temporary left behind
    assert _load_kwargs(resolve_source(str(path)), False)[0] == str(cached)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cached.iterdir()}
    # a damaged cache folder is dropped and the file converted again
    (cached / "model.safetensors").write_bytes(b"not a safetensors file")
    model, _ = load_model(str(path))
    np.testing.assert_allclose(model(ids).logits.detach().numpy(), reference(ids).logits.detach().numpy(), atol=1e-4)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [cached.name]
    assert (cached / "model.safetensors").stat().st_size > 1000
    # another file is another key; EDGEKD_CACHE=off converts every time and keeps nothing
    with open(path, "ab") as f:
        f.write(b"\0" * 32)
    assert "gguf_file" in _load_kwargs(resolve_source(str(path)), False)[1]
    monkeypatch.setenv("EDGEKD_CACHE", "off")
    load_model(str(path))
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1


@requires_smollm2
@pytest.mark.smollm2
def test_packaged_smollm2_teacher():
    model, tok = load_model("smollm2-135m-instruct")
    facts = describe(model, tok, resolve_source("smollm2-135m-instruct"))
    assert (facts["layers"], facts["hidden_size"], facts["attention_heads"], facts["kv_heads"]) == (30, 576, 9, 3)
    assert facts["vocab_size"] == 49152 and facts["tied_embeddings"]
    assert round(facts["parameters"] / 1e6, 1) == 134.5
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
