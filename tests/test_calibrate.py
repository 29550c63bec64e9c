"""Calibrated teacher labels (edgekd/distill/calibrate.py): the fits on scores whose lean is known,
the head bias every teacher pass reads, and a tiny teacher whose label logits lean, distilled with
the correction restoring the labels it should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, save_model, tiny_llama_config

from edgekd.device.errors import UsageError
from edgekd.distill import calibrate as cal


def leaning_scores(n: int = 2000, lean: float = 1.5, seed: int = 0):
    """Two labels; the truth is label 0 on half the rows; the teacher's score ranks well (z0 - z1 ~
    +-1.5 + noise) but leans ``lean`` nats toward label 0."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    s = np.where(truth == 0, 1.5, -1.5) + rng.normal(0, 1.0, n) + lean
    z = np.stack([s / 2, -s / 2], 1) + rng.normal(0, 0.1, (n, 1))  # a common shift per row changes nothing
    return z, truth


def test_prior_fit_splits_the_decisions_as_declared_and_restores_accuracy():
    z, truth = leaning_scores()
    before = cal.shares(z, np.zeros(2), ["a", "b"])
    assert before["a"] > 0.7  # the lean
    b = cal.fit_prior(z, [0.5, 0.5])
    after = cal.shares(z, b, ["a", "b"])
    assert abs(after["a"] - 0.5) < 0.002
    acc = lambda bias: np.mean(np.argmax(z + bias, 1) == truth)  # noqa: E731
    assert acc(np.zeros(2)) < 0.80 and acc(b) > 0.90
    # the correction undoes the lean: b0 - b1 near -lean
    assert abs((b[0] - b[1]) + 1.5) < 0.2


def test_label_fit_recovers_the_lean_and_keeps_the_mass_on_the_labels():
    z, truth = leaning_scores(lean=-1.0, seed=1)
    b = cal.fit_labels(z, truth)
    assert abs((b[0] - b[1]) - 1.0) < 0.15
    lse = lambda a: np.logaddexp.reduce(a, axis=1)  # noqa: E731
    assert abs(np.mean(lse(z + b)) - np.mean(lse(z))) < 1e-9  # centred: mass moved between labels only


def test_three_labels_reach_their_prior():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1, (3000, 3)) + np.array([1.0, 0.0, -0.5])
    b = cal.fit_prior(z, [0.2, 0.3, 0.5])
    after = cal.shares(z, b, ["x", "y", "w"])
    assert after == pytest.approx({"x": 0.2, "y": 0.3, "w": 0.5}, abs=0.02)


def test_auc_counts_pairs_and_half_ties():
    score = np.array([3.0, 2.0, 2.0, 1.0, 0.0])
    positive = np.array([True, True, False, False, True])
    pairs = [(p, q) for p in score[positive] for q in score[~positive]]
    brute = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
    assert cal.auc(score, positive) == pytest.approx(brute)


def test_fit_records_its_figures_and_refuses_what_it_cannot_fit():
    z, truth = leaning_scores(n=400)
    truths = ["pos" if t == 0 else "neg" for t in truth]
    c = cal.fit("labels", ["pos", "neg"], [(5,), (7,)], z, truths=truths)
    assert c.truth["accuracy_calibrated"] > c.truth["accuracy_bare"] and c.truth["auc"] > 0.9
    again = cal.Calibration.from_record(json.loads(json.dumps(c.record())))
    assert again.bias == pytest.approx(c.bias, abs=1e-4) and again.token_ids == ((5,), (7,))
    with pytest.raises(UsageError, match="label_prior"):
        cal.fit("prior", ["pos", "neg"], [(5,), (7,)], z)
    with pytest.raises(UsageError, match="'label'"):
        cal.fit("labels", ["pos", "neg"], [(5,), (7,)], z, truths=[None] * len(z))


def test_the_calibrated_head_moves_only_the_label_rows_and_is_removed_after(tokenizer):
    model = build_model(tiny_llama_config(layers=1))
    ids = torch.tensor([[5, 9, 11]])
    bare = model(input_ids=ids).logits
    c = cal.Calibration("prior", ("a", "b"), (0.7, -0.3), ((10, 12), (20,)), 8, {}, {})
    with cal.calibrated(model, c):
        shifted = model(input_ids=ids).logits
    assert model.get_output_embeddings().bias is None
    delta = (shifted - bare)[0, -1]
    expected = torch.zeros_like(delta)
    expected[[10, 12]], expected[20] = 0.7, -0.3
    assert torch.allclose(delta, expected, atol=1e-5)


