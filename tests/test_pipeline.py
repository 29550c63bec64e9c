"""`edgekd run pipeline.toml` on tiny models: distill -> export (two targets) -> validate, then a
rerun that skips every completed stage, and an edit that redoes only the stages below it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.errors import UsageError
from edgekd.device.paths import resource
from edgekd.pipeline import load_pipeline, run_pipeline

PROFILE = """
description = "tiny cpu"
steps = ["quantize_head_embedding", "matmul_nbits"]
[matmul_nbits]
bits = 8
[gates]
min_top1_vs_reference = {top1}
"""


def test_shipped_example_parses():
    cfg = load_pipeline(resource("examples/pipeline-smollm2.toml"))
    assert cfg.distill is not None and cfg.distill.task == "sentiment" and cfg.distill.student == "layers:22+mlp:0.5"  # the task's default
    assert [e.target for e in cfg.export] == ["cpu", "mobile", "cuda"] and cfg.distill.qat_bits == 4
    assert not any(e.search for e in cfg.export)  # the qat student needs no search: both profiles reproduce it
    assert cfg.validate.missing_provider == "skip"


@pytest.mark.parametrize(
    "text, message",
    [
        ('model = "m"\n[[export]]\ntarget = "cpu"\nout = "b"\nsearch = "yes"\n', "export[0].search must be true or false"),
        ('model = "m"\n[[export]]\ntarget = "cpu"\nout = "b"\ncolour = 1\n', "unknown key 'export[0].colour'"),
        ('model = "m"\n[validate]\nmissing_provider = "ignore"\n', "validate.missing_provider = 'ignore' is not one of"),
        ('[[export]]\ntarget = "cpu"\nout = "b"\n', "give either model"),
        ('model = "m"\n[distill]\nout = "s"\n', "give either model"),
        ('[distill]\nout = "s"\nepochz = 1\n', "unknown key 'distill.epochz'"),
        ('model = "m"\n[[export]]\ntarget = "cpu"\nout = "b"\n[[export]]\ntarget = "mobile"\nout = "b"\n', "the same out"),
    ],
)
def test_bad_pipeline_files_are_one_line_usage_errors(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as e:
        load_pipeline(path)
    assert "\n" not in str(e.value) and (str(path) in str(e.value) or "give either" in str(e.value) or "same out" in str(e.value))


def statuses(results) -> list[tuple[str, str, str]]:
    return [(r.stage, Path(r.name).name, r.status) for r in results]


def test_rerun_skips_completed_stages_and_redoes_what_an_edit_changed(tmp_path, tiny_teacher_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths in a pipeline are relative to where it runs
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Write about the {w}."}) + "\n"
                                                    for w in ["sea", "stars", "wind", "Paris", "Rome", "sky"] * 2))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about the {w}."}) + "\n"
                                                    for w in ["sea", "blue", "numbers"]))
    (tmp_path / "tiny-cpu.toml").write_text(PROFILE.format(top1=0.5))
    (tmp_path / "pipeline.toml").write_text(f"""
[distill]
out = "run/student"
teacher = "{tiny_teacher_dir}"
student = "layers:2"
prompts = "prompts.jsonl"
heldout = "heldout.jsonl"
max_new_tokens = 8
epochs = 1
batch_size = 4
[[export]]
target = "tiny-cpu.toml"
out = "run/cpu"
[[export]]
target = "cuda"
out = "run/cuda"
[validate]
num_prompts = 2
answer_tokens = 8
speed = false
""")
    r = CliRunner().invoke(app, ["run", "pipeline.toml"])
    assert r.exit_code == 0, r.output
    table = r.output[r.output.index("pipeline pipeline.toml"):]
    assert [line.split("│")[3].strip() for line in table.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()] \
        == ["ran", "ran", "ran", "ran", "skipped"]  # distill, export cpu, validate cpu, export cuda, validate cuda
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"student", "cpu", "cpu-report", "cuda"}
    assert json.loads((tmp_path / "run/cpu-report/report.json").read_text())["passed"]
    weights = tmp_path / "run/student/model.safetensors"
    mtimes = {p: p.stat().st_mtime_ns for p in [weights, tmp_path / "run/cpu/manifest.json", tmp_path / "run/cpu-report/report.json"]}

    # A rerun does nothing: every stage is up to date (the cuda validation is still skipped).
    again = run_pipeline(tmp_path / "pipeline.toml")
    assert statuses(again) == [("distill", "student", "up to date"), ("export", "cpu", "up to date"),
                               ("validate", "cpu-report", "up to date"), ("export", "cuda", "up to date"),
                               ("validate", "cuda-report", "skipped")]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # An edit to one target's profile redoes that export and its validation, nothing else.
    (tmp_path / "tiny-cpu.toml").write_text(PROFILE.format(top1=0.6))
    plan = run_pipeline(tmp_path / "pipeline.toml", dry_run=True)
    assert statuses(plan)[:3] == [("distill", "student", "up to date"), ("export", "cpu", "would run"),
                                  ("validate", "cpu-report", "would run")]
    edited = run_pipeline(tmp_path / "pipeline.toml")
    assert statuses(edited) == [("distill", "student", "up to date"), ("export", "cpu", "ran"),
                                ("validate", "cpu-report", "ran"), ("export", "cuda", "up to date"),
                                ("validate", "cuda-report", "skipped")]
    assert "the target profile changed" in edited[1].detail and edited[2].passed
    assert weights.stat().st_mtime_ns == mtimes[weights]
    manifest = json.loads((tmp_path / "run/cpu/manifest.json").read_text())
    assert manifest["target"]["gates"]["min_top1_vs_reference"] == 0.6

    # An edit to the distillation's data redoes everything below it (dry run: nothing is touched).
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Write about the wind."}) + "\n")
    plan = run_pipeline(tmp_path / "pipeline.toml", dry_run=True)
    assert [s for _, _, s in statuses(plan)] == ["would run"] * 4 + ["skipped"]
    assert weights.stat().st_mtime_ns == mtimes[weights]
