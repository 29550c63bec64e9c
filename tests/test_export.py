"""`edgekd export` end to end on a tiny random Llama, for every shipped profile.

Each bundle is checked the way an app would use it: the exact files, the manifest's hashes, an
onnxruntime session that runs a prompt and a cached decode step, logits close to PyTorch within
the profile's tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.bundle import QatGrid, check_external_data, read_manifest
from edgekd.device.config import to_dict
from edgekd.device.errors import EdgekdError, UsageError
from edgekd.device.targets import SHIPPED
from edgekd.export import export_bundle, source_info
from edgekd.export.onnx import model_facts, ort_forward, session
from edgekd.export.profile import load_target
from edgekd.models import load_model, resolve_source

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
CONFIG_FILES = {"config.json", "generation_config.json", "genai_config.json", "manifest.json", "golden.json"}
REPLAY_FILES = {"check.mjs"}  # the golden replay in JavaScript (issue 28)
TEXT = "Write a short poem about the sea. The capital of Italy is Rome."


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_teacher_dir) -> dict[str, Path]:
    """The model each profile exports. For mobile's 4-bit recipe, the tiny teacher baked onto the
    grid `edgekd distill` trains on by default (--qat-bits 4 --qat-head-bits 8): the path a
    distilled student takes. Random weights off the grid lose too much at 4 bits to compare argmaxes."""
    from edgekd.quant import attach_fake_quantize, bake_fake_quantize

    model, tok = load_model(str(tiny_teacher_dir))
    attach_fake_quantize(model, 4, 32, head_bits=8)
    bake_fake_quantize(model)
    grid = tmp_path_factory.mktemp("grid-teacher")
    model.save_pretrained(grid, safe_serialization=True)
    tok.save_pretrained(grid)
    return {name: grid if name in ("mobile", "web") else Path(tiny_teacher_dir) for name in SHIPPED}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, sources) -> dict[str, Path]:
    """One bundle per shipped profile; the cpu one through the real CLI."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name in SHIPPED:
        out[name] = root / name
        if name == "cpu":
            result = CliRunner().invoke(app, ["export", str(sources[name]), "--target", "cpu", "--out", str(out[name])])
            assert result.exit_code == 0, result.output
            assert "wrote" in result.output and "edgekd validate" in result.output
        else:
            export_bundle(str(sources[name]), name, out[name])
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_bundle_files_and_manifest(bundles, sources, name):
    tiny_teacher_dir = sources[name]
    root = bundles[name]
    manifest = read_manifest(root, verify=True)  # every file present with its size and SHA-256
    model_file = {"mobile": "model.ort", "web": "onnx/model_q4.onnx"}.get(name, "model.onnx")
    # an ORT-format bundle carries the operator lists onnxruntime's reduced-size (Android) build reads
    reduced = {"required_operators.config", "required_operators_and_types.config"} if name == "mobile" else set()
    # the cpu profile keeps the weights beside the graph, for onnxruntime to map them from disk
    model_files = {model_file} | ({model_file + ".data"} if load_target(name).external_data else set())
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == \
        TOKENIZER_FILES | CONFIG_FILES | REPLAY_FILES | model_files | reduced
    assert {f["path"] for f in manifest["files"]} == TOKENIZER_FILES | CONFIG_FILES - {"manifest.json"} | REPLAY_FILES | model_files | reduced
    if reduced:
        ops = (root / "required_operators.config").read_text()
        assert "com.microsoft;1;" in ops and "MatMulNBits" in ops and "GroupQueryAttention" in ops and str(root) not in ops

    assert manifest["target"] == to_dict(load_target(name))
    assert manifest["target"]["gates"]["min_top1_vs_reference"] is not None
    assert [r["step"] for r in manifest["recipe"]] == ["export", *load_target(name).steps]
    src = manifest["source"]
    assert src["spec"] == str(Path(tiny_teacher_dir).resolve()) and src["kind"] == "folder"
    assert src["sha256"] == resolve_source(str(tiny_teacher_dir)).fingerprint()
    assert src["teacher"] == src["spec"] and src["heldout"] is None  # not distilled: its own teacher

    m = manifest["model"]
    assert m["file"] == model_file and m["opset"] == 17
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"], m["vocab_size"]) == (4, 2, 16, 384)
    assert m["eos_token_ids"] == [2] and m["pad_token_id"] is not None
    inputs = {i["name"]: i for i in m["inputs"]}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.3.value"]["dtype"] == "float32"  # fp32 I/O, also for cuda's fp16
    assert inputs["past_key_values.0.key"]["shape"] == ["batch_size", 2, "past_sequence_length", 16]
    assert [o["name"] for o in m["outputs"]][:2] == ["logits", "present.0.key"]
    assert manifest["export_check"]["fp32_max_abs_logit_diff"] < 1e-3
    fused = [r for r in manifest["recipe"] if r["step"] == "fuse_attention"]
    if fused:  # cpu and mobile: one GroupQueryAttention a layer; the tiny model's context is under the cap
        assert fused[0]["fused_layers"] == 4 and m["context_length"] == 256

    genai = json.loads((root / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    assert dec["filename"] == model_file and dec["num_hidden_layers"] == 4 and dec["head_size"] == 16
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["search"]["past_present_share_buffer"] is False
    assert "{% for message in messages %}" in (root / "chat_template.jinja").read_text()
    if model_file.endswith(".onnx"):
        check_external_data(root / model_file)


@pytest.mark.parametrize("name", SHIPPED)
def test_bundle_runs_close_to_pytorch(bundles, sources, name):
    """Prompt + 3 cached decode steps in onnxruntime against PyTorch on a text the probe did not use."""
    import torch

    model, tok = load_model(str(sources[name]))
    manifest = read_manifest(bundles[name])
    sess = session(bundles[name] / manifest["model"]["file"], ["CPUExecutionProvider"])
    facts = model_facts(model.config)
    ids = np.asarray([tok(TEXT)["input_ids"]], dtype=np.int64)
    logits, past = ort_forward(sess, ids, None, facts)
    got, want = [logits], []
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), use_cache=True)
        want.append(out.logits.numpy())
        kv = out.past_key_values
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=kv, use_cache=True)
            kv = out.past_key_values
            want.append(out.logits.numpy())
            logits, past = ort_forward(sess, nxt.numpy(), past, facts)
            got.append(logits)
    got, want = np.concatenate(got, 1), np.concatenate(want, 1)
    assert got.shape == want.shape
    tol = load_target(name).check.max_abs_logit_diff
    assert np.abs(got - want).max() <= tol
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def test_cpu_bundle_quantizes_head_and_embedding_once(bundles):
    import onnx

    model = onnx.load(str(bundles["cpu"] / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # the tied int8 matrix, stored once: the head reads it (int8 activations), the embedding and the
    # head's exact rescoring of its top 20 gather rows of it
    assert ops.count("GatherBlockQuantized") == 2 and ops.count("TopK") == 1 and "MatMul" not in [
        n.op_type for n in model.graph.node if any(i.endswith("weight") for i in n.input)
    ]
    vocab_rows = [t for t in model.graph.initializer if t.dims and t.dims[0] == 384]
    assert sorted((t.name, t.data_type, list(t.dims)) for t in vocab_rows) == [  # stored once: 384 x 64 bytes
        ("shared_embedding.q8", onnx.TensorProto.UINT8, [384, 2, 32])]
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64
                   for t in model.graph.initializer)  # no fp32 weight matrix left (the rotary tables are folded at load)


def test_cuda_bundle_is_fp16(bundles):
    import onnx

    model = onnx.load(str(bundles["cuda"] / "model.onnx"))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_existing_out_is_refused_before_work(bundles, tiny_teacher_dir):
    result = CliRunner().invoke(app, ["export", str(tiny_teacher_dir), "--target", "cpu", "--out", str(bundles["cpu"])])
    assert result.exit_code == 2
    assert "exists and is not empty: pass --overwrite" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model", "--target", "cpu"], "does not exist"),
        (["{teacher}", "--target", "gpu"], "neither a shipped profile"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, tiny_teacher_dir, args, message):
    args = [a.format(teacher=tiny_teacher_dir) for a in args]
    result = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_unsupported_architecture_is_named(tmp_path, tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    folder = tmp_path / "bert"
    cfg = BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, is_decoder=True)
    BertLMHeadModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(UsageError, match="BertLMHeadModel.*cannot be exported") as e:
        export_bundle(str(folder), "cpu", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_drift_beyond_tolerance_fails_and_leaves_nothing(tmp_path, tiny_teacher_dir):
    profile = tmp_path / "strict.toml"
    profile.write_text('steps = ["quantize_dynamic"]\n[check]\nmax_abs_logit_diff = 1e-9\n')
    with pytest.raises(EdgekdError, match="drifts from PyTorch"):
        export_bundle(str(tiny_teacher_dir), profile, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [profile]  # no bundle, no partial folder


def test_source_info_reads_distill_json(tmp_path, tiny_student_dir):
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(tiny_student_dir, folder)
    grid = {"bits": 4, "block_size": 32, "head_bits": 8, "grid": "symmetric", "linear_layers": 7}
    (folder / "distill.json").write_text(json.dumps({"teacher": "smollm2-135m-instruct", "heldout": "heldout.jsonl",
                                                     "student": {"quantization_aware": grid}}))
    info = source_info(resolve_source(str(folder)))
    assert info["teacher"] == "smollm2-135m-instruct"
    assert info["quantization_aware"] == QatGrid(4, 32, 8, "symmetric", 7)  # typed from distill.json to the manifest
    assert info["heldout"] == str((folder / "heldout.jsonl").resolve())
    assert info["spec"] == str(folder.resolve())


def test_fused_attention_caps_the_context_at_its_rotary_tables(tmp_path, tiny_teacher_dir):
    """GroupQueryAttention reads positions from its cos/sin tables: the bundle's context (manifest,
    genai_config) ends where they end, so the runtime refuses a longer prompt instead of failing in it."""
    import dataclasses

    from edgekd.export import export_bundle
    from edgekd.export.steps.fuse_attention import FuseAttention

    profile = dataclasses.replace(load_target("cpu"), steps=("fuse_attention",), candidates=()).with_settings(
        fuse_attention=FuseAttention(max_positions=64))
    manifest = export_bundle(str(tiny_teacher_dir), profile, tmp_path / "b", golden_prompts=0)
    assert manifest["model"]["context_length"] == 64
    genai = json.loads((tmp_path / "b" / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 64


def test_fused_attention_keeps_a_sliding_window_past_the_window(tmp_path, tokenizer):
    """A sliding-window model (Mistral, window 8) fuses with the window in the kernel
    (GroupQueryAttention's local_window_size): its bundle answers as PyTorch does on a prompt three
    windows long and on cached steps after it, and its context is not cut at the window."""
    import numpy as np
    import torch
    from conftest import save_model, tiny_llama_config
    from transformers import MistralConfig, MistralForCausalLM

    from edgekd.export import export_bundle
    from edgekd.export.onnx import model_facts, ort_forward, session

    cfg = MistralConfig(**{k: v for k, v in tiny_llama_config(layers=2).to_dict().items()
                           if k in MistralConfig().to_dict() and k not in ("architectures", "model_type")}, sliding_window=8)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    src = save_model(model, tokenizer, tmp_path / "mistral")
    manifest = export_bundle(str(src), "cpu", tmp_path / "b", golden_prompts=0)
    fused = next(r for r in manifest["recipe"] if r["step"] == "fuse_attention")
    assert fused["fused_layers"] == 2 and fused["sliding_window_layers"] == 2
    assert manifest["model"]["context_length"] > 8
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        full = model(torch.cat([ids, ids[:, :6]], dim=1)).logits.numpy()
    sess = session(tmp_path / "b" / "model.onnx")
    logits, past = ort_forward(sess, ids.numpy(), None, model_facts(cfg))
    steps = [logits]
    for t in ids[0, :6].tolist():  # cached steps, each past the window
        logits, past = ort_forward(sess, np.array([[t]]), past, model_facts(cfg))
        steps.append(logits)
    got = np.concatenate(steps, axis=1)
    assert np.abs(got - full).max() < 0.05  # the cpu target's 8-bit weights; a wrong window is off by whole logits
    assert (got.argmax(-1) == full.argmax(-1)).mean() > 0.9


def test_the_export_summary_names_gguf_weights_it_could_not_keep(bundles):
    """A GGUF weight of a type with no exact home (an IQ type) is named in one warning line with
    the quantizer that took it; the kept ones are counted by type."""
    from edgekd.device.bundle import read_manifest
    from edgekd.export.summary import summary

    manifest = read_manifest(bundles["cpu"])
    step = next(r for r in manifest["recipe"] if r["step"] == "matmul_nbits")
    step.update(kept_on_grid_matmuls=2, grid_offset_matmuls=0, kept_gguf_types={"Q5_0": 2, "Q8_0": 1},
                gguf_types_not_kept={"/model/layers.3/mlp/down_proj/MatMul": ["IQ2_XS"]})
    lines, warnings = summary(manifest, bundles["cpu"])
    assert any("their GGUF grids (3 GGUF tensors: 2 Q5_0, 1 Q8_0)" in line for line in lines)
    assert warnings == [f"1 GGUF weights have no exact home in MatMulNBits and were re-quantized by the profile "
                        f"({step['bits']}-bit {step['algorithm']}): model.layers.3.mlp.down_proj (IQ2_XS)"]
