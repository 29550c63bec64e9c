"""Tasks as data: the job a student is distilled for, and how its answers are scored.

A task is a folder (``tasks/sentiment/`` ships with edgekd, or a user's own)::

    task.toml        description, distillation defaults ([distill]), scoring (labels) and gates
    train.jsonl      {"prompt"} records (the teacher writes the answers) or prompt/response records
    heldout.jsonl    the same, never trained on: what distill evaluates and validate compares

``load_task("sentiment")`` or ``load_task("path/to/folder")`` -> ``Task``. Scoring, used by validate
against the teacher's greedy answers:

- a labelled task (``labels = ["positive", "negative"]``): an answer's label is the first label it
  names (whole word, any case); the figure is the share of prompts whose label equals the teacher's;
- every task: greedy exact match and ROUGE-L F1 (Lin 2004) of the answer text against the teacher's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekd.device.config import from_mapping, read_toml
from edgekd.device.errors import UsageError
from edgekd.device.metrics import TASK_GATES
from edgekd.device.paths import resource
from edgekd.device.targets import Gates

SHIPPED_TASKS = ("sentiment", "summary", "grammar")
TASK_TOML = "task.toml"
TRAIN = "train.jsonl"
HELDOUT = "heldout.jsonl"


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """``task.toml`` as typed values; ``distill`` is checked against ``DistillConfig`` when used."""

    description: str = ""
    labels: tuple[str, ...] = ()
    distill: dict[str, Any] = dataclasses.field(default_factory=dict)
    gates: Gates = dataclasses.field(default_factory=Gates)  # only a task's own gates (metrics.TASK_GATES)
    validate_prompts: int = 64  # held-out prompts validate compares for this task
    validate_answer_tokens: int = 32  # answer tokens validate scores and generates per prompt
    # How each of the task's prompts is put to the model, "{prompt}" standing for the prompt: e.g.
    # "Review: {prompt}\nSentiment (positive or negative):" for a base model without a chat template
    # (Gemma 3 270M); the chat template, where the model has one, is applied around it.
    prompt_template: str = "{prompt}"
    # The share of each label among the training prompts (in the order of ``labels``), where the
    # user knows it: distill's calibration (``calibrate = "prior"``) moves the teacher's cut until its
    # decisions on those prompts split this way.
    label_prior: tuple[float, ...] = ()
    # How the teacher's answers open, given rather than generated (e.g. "The review is"): its
    # decision is then always made in the same words, where its label score ranks best; the
    # student learns answers that open this way.
    answer_prefix: str = ""

    def __post_init__(self):
        if not self.description.strip():
            raise UsageError("description is missing: say in one line what the task is")
        if any(not label.strip() for label in self.labels):
            raise UsageError("labels must be non-empty strings")
        if len({label.lower() for label in self.labels}) != len(self.labels):
            raise UsageError("labels must differ (case-insensitively)")
        if len(self.labels) == 1:
            raise UsageError("labels needs at least two entries (or none, for a generative task)")
        if self.label_prior and (len(self.label_prior) != len(self.labels) or min(self.label_prior) <= 0):
            raise UsageError(f"label_prior needs one positive share per label ({len(self.labels)}), in the order of labels")
        if self.prompt_template.count("{prompt}") != 1:
            raise UsageError('prompt_template must hold "{prompt}" exactly once, where the prompt goes')
        if self.validate_prompts < 1 or self.validate_answer_tokens < 1:
            raise UsageError("validate_prompts and validate_answer_tokens must be at least 1")
        for name, value in dataclasses.asdict(self.gates).items():
            if value is not None and name not in TASK_GATES:
                raise UsageError(f"gates.{name} is a target profile's gate, not a task's: a task sets {', '.join(TASK_GATES)}")
        for key in ("out", "task", "prompts", "heldout", "data"):
            if key in self.distill:
                raise UsageError(f"[distill] {key} cannot be set by a task (the task folder gives the data; --out is the user's)")


def fill_prompt(template: str, text: str) -> str:
    """``text`` where a task's ``prompt_template`` says ``{prompt}`` (a task record's template too)."""
    return template.replace("{prompt}", text)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    folder: Path
    spec: TaskFile

    @property
    def train(self) -> Path:
        return self.folder / TRAIN

    @property
    def heldout(self) -> Path:
        return self.folder / HELDOUT

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    def prompt(self, text: str) -> str:
        """One of the task's prompts as the model is asked it (``prompt_template``)."""
        return fill_prompt(self.spec.prompt_template, text)

    def records(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The task's own records (its train or held-out file) with their prompts templated."""
        return [{**r, "prompt": self.prompt(r["prompt"])} if isinstance(r.get("prompt"), str) else r for r in records]

    def record(self) -> dict[str, Any]:
        """What ``distill.json`` and a bundle's manifest carry about the task (validate reads it)."""
        return {"name": self.name, "folder": str(self.folder), "labels": list(self.labels),
                "description": self.spec.description,
                "gates": {k: v for k, v in dataclasses.asdict(self.spec.gates).items() if v is not None},
                "validate_prompts": self.spec.validate_prompts, "validate_answer_tokens": self.spec.validate_answer_tokens,
                "prompt_template": self.spec.prompt_template, **({"label_prior": list(self.spec.label_prior)} if self.spec.label_prior else {}),
                **({"answer_prefix": self.spec.answer_prefix} if self.spec.answer_prefix else {})}


def load_task(name_or_dir: str | Path) -> Task:
    """A shipped task by name, or a task folder; every problem is one line naming the file."""
    text = str(name_or_dir)
    if text in SHIPPED_TASKS and not Path(text).is_dir():
        folder = resource(f"tasks/{text}")
    else:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            known = ", ".join(SHIPPED_TASKS)
            raise UsageError(f"--task {text}: not a shipped task ({known}) nor a folder")
    toml = folder / TASK_TOML
    if not toml.is_file():
        raise UsageError(f"{folder} is not a task folder: it has no {TASK_TOML} (description, labels, [distill])")
    data = read_toml(toml)
    if not data:
        raise UsageError(f"{toml} is empty: give the task at least a description")
    spec = from_mapping(TaskFile, data, str(toml))
    if not (folder / TRAIN).is_file():
        raise UsageError(f"{folder} has no {TRAIN}: add the training prompts, one {{\"prompt\": ...}} per line")
    if not (folder / HELDOUT).is_file():
        raise UsageError(f"{folder} has no {HELDOUT}: add held-out prompts (never trained on), one {{\"prompt\": ...}} per line")
    return Task(name=folder.resolve().name, folder=folder.resolve(), spec=spec)


def shipped_tasks() -> list[Task]:
    return [load_task(name) for name in SHIPPED_TASKS]


# ---------------------------------------------------------------------------------------------
# Scoring answers against the teacher's
# ---------------------------------------------------------------------------------------------


def label_of(answer: str, labels: Sequence[str]) -> str | None:
    """The first of ``labels`` that ``answer`` names as a whole word (any case), or None.

    ``label_of("The review is negative.", ["positive", "negative"]) == "negative"``.
    """
    best: tuple[int, str] | None = None
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", answer, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), label)
    return best[1] if best else None


DECIDED_MARGIN = 1.0  # nats: the teacher's label at least e (2.7) times as likely as any other label


def label_margins(answers: Sequence[Sequence[int]], logits: Sequence[Any], labels: Sequence[str],
                  decode: Callable[[Sequence[int]], str], encode: Callable[[str], list[int]]) -> list[float | None]:
    """How decided a model was when it named its label: per greedy answer (token ids, with the
    model's ``(answer_len, vocab)`` logits predicting each of them), the logit of the token that
    names its label minus the best logit of a token that would name another label there
    (``encode`` of the text so far with the other label written in). None: the answer names no
    label, or names it across tokens this cannot pair.

    A margin under ``DECIDED_MARGIN`` is a near-tie: a student, or the teacher quantized, can flip
    it without reading the input any worse. ``score_answers(..., teacher_margins=)`` splits the
    agreement there."""
    out: list[float | None] = []
    for ids, lg in zip(answers, logits):
        margin = None
        for j in range(len(ids)):
            text = decode(ids[: j + 1])
            label = label_of(text, labels)
            if label is None:
                continue
            before = decode(ids[:j])
            piece = text[len(before):] if text.startswith(before) else ""
            k = piece.lower().find(label)
            if k >= 0:
                rivals = []
                for other in labels:
                    if other == label:
                        continue
                    word = other.capitalize() if piece[k : k + 1].isupper() else other
                    alt = encode(before + piece[:k] + word)
                    if len(alt) > j and list(alt[:j]) == list(ids[:j]) and alt[j] != ids[j]:
                        rivals.append(alt[j])
                if rivals:
                    margin = float(lg[j][ids[j]] - max(lg[j][r] for r in rivals))
            break
        out.append(margin)
    return out


def decided_split(pairs: Sequence[tuple[str | None, str | None]], margins: Sequence[float | None]) -> dict[str, Any]:
    """Label agreement where the teacher decided (margin >= ``DECIDED_MARGIN``) and on its near-ties."""
    decided = [a == t for (a, t), m in zip(pairs, margins) if t is not None and m is not None and m >= DECIDED_MARGIN]
    ties = [a == t for (a, t), m in zip(pairs, margins) if t is not None and m is not None and m < DECIDED_MARGIN]
    measured = len(decided) + len(ties)
    return {
        "teacher_decided_share": len(decided) / measured if measured else None,
        "label_agreement_teacher_decided": sum(decided) / len(decided) if decided else None,
        "label_agreement_teacher_near_tie": sum(ties) / len(ties) if ties else None,
    }


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): longest common subsequence of lower-cased words."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


