"""The runtime against PyTorch on a tiny model, and the bundle checks it makes before loading.

Bundles are made by the real exporter (``edgekd.export.export_bundle``) from a test profile with
no quantization step, so the ONNX model is fp32 and must match PyTorch exactly in greedy output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgekd.device.errors import UsageError
from edgekd.device.runtime import Runtime
from edgekd.device.sampling import Sampling, TextStream, pick_token

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "def add(a, b):"]

FP32_TARGET = """
description = "test: fp32, no quantization; strict gates (the bundle is the model)"
execution_providers = ["CPUExecutionProvider"]
steps = []
[gates]
min_top1_vs_reference = 0.99
max_kl_vs_reference = 0.001
max_ppl_ratio_vs_reference = 1.01
min_greedy_prefix_vs_reference = 8
max_size_mb = 50
"""


def write_target(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def export(model_dir: Path, target: Path, out: Path) -> Path:
    from edgekd.export import export_bundle

    export_bundle(str(model_dir), target, out)
    return out


def shared_fp32_bundle(tmp_path_factory, model_dir: Path) -> Path:
    """The fp32 bundle of ``model_dir``, exported once per test session and shared by the test
    files that import this (a fixture imported into another module would run twice)."""
    work = tmp_path_factory.getbasetemp() / f"fp32-bundle-of-{model_dir.name}"
    if not (work / "fp32" / "manifest.json").is_file():
        work.mkdir(exist_ok=True)
        export(model_dir, write_target(work, "fp32", FP32_TARGET), work / "fp32")
    return work / "fp32"


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, tiny_teacher_dir) -> Path:
    return shared_fp32_bundle(tmp_path_factory, tiny_teacher_dir)


@pytest.fixture(scope="module")
def rt(fp32_bundle) -> Runtime:
    return Runtime(fp32_bundle)


@pytest.fixture(scope="module")
def torch_model(tiny_teacher_dir):
    from edgekd.models import load_model

    return load_model(str(tiny_teacher_dir))


def test_greedy_matches_pytorch_generate(rt, torch_model):
    import torch

    model, _ = torch_model
    for prompt in PROMPTS:
        ids = rt.encode_prompt(prompt)
        ours = list(rt.generate_ids(ids, 24))
        if rt.last.stop_token is not None:
            ours.append(rt.last.stop_token)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(rt.eos_token_ids), pad_token_id=0)
        assert ours == gen[0, len(ids) :].tolist(), prompt
        assert rt.last.new_tokens >= 1


def test_score_through_kv_cache_matches_pytorch_logits(rt, torch_model):
    import torch

    model, _ = torch_model
    prompt = rt.encode_prompt(PROMPTS[0])
    answer = rt.tokenizer.encode("The capital of France is Paris.", add_special_tokens=False).ids
    ours = rt.score(prompt, answer)
    with torch.inference_mode():
        ref = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].numpy()
    assert ours.shape == ref.shape == (len(answer), rt.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_chat_template_matches_transformers(rt, tokenizer):
    for prompt in PROMPTS:
        expected = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        assert rt.format_prompt(prompt) == expected
        assert rt.encode_prompt(prompt) == tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )
    assert rt.format_prompt("hi", chat=False) == "hi"


def test_stream_joins_to_the_decoded_answer(rt):
    pieces = list(rt.stream(PROMPTS[1], max_new_tokens=20))
    ids = list(rt.generate_ids(rt.encode_prompt(PROMPTS[1]), 20))
    assert "".join(pieces) == rt.decode(ids)


def test_text_stream_never_splits_a_character(rt):
    ids = rt.tokenizer.encode("café déjà vu ✓ 日本", add_special_tokens=False).ids
    stream = TextStream(rt.tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == rt.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy(rt):
    ids = rt.encode_prompt(PROMPTS[0])
    sample = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a, b = list(rt.generate_ids(ids, 16, sample)), list(rt.generate_ids(ids, 16, sample))
    assert a == b
    greedy = list(rt.generate_ids(ids, 16))
    assert list(rt.generate_ids(ids, 16, Sampling(temperature=1.0, top_k=1, seed=3))) == greedy
    assert list(rt.generate_ids(ids, 16, Sampling(temperature=1.0, top_p=1e-9, seed=3))) == greedy


def test_pick_token_respects_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    seen = {pick_token(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(300)}
    assert seen == {0, 1}
    seen = {pick_token(logits, Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it: two tokens kept
    counts = np.bincount([pick_token(logits, Sampling(temperature=1.0), rng) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    with pytest.raises(UsageError, match="top-p"):
        Sampling(top_p=0.0)
    with pytest.raises(UsageError, match="temperature"):
        Sampling(temperature=-1)


def test_runtime_imports_neither_torch_nor_transformers(fp32_bundle):
    code = (
        "import sys\n"
        "from edgekd.device.runtime import Runtime\n"
        f"rt = Runtime({str(fp32_bundle)!r})\n"
        "text = rt.generate('What is the capital of France?', max_new_tokens=8)\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok', rt.last.new_tokens)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_empty_prompt_and_too_long_prompt_are_refused(rt):
    with pytest.raises(UsageError, match="empty"):
        rt.encode_prompt("   ")
    with pytest.raises(UsageError, match="context is 256"):
        rt.encode_prompt("The capital of France is Paris. " * 80)


def test_generation_stops_at_the_end_of_the_context(rt):
    ids = rt.tokenizer.encode("The capital of France is Paris. " * 30, add_special_tokens=False).ids[:250]
    out = list(rt.generate_ids(ids, 100, stop_at_eos=False))
    assert len(ids) + len(out) <= rt.context_length
    assert len(out) >= 5


def test_missing_provider_falls_back_to_cpu_with_a_warning(fp32_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider is not in this onnxruntime build"):
        r = Runtime(fp32_bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], verify=False)
    assert r.session.get_providers() == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in w and "falling back" in w for w in r.warnings)
    assert r.generate(PROMPTS[0], max_new_tokens=4) is not None


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not an edgekd bundle"):
        Runtime(tmp_path)
    with pytest.raises(UsageError, match="not a folder"):
        Runtime(tmp_path / "missing")


def test_a_changed_file_is_refused(fp32_bundle, tmp_path):
    copy = shutil.copytree(fp32_bundle, tmp_path / "b")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-100] ^= 0xFF  # one weight byte
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="does not match its manifest hash"):
        Runtime(copy)


def test_external_data_outside_the_bundle_is_refused(fp32_bundle, tmp_path):
    import onnx

    from edgekd.device.bundle import read_manifest, write_manifest

    copy = shutil.copytree(fp32_bundle, tmp_path / "b")
    model = onnx.load(str(copy / "model.onnx"))
    onnx.save(model, str(copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../outside.data"
    onnx.save(model, str(copy / "model.onnx"))
    manifest = read_manifest(copy, verify=False)
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    with pytest.raises(UsageError, match="escapes the bundle"):
        Runtime(copy)


def test_manifest_path_escaping_the_bundle_is_refused(fp32_bundle, tmp_path):
    copy = shutil.copytree(fp32_bundle, tmp_path / "b")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["file"] = "../fp32/model.onnx"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="escapes the bundle"):
        Runtime(copy)


def test_an_operator_this_onnxruntime_lacks_is_named_with_the_release_to_install():
    from edgekd.device.session import missing_operator

    line = missing_operator("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:Fatal error: "
                            "com.microsoft:MatMulNBits(-1) is not a registered function/op", "1.32.0")
    assert line is not None and "com.microsoft:MatMulNBits" in line and ">= 1.32.0 (the release the bundle was exported" in line
    assert "newer onnxruntime" in missing_operator("Could not find an implementation for FooBar(21) node with name 'x'")
    assert missing_operator("some other failure") is None


def test_a_bundle_with_an_unknown_operator_is_one_line(tmp_path, tiny_teacher_dir):
    """A real session refusing a real graph: what a device with an older onnxruntime sees."""
    import onnx
    from onnx import TensorProto, helper

    from edgekd.device.bundle import read_manifest, write_manifest
    from edgekd.device.errors import UsageError
    from edgekd.export import export_bundle

    profile = tmp_path / "fp32.toml"
    profile.write_text('steps = []\n', encoding="utf-8")
    bundle = tmp_path / "b"
    export_bundle(str(tiny_teacher_dir), profile, bundle, golden_prompts=0)
    g = helper.make_graph([helper.make_node("FooBarQuant", ["x"], ["y"], domain="com.microsoft")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              str(bundle / "model.onnx"))
    manifest = read_manifest(bundle, verify=False)
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    import onnxruntime

    with pytest.raises(UsageError, match=f"has no operator com.microsoft:FooBarQuant, which the bundle uses: install onnxruntime >= {onnxruntime.__version__}"):
        Runtime(bundle)
