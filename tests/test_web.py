"""The web target (issue 28): `edgekd export MODEL --target web` writes the folder transformers.js v4
loads with from_pretrained (onnx/model_q4.onnx, config.json's transformers.js_config, tokenizer and
chat template), keeps edgekd's manifest, golden reference and check.mjs in it, and refuses a model
a 32-bit WebAssembly heap cannot hold. transformers.js itself (from npm, `make js-deps`) loads a tiny
model's web bundle and generates edgekd's greedy tokens, on onnxruntime-node and on onnxruntime-web's
WebAssembly build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import build_model, build_tokenizer, save_model, tiny_llama_config

from edgekd.device.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
JS_MODULES = Path(os.environ.get("EDGEKD_JS_MODULES") or ROOT / ".cache" / "js" / "node_modules")
PROMPTS = ["Explain why the sky is blue, please.", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def web_bundle(tmp_path_factory) -> Path:
    from edgekd.export import export_bundle

    root = tmp_path_factory.mktemp("web")
    folder = save_model(build_model(tiny_llama_config(layers=2)), build_tokenizer(), root / "model")
    export_bundle(str(folder), "web", root / "bundle")
    return root / "bundle"


def test_a_web_bundle_is_the_folder_transformers_js_loads(web_bundle):
    import onnx

    from edgekd.device.bundle import read_manifest
    from edgekd.device.check import CheckConfig, check_bundle

    manifest = read_manifest(web_bundle, verify=True)
    assert manifest["model"]["file"] == "onnx/model_q4.onnx" and not (web_bundle / "model.onnx").exists()
    config = json.loads((web_bundle / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": "q4", "use_external_data_format": False}
    assert config["model_type"] == "llama"
    assert "{% for message in messages %}" in json.loads((web_bundle / "tokenizer_config.json").read_text())["chat_template"]
    assert {"golden.json", "check.mjs", "generation_config.json", "tokenizer.json"} <= {f["path"] for f in manifest["files"]}
    graph = onnx.load(str(web_bundle / "onnx" / "model_q4.onnx")).graph
    assert [i.name for i in graph.input][:5] == ["input_ids", "attention_mask", "position_ids",
                                                  "past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops  # 4-bit layers, which onnxruntime-web runs on WebAssembly and WebGPU alike
    # none of the two kernels that differ in a browser: GatherBlockQuantized (absent from the WebGPU
    # build's WebAssembly) and GroupQueryAttention (its WebGPU kernel answers otherwise)
    assert not ops & {"GatherBlockQuantized", "GroupQueryAttention"}
    report = check_bundle(web_bundle, CheckConfig(speed=False))  # edgekd's own replay works on it as on any bundle
    assert report.fidelity["reference"]["kl_mean"] < 0.01 and not report.problems


def test_the_web_target_refuses_a_model_over_the_webassembly_heap(tmp_path, monkeypatch):
    from edgekd.export import bundle as files
    from edgekd.export import export_bundle

    monkeypatch.setattr(files, "WASM_MODEL_LIMIT", 10_000)  # the tiny model stands for one over 2 GB
    folder = save_model(build_model(tiny_llama_config(layers=2)), build_tokenizer(), tmp_path / "model")
    with pytest.raises(UsageError, match=r"GB: a web bundle must stay under .* WebAssembly heap"):
        export_bundle(str(folder), "web", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()  # nothing half-written left behind


def test_a_transformers_js_profile_cannot_write_ort_or_external_data(tmp_path):
    from edgekd.export.profile import load_target

    p = tmp_path / "bad.toml"
    p.write_text('layout = "transformers.js"\nsteps = ["matmul_nbits", "to_ort"]\n')
    with pytest.raises(UsageError, match="drop to_ort"):
        load_target(p)


@pytest.mark.slow
@pytest.mark.skipif(not (JS_MODULES / "onnxruntime-web").is_dir() or not shutil.which("chromium"),
                    reason="needs chromium (apt-get install chromium) and onnxruntime-web (`make js-deps`)")
def test_a_web_bundle_replays_its_golden_in_chromium_on_webassembly_and_webgpu(web_bundle, tmp_path):
    """A real headless Chromium, the page served from localhost: WebAssembly, and WebGPU on
    SwiftShader's software adapter. Both must give what edgekd's own replay gives here."""
    import sys

    from edgekd.device.check import CheckConfig, check_bundle

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "browser_check.py"), str(web_bundle), "--num-prompts", "2",
                        "--webgpu", "--timeout", "400", "--json", str(tmp_path / "page.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: a gate of the random model fails; 2 would be a page that failed
    runs = json.loads((tmp_path / "page.json").read_text())["runs"]
    ours = check_bundle(web_bundle, CheckConfig(speed=False, num_prompts=2)).fidelity["reference"]
    for ep in ("wasm", "webgpu"):
        if ep == "webgpu" and "error" in runs[ep] and "adapter" in runs[ep]["error"]:
            continue  # no WebGPU adapter in this browser: a fact of the machine
        assert "error" not in runs[ep], runs[ep]
        assert runs[ep]["figures"]["kl_mean"] == pytest.approx(ours["kl_mean"], abs=1e-4), (ep, runs[ep]["figures"])
        assert runs[ep]["figures"]["top1"] == pytest.approx(ours["top1"]), ep


@pytest.mark.skipif(not (JS_MODULES / "@huggingface" / "transformers").is_dir() or not shutil.which("node"),
                    reason="needs node and @huggingface/transformers (`make js-deps`)")
@pytest.mark.parametrize("backend", ["node", "web"])
def test_transformers_js_answers_like_edgekd(web_bundle, backend):
    """from_pretrained on the folder, as an app does; the same prompt ids; the same greedy tokens."""
    from edgekd.device.runtime import Runtime

    rt = Runtime(web_bundle)
    ids = [rt.encode_prompt(p) for p in PROMPTS]
    n = 12
    r = subprocess.run(["node", str(ROOT / "js" / "transformersjs_greedy.mjs"), str(web_bundle), json.dumps(ids), str(n), backend],
                       env={**os.environ, "NODE_PATH": str(JS_MODULES)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    for prompt_ids, answer in zip(ids, theirs):
        ours = list(rt.generate_ids(prompt_ids, n, stop_at_eos=False))
        # transformers.js stops at an end-of-sequence token
        assert answer == ours[: len(answer)] and (len(answer) == n or answer[-1] in rt.eos_token_ids), (answer, ours)