LABELS = ["capital", "poem"]  # one token each (" capital", " poem") in the test tokenizer
WORDS = ["sea", "stars", "wind", "Paris", "Rome", "blue", "sky", "numbers", "teacher", "student", "night", "question"]


def leaning_teacher(tokenizer, prompts: list[str], folder: Path) -> list[str]:
    """A tiny teacher whose first answer token is always a label, ranked by one direction of its
    last hidden state but leaning ~3 nats toward "capital". Returns the truth per prompt: its
    ranking cut at the median (a teacher whose order is right and whose cut is not)."""
    from edgekd.distill.data import prompt_text
    from edgekd.distill.loop import label_token_groups

    model = build_model(tiny_llama_config(layers=2, tie_word_embeddings=False))
    with torch.no_grad():
        h = torch.stack([model.model(input_ids=torch.tensor([tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]]))
                         .last_hidden_state[0, -1] for p in prompts])
        mean = h.mean(0)
        direction = torch.linalg.svd(h - mean, full_matrices=False).Vh[0]
        proj = (h - mean) @ direction
        spread = 2.0 / proj.std()  # the score's spread: about 2 nats a standard deviation
        head = model.lm_head.weight
        head.mul_(0.01)
        common = mean / mean.dot(mean)  # a row r = c * common adds about c nats to every prompt's logit
        cap, poem = label_token_groups(tokenizer, LABELS)
        head[list(cap)] = spread / 2 * direction + 12.0 * common + 3.0 * common  # the lean: +3 nats for "capital"
        head[list(poem)] = -spread / 2 * direction + 12.0 * common
        score = (h @ head[cap[0]]) - (h @ head[poem[0]])  # the teacher's ranking
    save_model(model, tokenizer, folder)
    median = score.median()
    return ["capital" if v > median else "poem" for v in score.tolist()]


def first_labels(tokenizer, run: Path) -> list[str | None]:
    """The label each training answer of a distill run opens with (its first token's)."""
    from edgekd.distill.loop import label_token_groups

    groups = label_token_groups(tokenizer, LABELS)
    rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    return [next((label for label, ids in zip(LABELS, groups) if r["answer_ids"][0] in ids), None) for r in rows]


