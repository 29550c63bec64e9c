"""Tasks as data: loading task folders, scoring answers against the teacher's, and the shipped tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.errors import UsageError
from edgekd.device.io import iter_jsonl
from edgekd.device.tasks import SHIPPED_TASKS, label_margins, label_of, load_task, rouge_l, score_answers
from edgekd.distill.config import DistillConfig
from edgekd.distill.config_io import resolve


def test_label_of_takes_the_first_label_named_as_a_word():
    labels = ["positive", "negative"]
    assert label_of("The review is negative.", labels) == "negative"
    assert label_of("POSITIVE! Not negative at all.", labels) == "positive"
    assert label_of("Negative, though parts are positive.", labels) == "negative"
    assert label_of("It is nonpositive", labels) is None  # whole words only
    assert label_of("I cannot tell.", labels) is None


def test_rouge_l_is_the_lcs_f1_of_words():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x y", "a b") == 0.0


def test_score_answers_against_the_teacher():
    teacher = ["The review is negative.", "The review is positive.", "Hard to say.", "The review is positive."]
    student = ["The review is negative.", "The review is negative.", "Positive.", "It is positive."]
    s = score_answers(student, teacher, ["positive", "negative"])
    assert s["prompts"] == 4 and s["teacher_unlabelled"] == 1 and s["answers_unlabelled"] == 0
    assert s["label_agreement"] == pytest.approx(2 / 3)  # over the 3 prompts the teacher labelled
    assert s["exact_match"] == 0.25
    assert 0 < s["rouge_l"] < 1
    assert "label_agreement" not in score_answers(student, teacher)


def test_a_constant_answer_cannot_pass_for_reading():
    """Issue 32: beside label agreement, the balanced figures a constant answer scores 1 / labels on."""
    teacher = ["positive"] * 7 + ["negative"] * 3
    constant = ["The review is positive."] * 10
    s = score_answers(constant, teacher, ["positive", "negative"], truths=["positive"] * 5 + ["negative"] * 5)
    assert s["label_agreement"] == pytest.approx(0.7) and s["majority_baseline"] == pytest.approx(0.7)
    assert s["balanced_label_agreement"] == pytest.approx(0.5)  # 1.0 on positive, 0.0 on negative
    assert s["label_confusion"] == {"positive": {"positive": 7, "negative": 0, "none": 0},
                                    "negative": {"positive": 3, "negative": 0, "none": 0}}
    t = s["truth"]
    assert t["accuracy"] == pytest.approx(0.5) and t["teacher_accuracy"] == pytest.approx(0.8)  # teacher: 5 positive right, 3 of 5 negative
    assert t["accuracy_drop_vs_teacher"] == pytest.approx(0.3) and t["majority_baseline"] == 0.5
    assert t["accuracy_ci95"][0] < 0.5 < t["accuracy_ci95"][1]
    # a generative task: ROUGE-L against references beside the trivial baselines
    g = score_answers(["a cat sat"], ["the cat sat"], truths=["the cat sat down"], inputs=["The cat sat down. Then it slept."])
    assert g["truth"]["teacher_rouge_l"] > g["truth"]["rouge_l"] > 0
    assert g["truth"]["baseline_first_sentence_rouge_l"] == pytest.approx(1.0)
    assert 0 < g["baseline_input_rouge_l"] < 1



def test_label_margins_read_how_decided_the_teacher_was():
    """The logit of the token naming the label over the token that would name the other one there."""
    import numpy as np

    pieces = ["The", " review", " is", " positive", " negative", ".", " Positive", " Negative"]

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    def encode(text):  # longest piece first
        ids = []
        while text:
            i = max((i for i, p in enumerate(pieces) if text.startswith(p)), key=lambda i: len(pieces[i]))
            ids.append(i)
            text = text[len(pieces[i]):]
        return ids

    def logits(n, row, scores):
        lg = np.zeros((n, len(pieces)), dtype=np.float32)
        for tok, v in scores.items():
            lg[row, tok] = v
        return lg

    decided = [0, 1, 2, 4, 5]  # "The review is negative."
    tie = [0, 1, 2, 3, 5]  # "The review is positive."
    unlabelled = [0, 5]
    margins = label_margins([decided, tie, unlabelled], [logits(5, 3, {4: 2.5, 3: 0.5}), logits(5, 3, {3: 1.2, 4: 0.9}), logits(2, 0, {})],
                            ["positive", "negative"], decode, encode)
    assert margins[0] == pytest.approx(2.0) and margins[1] == pytest.approx(0.3) and margins[2] is None
    # agreement split where the teacher decided and on its near-ties
    s = score_answers(["It is negative.", "It is negative.", "x"], ["The review is negative.", "The review is positive.", "x"],
                      ["positive", "negative"], teacher_margins=margins)
    assert s["teacher_decided_share"] == 0.5
    assert s["label_agreement_teacher_decided"] == 1.0 and s["label_agreement_teacher_near_tie"] == 0.0

def test_shipped_labelled_sets_carry_balanced_truths():
    from collections import Counter

    for path in (load_task("sentiment").heldout, Path(__file__).parents[1] / "benchmarks/data/sentiment-unseen.jsonl",
                 Path(__file__).parents[1] / "benchmarks/data/sentiment-independent.jsonl"):
        labels = Counter(r["label"] for _, r in iter_jsonl(path))
        assert set(labels) == {"positive", "negative"} and labels["positive"] == labels["negative"], (path, labels)


@pytest.mark.parametrize("name", SHIPPED_TASKS)
def test_every_shipped_task_loads_and_has_enough_varied_data(name):
    task = load_task(name)
    train = [r["prompt"] for _, r in iter_jsonl(task.train)]
    held = [r["prompt"] for _, r in iter_jsonl(task.heldout)]
    assert len(train) >= 600 and len(held) >= 100
    assert len(set(train)) == len(train) and not set(train) & set(held)
    lengths = sorted(len(p.split()) for p in train)
    assert lengths[-1] > 2 * lengths[0]  # varied in length, not one template
    # every [distill] key is a DistillConfig setting of the right type
    cfg = resolve(None, {"task": name, "out": "x"})
    assert isinstance(cfg, DistillConfig) and cfg.task == name
    for key, value in task.spec.distill.items():
        assert getattr(cfg, key) == value


def test_task_defaults_sit_under_flags():
    cfg = resolve(None, {"task": "sentiment", "out": "x", "epochs": 7})
    assert cfg.epochs == 7 and cfg.gen_temperature == load_task("sentiment").spec.distill["gen_temperature"]


def _task(tmp_path, toml: str, train: bool = True, heldout: bool = True):
    folder = tmp_path / "mytask"
    folder.mkdir()
    (folder / "task.toml").write_text(toml)
    if train:
        (folder / "train.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    if heldout:
        (folder / "heldout.jsonl").write_text(json.dumps({"prompt": "b"}) + "\n")
    return folder


@pytest.mark.parametrize("toml, train, message", [
    ('description = "x"\n', False, "has no train.jsonl"),
    ("", True, "is empty"),
    ('description = "x"\ncolour = 1\n', True, "unknown key 'colour'"),
    ('description = "x"\nlabels = "positive"\n', True, "labels must be a list"),
    ('description = "x"\nlabels = [1, 2]\n', True, r"labels\[0\] must be a string"),
    ('description = "x"\nlabels = ["yes"]\n', True, "at least two"),
    ('description = "x"\n[distill]\nepochz = 2\n', True, "unknown key 'epochz'"),
    ('description = "x"\n[distill]\nout = "here"\n', True, "cannot be set by a task"),
    ('description = "x"\n[gates]\nmin_label_agreement_vs_teacher = 2\n', True, "between 0 and 1"),
    ('description = "x\n', True, "not valid TOML"),
    ('description = "x"\nprompt_template = "Review:"\n', True, "exactly once"),
])
def test_bad_task_folders_are_one_line_errors(tmp_path, toml, train, message):
    folder = _task(tmp_path, toml, train=train)
    with pytest.raises(UsageError, match=message) as e:
        resolve(None, {"task": str(folder), "out": "x"})
    assert "\n" not in str(e.value)


def test_a_folder_that_is_no_task(tmp_path):
    with pytest.raises(UsageError, match="no task.toml"):
        load_task(tmp_path)
    with pytest.raises(UsageError, match="not a shipped task"):
        load_task("no-such-task")


def test_tasks_command_lists_the_shipped_tasks():
    r = CliRunner().invoke(app, ["tasks"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for name in SHIPPED_TASKS:
        assert name in r.output
    assert "positive" in r.output and "ROUGE-L" in r.output


# --- end to end on a tiny model: distill --task -> export -> validate against the teacher -------

REVIEWS = ["the soup was cold", "great battery life", "rude staff at the desk", "fast shipping, lovely box",
           "broke after a week", "best pizza in town", "the film dragged on", "comfortable and warm"]


def _tiny_task(root, *, labelled_answers: bool = True, gate: float = 0.0):
    folder = root / "tinytask"
    folder.mkdir()
    (folder / "task.toml").write_text(
        'description = "tiny sentiment"\nlabels = ["positive", "negative"]\nvalidate_prompts = 4\n'
        '[distill]\nstudent = "layers:2"\nepochs = 2\nmax_new_tokens = 8\nbatch_size = 4\nlr = 3e-3\n'
        f'[gates]\nmin_rouge_l_vs_teacher = {gate}\n')

    def rec(i, text):
        label = "positive" if i % 2 else "negative"
        prompt = f"Classify the sentiment of this review as positive or negative. Review: {text}"
        return {"prompt": prompt, **({"response": f"The review is {label}."} if labelled_answers else {})}

    (folder / "train.jsonl").write_text("".join(json.dumps(rec(i, f"{t} {j}")) + "\n" for j in range(3) for i, t in enumerate(REVIEWS)))
    (folder / "heldout.jsonl").write_text("".join(json.dumps(rec(i, t + "!")) + "\n" for i, t in enumerate(REVIEWS[:4])))
    return folder


def test_task_end_to_end_on_a_tiny_model(tiny_teacher_dir, tmp_path):
    task = _tiny_task(tmp_path)
    student, bundle, report = tmp_path / "student", tmp_path / "bundle", tmp_path / "report"
    runner = CliRunner()
    r = runner.invoke(app, ["distill", "--task", str(task), "--teacher", str(tiny_teacher_dir), "--out", str(student)])
    assert r.exit_code == 0, r.output
    info = json.loads((student / "distill.json").read_text())
    assert info["task"]["name"] == "tinytask" and info["task"]["labels"] == ["positive", "negative"]
    assert info["config"]["epochs"] == 2 and info["data"]["train"]["examples"] == 24  # the task's defaults and data
    assert "scan" in info["student"] and info["student"]["num_hidden_layers"] == 2
    r = runner.invoke(app, ["export", str(student), "--target", "cpu", "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["task"]["gates"]["min_rouge_l_vs_teacher"] == 0.0
    r = runner.invoke(app, ["validate", str(bundle), "--out", str(report), "--no-speed", "--answer-tokens", "8"], terminal_width=200)
    assert r.exit_code == 0, r.output
    (b,) = json.loads((report / "report.json").read_text())["bundles"]
    assert b["data"]["prompts"] == 4  # the task's validate_prompts
    assert set(b["task"]) >= {"label_agreement", "exact_match", "rouge_l", "reference_vs_teacher"}
    assert "min_rouge_l_vs_teacher" in {g["name"] for g in b["gates"]}
    assert {"balanced_label_agreement", "label_confusion", "majority_baseline"} <= set(b["task"])
    assert "labels," in r.stdout and "against the bundle's" in " ".join(r.stdout.split())  # the confusion matrix
    assert len(b["examples"]) == 4 and {"prompt", "teacher", "reference", "bundle"} <= set(b["examples"][0])
    assert "does the job the way the teacher does: PASS" in r.stdout
    assert "faithful to the reference" in r.stdout
    md = (report / "report.md").read_text()
    assert "Answers side by side" in md and "task: ROUGE-L vs teacher" in md
    assert "## Labels, bundle" in md and "| teacher: positive |" in md  # (this random teacher names no label: zeros)


def test_a_labelled_task_whose_teacher_names_no_label_is_refused(tiny_teacher_dir, tmp_path):
    task = _tiny_task(tmp_path, labelled_answers=False)  # the random tiny teacher writes the answers
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--task", str(task), "--teacher", str(tiny_teacher_dir), "--out", str(out)])
    assert r.exit_code == 2 and "names a label" in r.output
    assert not out.exists()  # a refused run leaves --out as it found it


def test_a_distilled_split_gets_its_truths_from_the_task_folder(tmp_path):
    from edgekd.device.data import record_truths

    (tmp_path / "heldout.jsonl").write_text('{"prompt": "a", "label": "positive"}\n{"prompt": "b", "label": "negative"}\n')
    split = [{"prompt": "b", "response": "The review is negative."}, {"prompt": "c", "response": "x"}]  # the teacher's answers
    assert record_truths(split, str(tmp_path)) == ["negative", None]
    assert record_truths([{"prompt": "a", "label": "negative"}], str(tmp_path)) == ["negative"]  # a record's own wins
    assert record_truths(split, None) is None
    assert record_truths([{"prompt": "Review: b\nSentiment:"}], str(tmp_path), "Review: {prompt}\nSentiment:") == ["negative"]


def test_a_tasks_prompt_template_is_how_its_prompts_are_asked(tiny_teacher_dir, tmp_path):
    """A base model (no chat template) is asked a task's prompts through the task's prompt_template:
    the teacher's answers, the held-out split distill writes and the task record all carry it."""
    task = _tiny_task(tmp_path)
    toml = task / "task.toml"
    toml.write_text(toml.read_text().replace('validate_prompts = 4\n', 'validate_prompts = 4\nprompt_template = "{prompt}\\nAnswer:"\n'))
    loaded = load_task(task)
    assert loaded.prompt("x") == "x\nAnswer:" and loaded.record()["prompt_template"] == "{prompt}\nAnswer:"
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--task", str(task), "--teacher", str(tiny_teacher_dir), "--out", str(out),
                                 "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the console wraps long lines
    assert "1 step," in said and "s a step" in said  # how long a step takes, said
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 4 and all(h["prompt"].startswith("Classify") and h["prompt"].endswith("\nAnswer:") for h in heldout)
    assert json.loads((out / "distill.json").read_text())["task"]["prompt_template"] == "{prompt}\nAnswer:"
