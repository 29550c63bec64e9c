"""The distill folder as its readers see it (edgekd.distill.run.StudentRun): one place for the
file names, distill.json read into typed fields, bad files refused in one line."""

from __future__ import annotations

import json

import pytest

from edgekd.device.bundle import QatGrid
from edgekd.device.errors import UsageError
from edgekd.distill.run import StudentRun


def test_a_run_is_ours_then_stopped_then_complete(tmp_path):
    run = StudentRun(tmp_path)
    assert not run.is_ours() and not run.stopped_midway() and run.result() is None
    run.config_toml.write_text('teacher = "t"\n')  # a file of that name alone is not a run of ours
    assert not run.is_ours()
    from edgekd.device.outputs import DISTILL_TOML_MARKER

    run.config_toml.write_text(DISTILL_TOML_MARKER + '\nteacher = "t"\n')
    run.checkpoints.mkdir()
    assert run.is_ours() and run.stopped_midway() and not run.is_complete()
    (tmp_path / "data").mkdir()
    run.result_json.write_text(json.dumps({
        "teacher": "smollm2-135m-instruct", "heldout": "data/heldout.jsonl",
        "student": {"quantization_aware": {"bits": 4, "block_size": 32}}, "task": {"name": "sentiment"},
    }))
    result = run.result()
    assert result is not None and not run.stopped_midway()
    assert result.teacher == "smollm2-135m-instruct" and result.heldout == (tmp_path / "data" / "heldout.jsonl").resolve()
    assert result.quantization_aware == QatGrid(bits=4, block_size=32) and result.task == {"name": "sentiment"}
    run.result_json.write_text(json.dumps({"teacher": "t"}))  # an older run without the optional parts
    result = run.result()
    assert result is not None and result.heldout is None and result.task is None and result.quantization_aware is None


@pytest.mark.parametrize("text, says", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")])
def test_a_damaged_distill_json_is_one_line(tmp_path, text, says):
    (tmp_path / "distill.json").write_text(text)
    with pytest.raises(UsageError, match=says):
        StudentRun(tmp_path).result()


def test_a_malformed_qat_grid_is_refused_naming_its_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "distill.toml").write_text('out = "run"\n')
    (run / "distill.json").write_text(json.dumps({"student": {"quantization_aware": {"bits": "four", "block_size": 32}}}))
    with pytest.raises(UsageError, match="distill.json: quantization_aware must be a table"):
        StudentRun(run).result()
