"""`edgekd distill` on the real teacher (SmolLM2-135M-Instruct) at small settings: the whole
road a user takes, from the packaged teacher to a loadable student that moved toward it."""

from __future__ import annotations

import json

import pytest
from conftest import requires_smollm2
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.models import load_model


@requires_smollm2
@pytest.mark.smollm2
@pytest.mark.slow
def test_distill_real_teacher_small(tmp_path):
    """The sentiment task at small settings: importance-chosen layers, teacher answers, a student
    that moved toward the teacher."""
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--task", "sentiment", "--out", str(out), "--student", "layers:8",
                                 "--max-prompts", "24", "--max-heldout", "8", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                                 "--calibration-records", "48"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "distill.json").read_text())
    assert info["teacher"] == "smollm2-135m-instruct" and info["task"]["name"] == "sentiment"
    calibration = info["task"]["calibration"]  # the task's label_prior: the real teacher's lean taken out
    assert calibration["method"] == "prior" and calibration["label_share_before"]["positive"] > 0.55
    assert abs(calibration["label_share_after"]["positive"] - 0.5) < 0.05
    assert info["task"]["answer_prefix"] == "The review is"
    layers, scan = info["student"]["layers"], info["student"]["scan"]
    # block influence: layer 0 turns the residual stream most, the last layer next (benchmarks/RESULTS-students.md, "Which layers matter")
    bi = scan["block_influence"]
    assert len(layers) == 8 and {0, 29} <= set(layers) and bi[0] == max(bi)
    before, after = info["metrics"]["before"], info["metrics"]["after"]
    assert after["top1_agreement"] >= before["top1_agreement"] + 0.1
    assert after["kl"] < 0.7 * before["kl"]
    held = [json.loads(line) for line in (out / info["heldout"]).read_text().splitlines()]
    assert len(held) == 8 and all(h["response"] for h in held)
    model, tok = load_model(str(out))
    assert model.config.num_hidden_layers == 8 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
