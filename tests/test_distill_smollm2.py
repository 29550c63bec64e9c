"""`edgekd distill` on the real teacher (SmolLM2-135M-Instruct) at small settings: the whole
road a user takes, from the packaged teacher to a loadable student that moved toward it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.teachers import load_model
from tests.conftest import requires_smollm2


@requires_smollm2
@pytest.mark.smollm2
@pytest.mark.slow
def test_distill_real_teacher_small(tmp_path):
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--out", str(out), "--max-prompts", "16", "--max-new-tokens", "32",
                                 "--max-heldout", "4", "--epochs", "3", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "distill.json").read_text())
    assert info["teacher"] == "smollm2-135m-instruct" and info["student"]["layers"] == [0, 6, 12, 18, 24, 29]
    before, after = info["metrics"]["before"], info["metrics"]["after"]
    # 12 steps move a 6-of-30-layer copy a long way (measured: top-1 0.00 -> 0.10, KL 12.7 -> 5.8)
    assert before["top1_agreement"] < 0.1 and after["top1_agreement"] >= before["top1_agreement"] + 0.04
    assert after["kl"] < 0.7 * before["kl"]
    held = [json.loads(line) for line in (out / info["heldout"]).read_text().splitlines()]
    assert len(held) == 4 and all(h["response"] for h in held)
    model, tok = load_model(str(out))
    assert model.config.num_hidden_layers == 6 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