def test_a_leaning_teacher_is_calibrated_before_it_teaches(tokenizer, tmp_path):
    from edgekd.distill.config_io import resolve
    from edgekd.distill.trainer import distill

    pairs = [f"Tell me about the {a} and the {b}" for a in WORDS for b in WORDS if a != b]
    train, held = pairs[:80], pairs[80:96]
    truth = leaning_teacher(tokenizer, train + held, tmp_path / "teacher")
    truth, held_truth = truth[: len(train)], truth[len(train) :]
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.toml").write_text('description = "which word"\nlabels = ["capital", "poem"]\nlabel_prior = [0.5, 0.5]\n')
    (task / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (task / "heldout.jsonl").write_text("".join(json.dumps({"prompt": p, "label": t}) + "\n" for p, t in zip(held, held_truth)))
    flags = dict(teacher=str(tmp_path / "teacher"), task=str(task), out=str(tmp_path / "run"), student="layers:1",
                 max_new_tokens=3, max_steps=1, batch_size=8, gen_temperature=0.0, qat_bits=0, calibration_records=80)
    result = distill(resolve(None, flags))
    record = result["task"]["calibration"]
    assert record["method"] == "prior" and record["fit_records"] == 80
    assert record["label_share_before"]["capital"] > 0.7  # the lean
    assert record["label_share_after"]["capital"] == pytest.approx(0.5, abs=0.02)
    said = first_labels(tokenizer, tmp_path / "run")
    assert np.mean([s == t for s, t in zip(said, truth)]) >= 0.9  # the labels it should: its ranking, its lean gone
    assert (tmp_path / "run" / "data" / "calibration.json").is_file()

    # export and validate: the manifest carries the calibration; validate compares with the teacher
    # as it taught and reports the bare teacher and its ranking beside it
    from typer.testing import CliRunner

    from edgekd.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--target", "cpu", "--out", str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["task"]["calibration"]["bias"] == record["bias"]
    r = runner.invoke(app, ["validate", str(tmp_path / "bundle"), "--out", str(tmp_path / "report"), "--no-speed", "--answer-tokens", "3"])
    (b,) = json.loads((tmp_path / "report" / "report.json").read_text())["bundles"]
    assert b["fidelity"]["teacher"]["model"].endswith("(calibrated)")
    truth_figures = b["task"]["truth"]
    assert truth_figures["labelled"] == len(held) and truth_figures["teacher_auc"] > 0.9  # it ranks well: that is why calibration helps
    assert "teacher_bare_accuracy" in truth_figures and "majority_baseline" in truth_figures

    off = distill(resolve(None, {**flags, "out": str(tmp_path / "off"), "calibrate": "off"}))
    assert "calibration" not in off["task"]
    said_off = first_labels(tokenizer, tmp_path / "off")
    assert np.mean([s == "capital" for s in said_off]) > 0.7  # off: the teacher's own lean
    assert np.mean([s == t for s, t in zip(said_off, truth)]) < 0.8


def test_validate_reads_the_teacher_as_it_taught_and_the_bare_one_beside_it(tiny_teacher_dir):
    from edgekd.validate import _Models, _teacher_judgement, calibrated_name

    c = cal.Calibration("prior", ("a", "b"), (-1.0, 1.0), ((10,), (20,)), 8, {}, {})
    models = _Models(4, lambda m: None)
    bare, calibrated = models.get(str(tiny_teacher_dir), "teacher"), models.get(str(tiny_teacher_dir), "teacher", c.record())
    assert bare is not calibrated and calibrated_name(str(tiny_teacher_dir)) in models.models
    ids = torch.tensor([[5, 9, 11]])
    delta = calibrated.model(input_ids=ids).logits[0, -1] - bare.model(input_ids=ids).logits[0, -1]
    assert float(delta[10]) == pytest.approx(-1.0, abs=1e-5) and float(delta[20]) == pytest.approx(1.0, abs=1e-5)
    # the calibrated teacher said "b" at step 1 (logits there: a 0.5, b 1.0); bare it would have said "a"
    logits = np.zeros((2, 32))
    logits[1, 10], logits[1, 20] = 0.5, 1.0
    answers, read = [[3, 20]], [logits]
    assert np.argmax(cal.read_scores(answers, read, c.token_ids, c.bias)[0]) == 0
    figures = _teacher_judgement({"calibration": c.record()}, ["a"], (answers, read), ["a", "b"], ())
    assert figures["teacher_bare_accuracy"] == 1.0


def test_an_answer_prefix_is_given_not_generated(tiny_teacher_dir):
    from edgekd.distill.generate import generate_answers
    from edgekd.models import load_model, resolve_source

    model, tok = load_model(resolve_source(str(tiny_teacher_dir)))
    prefix_ids = tok(" The capital", add_special_tokens=False)["input_ids"]
    records, _ = generate_answers(model, tok, ["Tell me about the sea", "and the stars"], max_new_tokens=3, temperature=0.0, top_p=1.0,
                                  batch_size=2, seed=0, max_prompt_tokens=64, keep_logits_of=[5, 6], answer_prefix=" The capital")
    for r in records:
        assert r["response"].startswith("The capital") and r["answer_ids"][: len(prefix_ids)] == prefix_ids
        assert r["prefix_tokens"] == len(prefix_ids) and r["kept_logits"].shape == (len(r["answer_ids"]) - len(prefix_ids), 2)


def test_after_the_answer_prefix_the_label_is_taught_over_the_labels_alone():
    from edgekd.distill.answers import label_rows, restrict_to_labels
    from edgekd.distill.data import Example

    # prompt 1 2 | prefix 7 8 | label 30 | 4 (eos); targets on the answer only
    ex = Example(ids=[1, 2, 7, 8, 30, 4], target=[0, 0, 1, 1, 1, 1])
    assert label_rows([ex], [7, 8], {30, 31}) == {0: 2}  # the loss rows predict 7, 8, 30, 4: the label's is row 2
    assert label_rows([Example(ids=[1, 7, 8, 9, 4], target=[0, 1, 1, 1, 1])], [7, 8], {30, 31}) == {}  # no label after it
    logp = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.5, 0.0]] * 4), -1)
    idx = torch.tensor([[5, 30, 31, 6]] * 4, dtype=torch.int32)  # " overwhelmingly" (5) leads; then the two labels
    table = {0: (logp, idx)}
    assert restrict_to_labels(table, [ex], [7, 8], ((30,), (31,))) == 1
    new, _ = table[0]
    assert torch.allclose(new[2, 1:3].exp(), torch.softmax(torch.tensor([1.0, 0.5]), -1), atol=1e-6)  # the labels, renormalised
    assert new[2, 0] < -30 and new[2, 3] < -30 and torch.equal(new[1], logp[1])  # other tokens out; other rows untouched