NO_LABEL = "none"  # an answer that names none of the task's labels, in a confusion matrix


def score_answers(answers: Sequence[str], teacher: Sequence[str], labels: Sequence[str] = (),
                  truths: Sequence[str | None] | None = None, inputs: Sequence[str] | None = None,
                  teacher_margins: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Task figures of ``answers`` against the ``teacher``'s answers to the same prompts, each
    beside the baseline a trivial answerer would score, so that a constant answer cannot pass.

    Every task: ``exact_match`` (stripped texts) and ``rouge_l`` against the teacher.

    A labelled task (``labels``): ``label_agreement`` over the prompts whose teacher answer names a
    label (the others: ``teacher_unlabelled``); ``label_confusion`` (teacher label -> answer label
    or "none" -> count); ``label_agreement_per_label`` and ``balanced_label_agreement``, their
    mean, which a constant answer scores 1 / number of labels on; ``majority_baseline``, what
    always answering the teacher's most frequent label agrees on.

    ``truths`` (the records' own ``label``, or ``reference`` text for a generative task, None where
    a record has none): accuracy of the answers and of the teacher against them, side by side,
    with 95% intervals (``truth``); for a generative task ROUGE-L against the references, beside
    the baselines ``inputs`` give (the input copied; its first sentence).

    ``teacher_margins`` (``label_margins`` of the teacher's answers): how many of the teacher's
    labels were decided rather than near-ties, and the agreement on each (``decided_split``).
    """
    from edgekd.device.stats import wilson_ci

    n = len(answers)
    out: dict[str, Any] = {
        "prompts": n,
        "exact_match": sum(a.strip() == t.strip() for a, t in zip(answers, teacher)) / max(n, 1),
        "rouge_l": sum(rouge_l(a, t) for a, t in zip(answers, teacher)) / max(n, 1),
    }
    if labels:
        pairs = [(label_of(a, labels), label_of(t, labels)) for a, t in zip(answers, teacher)]
        labelled = [(a, t) for a, t in pairs if t is not None]
        agree = sum(a == t for a, t in labelled)
        out["label_agreement"] = agree / len(labelled) if labelled else None
        if labelled:
            out["label_agreement_ci95"] = wilson_ci(agree, len(labelled))
        out["teacher_unlabelled"] = n - len(labelled)
        out["answers_unlabelled"] = sum(a is None for a, _ in pairs)
        out.update(label_balance(labelled, labels))
        if teacher_margins is not None:
            out.update(decided_split(pairs, teacher_margins))
        if truths is not None:
            out["truth"] = truth_accuracy([a for a, _ in pairs], [t for _, t in pairs], truths)
    elif truths is not None and any(truths):
        refs = [(i, r) for i, r in enumerate(truths) if r]
        out["truth"] = {"references": len(refs),
                        "rouge_l": sum(rouge_l(answers[i], r) for i, r in refs) / len(refs),
                        "teacher_rouge_l": sum(rouge_l(teacher[i], r) for i, r in refs) / len(refs),
                        "exact_match": sum(answers[i].strip() == r.strip() for i, r in refs) / len(refs)}
        if inputs is not None:
            out["truth"]["baseline_input_rouge_l"] = sum(rouge_l(inputs[i], r) for i, r in refs) / len(refs)
            out["truth"]["baseline_first_sentence_rouge_l"] = sum(rouge_l(first_sentence(inputs[i]), r) for i, r in refs) / len(refs)
    if inputs is not None and not labels:  # what a student that copies its input would score against the teacher
        out["baseline_input_rouge_l"] = sum(rouge_l(x, t) for x, t in zip(inputs, teacher)) / max(n, 1)
        out["baseline_first_sentence_rouge_l"] = sum(rouge_l(first_sentence(x), t) for x, t in zip(inputs, teacher)) / max(n, 1)
    return out


def label_balance(labelled: Sequence[tuple[str | None, str]], labels: Sequence[str]) -> dict[str, Any]:
    """The confusion matrix, per-label and balanced agreement, and the majority baseline of
    ``(answer label, teacher label)`` pairs."""
    confusion = {t: {a: 0 for a in (*labels, NO_LABEL)} for t in labels}
    for a, t in labelled:
        confusion[t][a or NO_LABEL] += 1
    per_label = {t: row[t] / sum(row.values()) for t, row in confusion.items() if sum(row.values())}
    counts = {t: sum(row.values()) for t, row in confusion.items()}
    return {
        "label_confusion": confusion,
        "label_agreement_per_label": per_label,
        "balanced_label_agreement": sum(per_label.values()) / len(per_label) if per_label else None,
        "majority_baseline": max(counts.values()) / len(labelled) if labelled else None,
        "majority_label": max(counts, key=lambda k: counts[k]) if labelled else None,
    }


def truth_accuracy(answers: Sequence[str | None], teacher: Sequence[str | None], truths: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy of the answers' and the teacher's labels against the records' own labels, side by
    side with 95% intervals, and the drop (teacher minus answers); records without a label are left out."""
    from edgekd.device.stats import wilson_ci

    rows = [(a, t, y.lower()) for a, t, y in zip(answers, teacher, truths) if y]
    if not rows:
        return {"labelled": 0}
    ours = sum(a is not None and a.lower() == y for a, _, y in rows)
    theirs = sum(t is not None and t.lower() == y for _, t, y in rows)
    counts: dict[str, int] = {}
    for _, _, y in rows:
        counts[y] = counts.get(y, 0) + 1
    return {"labelled": len(rows), "accuracy": ours / len(rows), "accuracy_ci95": wilson_ci(ours, len(rows)),
            "teacher_accuracy": theirs / len(rows), "teacher_accuracy_ci95": wilson_ci(theirs, len(rows)),
            "accuracy_drop_vs_teacher": (theirs - ours) / len(rows),
            "majority_baseline": max(counts.values()) / len(rows)}


def task_inputs(prompts: Sequence[str]) -> list[str]:
    """The inputs of a task's prompts: each prompt without the instruction they all share
    ("Summarize in one sentence: "), cut at a word boundary; what a copying baseline copies."""
    import os

    if len(prompts) < 2:
        return list(prompts)
    shared = os.path.commonprefix(list(prompts))
    cut = max(shared.rfind(" "), shared.rfind(":") + 1) if shared and not shared.endswith(" ") else len(shared)
    return [p[cut:].strip() or p for p in prompts]


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (up to the first . ! or ? followed by a space): a summary baseline."""
    m = re.search(r"[.!?](\s|$)", text.strip())
    return text.strip()[: m.end()].strip() if m else text.strip()
