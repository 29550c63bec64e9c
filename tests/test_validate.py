"""`edgekd validate`, `generate` and `bench` as a user runs them: real bundles from the exporter,
real onnxruntime and PyTorch, the real CLI in a subprocess; exit codes and the files written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_smollm2, run_edgekd
from test_runtime import shared_fp32_bundle

from edgekd.device.errors import UsageError
from edgekd.device.fidelity import compare_greedy, compare_logits
from edgekd.device.gates import GATES, apply_gates

FAST = ["--num-prompts", "3", "--answer-tokens", "12"]


run = run_edgekd


def cli(*args: str) -> subprocess.CompletedProcess:
    """The same CLI in this process (Typer's CliRunner): same exit codes and output streams."""
    from typer.testing import CliRunner

    from edgekd.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def break_with_quantize_dynamic(good: Path, out: Path) -> Path:
    """What a user reaches for first, onnxruntime's dynamic int8 (docs/export.md: it breaks models),
    applied to a copy of the fp32 bundle, whose manifest is then re-written: a bundle that is
    internally consistent, so only measuring it against the reference can catch it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgekd.device.bundle import read_manifest, write_manifest

    shutil.copytree(good, out)
    quantize_dynamic(
        good / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul", "Gather"],
    )
    manifest = read_manifest(out, verify=False)
    manifest["recipe"] = manifest["recipe"] + [{"step": "quantize_dynamic", "per_channel": True}]
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_teacher_dir) -> dict[str, Path]:
    good = shared_fp32_bundle(tmp_path_factory, tiny_teacher_dir)
    return {"good": good, "broken": break_with_quantize_dynamic(good, tmp_path_factory.mktemp("validate") / "broken")}


def test_good_bundle_passes_and_writes_the_report(bundles, tmp_path):
    out = tmp_path / "report"
    r = cli("validate", bundles["good"], "--out", out, *FAST)  # no --data: the shipped held-out prompts
    assert r.returncode == 0, r.stderr
    assert "all gates pass" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["kl_along_answer.png", "kl_per_position.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    (b,) = report["bundles"]
    ref = b["fidelity"]["reference"]
    assert ref["top1"] == 1.0 and ref["kl_mean"] < 1e-6 and abs(ref["ppl_ratio"] - 1) < 1e-3
    assert ref["max_abs_logit_error"] < 1e-3 and ref["greedy_exact"] == 1.0 and ref["greedy_prefix_tokens"] == 12
    assert b["data"]["prompts"] == 3 and "shipped" in b["data"]["source"]
    assert b["data"]["answers_from"] == "each compared model's own greedy answers"
    # Exported straight from a model (no distill.json): the model is its own teacher.
    assert b["teacher"] == b["reference"] == str(Path(b["reference"]))
    assert {g["name"] for g in b["gates"]} == {
        "min_top1_vs_reference", "max_kl_vs_reference", "max_ppl_ratio_vs_reference",
        "min_greedy_prefix_vs_reference", "max_size_mb",
    }
    cost = b["cost"]
    assert cost["decode_tokens_per_s"] > 0 and cost["prefill_ms"] > 0 and cost["load_s"] > 0
    assert 10 < cost["peak_rss_mb"] < 250 and 0 < cost["size_mb"] <= cost["bundle_mb"]
    md = (out / "report.md").read_text()
    assert "| top-1 vs reference | 1.000 |" in md and f"Verdict: {bundles['good'].name}: PASS" in md and "Command: `edgekd validate " in md
    assert (out / "kl_per_position.png").read_bytes()[:4] == b"\x89PNG" == (out / "kl_along_answer.png").read_bytes()[:4]
    assert "![Where along the answer the bundle drifts](kl_along_answer.png)" in md
    # the report says where and on what it was measured, and how sure a small sample is
    assert b["environment"]["onnxruntime"] and b["environment"]["cpu"] and b["model_sha256"] and len(b["model_sha256"]) == 64
    lo, hi = ref["top1_ci95"]
    assert lo <= ref["top1"] <= hi and "95% intervals (over prompts; 3 prompts)" in md
    assert 0 < cost["size_vs_teacher_fp32"] and cost["teacher_fp32_mb"] > 0 and "of the teacher at fp32" in md


def test_broken_bundle_fails_naming_the_gate_side_by_side(bundles, tmp_path):
    out = tmp_path / "report"
    data = tmp_path / "data.jsonl"  # answers given: teacher-forced on them, no reference greedy needed for scoring
    pairs = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Explain why the sky is blue.", "Sunlight scatters off the air; blue scatters most."),
    ]
    data.write_text("\n".join(json.dumps({"prompt": p, "response": a}) for p, a in pairs) + "\n")
    r = cli("validate", bundles["good"], bundles["broken"], "--data", data, "--out", out, "--no-speed", *FAST)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "broken: min_top1_vs_reference" in err and f"{bundles['good'].name}:" not in err
    assert "Traceback" not in r.stderr
    assert (out / "size_vs_agreement.png").is_file()
    report = json.loads((out / "report.json").read_text())
    good, broken = report["bundles"]
    assert report["passed"] is False and good["passed"] is True and broken["passed"] is False
    assert broken["fidelity"]["reference"]["top1"] < 0.99 and broken["cost"]["size_mb"] < good["cost"]["size_mb"]
    assert good["data"]["answers_from"].endswith("(teacher-forced)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundles["good"] / "tokenizer.json"))
    scored = sum(min(12, len(tok.encode(a, add_special_tokens=False).ids)) for _, a in pairs)
    assert good["fidelity"]["reference"]["positions"] == broken["fidelity"]["reference"]["positions"] == scored


def test_teacher_with_another_tokenizer_is_refused(bundles, tmp_path, tokenizer, tiny_teacher_dir):
    other = shutil.copytree(tiny_teacher_dir, tmp_path / "other-teacher")
    tok = tokenizer.__class__.from_pretrained(str(other))
    tok.add_tokens(["<|tool_call|>", "zebra-token"])
    tok.save_pretrained(str(other))
    r = cli("validate", bundles["good"], "--teacher", other, "--out", tmp_path / "r", "--no-speed", *FAST)
    assert r.returncode == 2
    assert "different tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_changed_bundle_and_foreign_out_are_refused(bundles, tmp_path):
    copy = shutil.copytree(bundles["good"], tmp_path / "b")
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("<|im_end|>", "<|im_END|>"))
    r = cli("validate", copy, "--out", tmp_path / "r", "--no-speed")
    assert r.returncode == 2 and "does not match its manifest hash" in r.stderr
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    r = cli("validate", bundles["good"], "--out", foreign, "--no-speed")
    assert r.returncode == 2 and "holds no earlier report" in r.stderr
    assert (foreign / "todo.txt").read_text() == "mine"
    r = cli("validate", tmp_path)
    assert r.returncode == 2 and "not an edgekd bundle" in r.stderr


def test_cuda_bundle_on_a_machine_without_cuda_falls_back_with_a_message(bundles, tmp_path):
    import onnxruntime as ort

    from edgekd.device.bundle import read_manifest, write_manifest

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    copy = shutil.copytree(bundles["good"], tmp_path / "cuda")
    manifest = read_manifest(copy)
    manifest["target"]["execution_providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        r = cli("generate", copy, "What is the capital of France?", "-n", "6")
    assert r.returncode == 0, r.stderr
    assert "CUDAExecutionProvider is not in this onnxruntime build" in r.stderr and "falling back to CPUExecutionProvider" in r.stderr
    assert "tokens/s" in r.stderr


def test_generate_streams_and_refuses_bad_prompts(bundles):
    from edgekd.device.runtime import Runtime

    rt = Runtime(bundles["good"])
    expected = rt.generate("What is the capital of France?", max_new_tokens=10)
    r = cli("generate", bundles["good"], "What is the capital of France?", "--max-new-tokens", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "tokens/s" in r.stderr
    r = cli("generate", bundles["good"], "Hello", "-n", "8", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = cli("generate", bundles["good"], "  ")
    assert r.returncode == 2 and "the prompt is empty" in r.stderr
    r = cli("generate", bundles["good"], "The sea. " * 200)
    assert r.returncode == 2 and "context is 256" in r.stderr
    r = cli("generate", bundles["good"], "Hi", "--top-p", "0")
    assert r.returncode == 2 and "top-p" in r.stderr


def test_bench_reports_a_ratio_against_pytorch(bundles):
    r = cli("bench", bundles["good"], "--tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "PyTorch eager generate" in r.stdout and "edgekd runtime" in r.stdout
    assert "x" in r.stdout and "1.00x" in r.stdout


def test_data_comes_from_the_flag_the_manifest_or_the_shipped_prompts(tmp_path):
    from edgekd.device.data import choose_data, load_records

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "Hi?", "response": "Hello."}\n\n{"prompt": "Why?"}\n')
    assert choose_data(None, heldout=str(heldout))[0] == heldout
    assert choose_data(tmp_path / "x.jsonl", heldout=str(heldout))[1] == "--data"
    # --task's held-out prompts come after --data and before the manifest's split
    assert choose_data(None, task_heldout=tmp_path / "task.jsonl", heldout=str(heldout))[0] == tmp_path / "task.jsonl"
    assert choose_data(tmp_path / "x.jsonl", task_heldout=tmp_path / "task.jsonl")[0] == tmp_path / "x.jsonl"
    path, where, notes = choose_data(None, heldout=str(tmp_path / "gone.jsonl"))
    assert path.name == "heldout.jsonl" and "shipped" in where and "gone" in notes[0]
    assert len(load_records(path)) >= 8  # the default --num-prompts needs that many
    assert load_records(heldout) == [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Why?"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        load_records(bad)
    bad.write_text("{not json\n")
    with pytest.raises(UsageError, match="not a JSON line"):
        load_records(bad)


def test_validate_settings_record_keeps_earlier_stamps_valid():
    """The pipeline and the search record ValidateConfig; a field added later (task) is left out
    while unset, so what an earlier edgekd recorded still matches."""
    from edgekd.device.config import to_dict
    from edgekd.validate import ValidateConfig

    assert ValidateConfig().record() == {k: v for k, v in to_dict(ValidateConfig()).items() if k != "task"}
    assert ValidateConfig(task="sentiment").record()["task"] == "sentiment"
    with pytest.raises(UsageError, match="--answer-tokens must be >= 1"):
        ValidateConfig(answer_tokens=0)


def test_compare_logits_identical_and_shifted():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(5, 11)).astype(np.float32) for _ in range(3)]
    answers = [rng.integers(0, 11, size=5) for _ in range(3)]
    m, kl = compare_logits(logits, logits, answers)
    assert m["top1"] == 1.0 and m["kl_mean"] < 1e-12 and m["ppl_ratio"] == pytest.approx(1.0) and m["max_abs_logit_error"] == 0
    assert kl.shape == (15,)
    m, _ = compare_logits([x + 3.0 for x in logits], logits, answers)  # a constant shift: same distribution
    assert m["top1"] == 1.0 and m["kl_mean"] < 1e-9 and m["max_abs_logit_error"] == pytest.approx(3.0)
    flipped = [-x for x in logits]
    m, _ = compare_logits(flipped, logits, answers)
    assert m["top1"] == 0.0 and m["kl_mean"] > 0.5 and m["ppl_ratio"] > 1


def test_compare_greedy_counts_identical_answers_as_the_whole_budget():
    g = compare_greedy([[1, 2, 3], [1, 2, 9, 9], [5]], [[1, 2, 3], [1, 2, 3, 4], [6]], budget=10)
    assert g["greedy_exact"] == pytest.approx(1 / 3)
    assert g["greedy_prefix_tokens"] == pytest.approx((10 + 2 + 0) / 3)


def test_gates_directions_missing_values_and_unknown_names():
    report = {"fidelity": {"reference": {"top1": 0.95, "kl_mean": 0.01}, "teacher": None}, "cost": {"size_mb": 120.0}}
    results = {g.name: g for g in apply_gates(
        {"min_top1_vs_reference": 0.97, "max_kl_vs_reference": 0.02, "max_size_mb": 100, "min_top1_vs_teacher": 0.5,
         "max_ppl_ratio_vs_reference": None}, report)}
    assert not results["min_top1_vs_reference"].passed and results["max_kl_vs_reference"].passed
    assert not results["max_size_mb"].passed
    assert not results["min_top1_vs_teacher"].passed and results["min_top1_vs_teacher"].value is None
    assert "max_ppl_ratio_vs_reference" not in results
    with pytest.raises(UsageError, match="unknown gate"):
        apply_gates({"min_vibes": 1.0}, report)


def test_every_gate_of_the_target_profiles_is_known():
    from edgekd.device.targets import SHIPPED, Gates
    from edgekd.export.profile import load_target

    assert {f.name for f in __import__("dataclasses").fields(Gates)} == set(GATES)
    for name in SHIPPED:
        assert set(k for k, v in __import__("dataclasses").asdict(load_target(name).gates).items() if v is not None) <= set(GATES)


@requires_smollm2
@pytest.mark.smollm2
def test_validate_the_smollm2_teacher_cpu_bundle(tmp_path, smollm2_cpu_bundle):
    """The CI check: the real teacher exported for the cpu target, validated with light settings,
    scored as the sentiment task scores a student (--task: the teacher's own bundle on a user's job)."""
    bundle, _ = smollm2_cpu_bundle
    out = tmp_path / "report"
    r = run("validate", bundle, "--out", out, "--num-prompts", "4", "--answer-tokens", "12", "--task", "sentiment", timeout=900)
    assert r.returncode in (0, 1), r.stderr
    report = json.loads((out / "report.json").read_text())
    (b,) = report["bundles"]
    assert (r.returncode == 0) == report["passed"]
    ref = b["fidelity"]["reference"]
    # 8-bit weights with an int8 head: close to the fp32 model (benchmarks/RESULTS-export.md: top-1 0.97-0.98, KL < 0.01)
    assert ref["top1"] > 0.9 and ref["kl_mean"] < 0.05 and ref["ppl_ratio"] < 1.1
    assert b["reference"] == b["teacher"] == "smollm2-135m-instruct"
    assert b["cost"]["decode_tokens_per_s"] > 1 and b["cost"]["size_mb"] < 300
    assert b["data"]["source"] == "the held-out prompts of --task" and b["task"]["name"] == "sentiment"
    assert b["task"]["teacher_unlabelled"] < 4 and 0 <= b["task"]["label_agreement"] <= 1  # the teacher names a label
    assert "min_label_agreement_vs_teacher" in {g["name"] for g in b["gates"]}


def test_decode_roofline_counts_the_weights_a_decode_step_reads(tmp_path):
    """Issue 31: an embedding only gathered from is one row a token; a tied one the head reads counts whole."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.device.bundle import decode_weight_bytes
    from edgekd.device.speed import read_bandwidth, roofline

    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "emb")  # 3,200 bytes, gathered only
    head = numpy_helper.from_array(np.zeros((8, 50), np.float32), "head")  # 1,600 bytes, a MatMul reads it
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "head"], ["logits"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 50])],
        [emb, head])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert decode_weight_bytes(tmp_path / "m.onnx") == 1600
    tied = helper.make_graph([*graph.node, helper.make_node("MatMul", ["x", "emb"], ["y"])], "g", graph.input, graph.output, [emb, head])
    onnx.save(helper.make_model(tied), str(tmp_path / "t.onnx"))
    assert decode_weight_bytes(tmp_path / "t.onnx") == 4800
    r = roofline(50.0, 100_000_000, 20e9)  # 100 MB a token at 20 GB/s: 200 tokens/s at most
    assert r["decode_roofline_tokens_per_s"] == 200 and r["decode_roofline_share"] == 0.25
    assert roofline(50.0, None, 20e9) == {}
    assert read_bandwidth(threads=1, mib=8, repeats=1) > 1e8  # any machine reads 100 MB/s


def test_a_bundle_report_is_judged_and_round_trips_through_report_json():
    """The typed report validate and check both produce: its gates read its numbers by the metric
    table's paths, it says which failed, and report.json holds it whole (a command's own sections too)."""
    import json

    from edgekd.device.bundle_report import BundleReport

    report = BundleReport(bundle="/b", target="cpu", fidelity={"reference": {"top1": 0.99, "kl_mean": 0.001}}, cost={"size_mb": 10.0},
                          details={"golden": {"prompts": 4}})
    report.judge({"min_top1_vs_reference": 0.98, "max_size_mb": 5.0, "max_kl_vs_teacher": None})
    assert not report.passed and [g.name for g in report.failed] == ["max_size_mb"] and len(report.gates) == 2
    assert report.metric("fidelity", "reference", "top1") == 0.99 and report.metric("fidelity", "teacher", "top1") is None
    data = json.loads(json.dumps(report.to_json()))
    assert "name" not in data and "validated" not in data and data["golden"] == {"prompts": 4}
    assert BundleReport.from_json(data) == report
    report.problems.append("tokenized differently")
    report.judge({"min_top1_vs_reference": 0.98})
    assert not report.passed  # a problem fails the report whatever its gates say
