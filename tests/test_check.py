"""`edgekd check`: a bundle measured against the golden reference it carries, without torch.

The torch-free run is real: a fresh interpreter whose import of torch, transformers, optimum and
onnx fails (as on a device with only the runtime installed) runs the CLI on a bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_model, save_model, tiny_llama_config
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.bundle import read_manifest, write_manifest
from edgekd.device.check import CheckConfig, _rest_kl, check_bundle
from edgekd.device.errors import UsageError
from edgekd.export import export_bundle

# Only the figures a tiny random model reproduces exactly through an fp32 bundle.
FP32_PROFILE = """
description = "fp32, for the check tests"
steps = []
[gates]
min_top1_vs_reference = 0.99
max_kl_vs_reference = 0.001
min_greedy_exact_vs_reference = 0.99
max_size_mb = 50
min_top1_vs_teacher = 0.5
"""

BLOCK_TOOLCHAIN = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "optimum", "onnx", "accelerate", "safetensors"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
from edgekd.cli import main
sys.argv = ["edgekd"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("check")
    profile = root / "fp32.toml"
    profile.write_text(FP32_PROFILE, encoding="utf-8")
    out = root / "bundle"
    export_bundle(str(tiny_teacher_dir), profile, out, golden_prompts=4)
    return out


def run_torch_free(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEKD_DEBUG": ""}
    return subprocess.run([sys.executable, "-c", BLOCK_TOOLCHAIN, *args], capture_output=True, text=True, env=env, timeout=300)


def test_golden_is_written_listed_and_shaped(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    assert "golden.json" in {e["path"] for e in manifest["files"]}
    golden = json.loads((fp32_bundle / "golden.json").read_text(encoding="utf-8"))
    assert golden["format"] == "edgekd-golden" and len(golden["examples"]) == 4 and golden["answer_tokens"] == 32
    replay = manifest["export_check"]["golden"]  # export replays it with the bundle at once
    assert replay["prompts"] == 4 and replay["greedy_exact"] == 1.0 and replay["top1"] == 1.0
    for ex in golden["examples"]:
        assert len(ex["topk_ids"]) == len(ex["answer_ids"]) <= 32
        assert all(row[0] == t for row, t in zip(ex["topk_ids"], ex["answer_ids"]))  # greedy: the answer is the top-1
        assert all(a >= b for row in ex["topk_logprobs"] for a, b in zip(row, row[1:]))


def test_check_passes_an_fp32_bundle_without_torch(fp32_bundle, tmp_path):
    report_file = tmp_path / "check.json"
    r = run_torch_free("check", str(fp32_bundle), "--no-speed", "--json", str(report_file))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all gates pass (4" in r.stdout and "min_top1_vs_teacher" in r.stdout  # a teacher gate: said, not checked
    report = json.loads(report_file.read_text(encoding="utf-8"))
    fid = report["fidelity"]["reference"]
    assert fid["top1"] == 1.0 and fid["greedy_exact"] == 1.0 and fid["kl_mean"] < 1e-6
    assert report["environment"]["torch"] is None and report["environment"]["onnxruntime"]
    assert report["not_checked"] == ["min_top1_vs_teacher"]


def test_session_config_entries_reach_onnxruntime_and_the_report(fp32_bundle, tmp_path):
    """`--session-config KEY=VALUE` (the setting that makes an ARM CPU's int8-activation kernel agree
    with x86's, docs/devices.md): applied to the session, recorded; a malformed entry is one line."""
    from edgekd.device.runtime import Runtime
    from edgekd.device.session import parse_session_config

    report_file = tmp_path / "check.json"
    r = run_torch_free("check", str(fp32_bundle), "--no-speed", "--json", str(report_file),
                       "--session-config", "mlas.disable_kleidiai=1", "--session-config", "session.intra_op.allow_spinning=0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(report_file.read_text(encoding="utf-8"))["environment"]["session_config"] == {
        "mlas.disable_kleidiai": "1", "session.intra_op.allow_spinning": "0"}
    bad = run_torch_free("check", str(fp32_bundle), "--no-speed", "--session-config", "mlas.disable_kleidiai")
    assert bad.returncode == 2 and "give KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_session_config(["=1"])
    assert Runtime(fp32_bundle, session_config={"mlas.disable_kleidiai": "1"}).session_config == {"mlas.disable_kleidiai": "1"}


def test_a_different_model_fails_the_check(fp32_bundle, tmp_path, tokenizer):
    """Another model's weights under the same golden (the manifest re-signed, as a broken recipe
    would ship them): top-1 and the greedy-answer gate fail, exit 1."""
    other = save_model(build_model(tiny_llama_config(layers=4), seed=7), tokenizer, tmp_path / "other")
    profile = tmp_path / "fp32.toml"
    profile.write_text(FP32_PROFILE, encoding="utf-8")
    export_bundle(str(other), profile, tmp_path / "other-bundle", golden_prompts=0)
    bundle = tmp_path / "bundle"
    __import__("shutil").copytree(fp32_bundle, bundle)
    (bundle / "model.onnx").write_bytes((tmp_path / "other-bundle" / "model.onnx").read_bytes())
    manifest = read_manifest(bundle, verify=False)
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    report = check_bundle(bundle, CheckConfig(speed=False))
    failed = {g.name for g in report.gates if not g.passed}
    assert {"min_top1_vs_reference", "min_greedy_exact_vs_reference"} <= failed and not report.passed
    r = CliRunner().invoke(app, ["check", str(bundle), "--no-speed"])
    assert r.exit_code == 1 and "min_greedy_exact_vs_reference" in r.output


def test_a_changed_golden_file_is_refused(fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    __import__("shutil").copytree(fp32_bundle, bundle)
    golden = json.loads((bundle / "golden.json").read_text(encoding="utf-8"))
    golden["examples"][0]["answer_ids"][0] += 1
    (bundle / "golden.json").write_text(json.dumps(golden), encoding="utf-8")
    r = run_torch_free("check", str(bundle), "--no-speed")
    assert r.returncode == 2 and "golden.json does not match its manifest hash" in r.stderr, r.stderr


def test_golden_data_is_the_users_prompts(tmp_path, tiny_teacher_dir):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "Numbers: 0 1 2 3"}\n{"prompt": "hello world question"}\n', encoding="utf-8")
    profile = tmp_path / "fp32.toml"
    profile.write_text(FP32_PROFILE, encoding="utf-8")
    export_bundle(str(tiny_teacher_dir), profile, tmp_path / "b", golden_data=data)
    golden = json.loads((tmp_path / "b" / "golden.json").read_text(encoding="utf-8"))
    assert [ex["prompt"] for ex in golden["examples"]] == ["Numbers: 0 1 2 3", "hello world question"]
    assert "mine.jsonl" in golden["prompts_from"]
    r = CliRunner().invoke(app, ["export", str(tiny_teacher_dir), "--target", str(profile), "--out", str(tmp_path / "c"),
                                 "--golden-data", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "missing.jsonl does not exist" in r.output and not (tmp_path / "c").exists()


def test_a_bundle_without_golden_says_re_export(tmp_path, tiny_teacher_dir):
    profile = tmp_path / "fp32.toml"
    profile.write_text(FP32_PROFILE, encoding="utf-8")
    export_bundle(str(tiny_teacher_dir), profile, tmp_path / "b", golden_prompts=0)
    r = run_torch_free("check", str(tmp_path / "b"))
    assert r.returncode == 2 and "no golden reference" in r.stderr and "re-export" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_toolchain_commands_say_what_to_install_without_torch(tmp_path):
    r = run_torch_free("distill", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "pip install 'edgekd[toolchain]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_rest_bucket_kl_is_a_lower_bound_of_the_full_kl():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        lp = rng.normal(size=50) * 3
        lq = lp + rng.normal(size=50)
        lp, lq = lp - np.log(np.exp(lp).sum()), lq - np.log(np.exp(lq).sum())
        full = float((np.exp(lp) * (lp - lq)).sum())
        top = np.argsort(-lp)[:5]
        assert 0.0 <= _rest_kl(np.exp(lp[top]), lq[top]) <= full + 1e-9
        assert abs(_rest_kl(np.exp(lp), lq) - full) < 1e-9  # the whole vocabulary: the KL itself


JS_MODULES = Path(os.environ.get("EDGEKD_JS_MODULES") or Path(__file__).resolve().parents[1] / ".cache" / "js" / "node_modules")


@pytest.mark.skipif(not (JS_MODULES / "onnxruntime-node").is_dir() or not __import__("shutil").which("node"),
                    reason="needs node and onnxruntime-node (`make js-deps`)")
def test_the_js_golden_replay_gives_the_figures_of_check(fp32_bundle, tmp_path):
    """Issue 28: check.mjs, in every bundle, replays golden.json in onnxruntime-node as `edgekd check` does."""
    import shutil

    assert "check.mjs" in {f["path"] for f in read_manifest(fp32_bundle)["files"]}  # hashed with the rest
    env = {**os.environ, "NODE_PATH": str(JS_MODULES)}

    def node(bundle: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["node", str(fp32_bundle / "check.mjs"), str(bundle), *args], env=env, capture_output=True, text=True, timeout=300)

    ours = check_bundle(fp32_bundle, CheckConfig(speed=False)).fidelity["reference"]
    r = node(fp32_bundle, "--json", str(tmp_path / "js.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    js = json.loads((tmp_path / "js.json").read_text())
    for key in ("positions", "top1", "greedy_exact", "greedy_prefix_tokens"):
        assert js["figures"][key] == pytest.approx(ours[key]), key
    for key in ("kl_mean", "ppl_ratio"):
        assert js["figures"][key] == pytest.approx(ours[key], abs=1e-5), key
    assert {g["name"] for g in js["gates"]} == {"min_top1_vs_reference", "max_kl_vs_reference", "min_greedy_exact_vs_reference", "max_size_mb"}
    # onnxruntime-web's WebAssembly kernels (a browser's CPU path), run in Node: the same figures
    if (JS_MODULES / "onnxruntime-web").is_dir():
        r = node(fp32_bundle, "--ort", "web", "--json", str(tmp_path / "web.json"))
        assert r.returncode == 0, r.stdout + r.stderr
        web = json.loads((tmp_path / "web.json").read_text())["figures"]
        assert web["top1"] == pytest.approx(ours["top1"]) and web["greedy_exact"] == pytest.approx(ours["greedy_exact"])
        assert web["kl_mean"] == pytest.approx(ours["kl_mean"], abs=1e-5)
    # a gate the replay fails is exit 1; a folder that is no bundle, exit 2 with one line
    strict = tmp_path / "strict"
    shutil.copytree(fp32_bundle, strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["target"]["gates"]["max_kl_vs_reference"] = -1.0
    (strict / "manifest.json").write_text(json.dumps(manifest))
    r = node(strict)
    assert r.returncode == 1 and "FAIL max_kl_vs_reference" in r.stdout, r.stdout + r.stderr
    r = node(tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "manifest.json is missing" in r.stderr
    # every listed file is checked against its manifest hash first, as `edgekd check` does
    changed = tmp_path / "changed"
    shutil.copytree(fp32_bundle, changed)
    golden = json.loads((changed / "golden.json").read_text(encoding="utf-8"))
    golden["examples"][0]["answer_ids"][0] += 1
    (changed / "golden.json").write_text(json.dumps(golden), encoding="utf-8")
    r = node(changed)
    assert r.returncode == 2 and "golden.json does not match its manifest hash" in r.stderr, r.stdout + r.stderr
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../outside.json"
    (strict / "manifest.json").write_text(json.dumps(manifest))
    r = node(strict)
    assert r.returncode == 2 and "is not a path inside the bundle" in r.stderr, r.stdout + r.stderr
