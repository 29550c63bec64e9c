"""Calibrated teacher labels: the teacher's judgement without its lean.

A small teacher can rank a labelled task's inputs well and still lean toward one label: SmolLM2-135M
calls about 70% of balanced reviews "positive", yet its score logit(" positive") - logit(" negative")
cut at the right point is right far more often (docs/students.md). A student distilled on its raw
answers learns the lean. The correction here is a bias per label, added to the logits of the tokens
that name that label (``label_token_groups``): a prior correction, or logit adjustment (Saerens et
al. 2002, "Adjusting the outputs of a classifier to new a priori probabilities"; Menon et al. 2021,
"Long-tail learning via logit adjustment"; Zhao et al. 2021, "Calibrate before use", fit their bias
on a content-free input instead). It is fit in one of two ways:

- ``labels``: on records that carry a person's ``label`` (a calibration split, a few hundred at
  most), the bias that maximises the likelihood of those labels under softmax(z + b), where z are
  the teacher's label scores (bias-only calibration, the intercept of Platt scaling at slope 1);
- ``prior``: with no labels, on the unlabelled training prompts, the bias under which the teacher's
  decisions split as the task's declared ``label_prior`` says (its balance point).

The calibrated teacher is the teacher whose output head carries that bias on those rows
(``calibrated``): every pass that reads it (its answers, the top-k cache, the loss in the loop, the
held-out evaluation, validate) sees the same distribution, with mass moved between the labels and
nothing else changed. A label score ``z_k`` is the largest logit of label k's tokens at the answer
step where the teacher names a label (the token a greedy answer would pick).

It cannot help a teacher whose ranking is poor: a bias moves the cut, not the order. ``fit`` reports
the teacher's ranking quality (AUC of its score, two labels) on labelled records so a user can see
which case they are in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgekd.device.errors import UsageError

METHODS = ("prior", "labels")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted correction: ``bias[k]`` nats on the logits of ``token_ids[k]``, the tokens naming ``labels[k]``."""

    method: str  # "prior" or "labels"
    labels: tuple[str, ...]
    bias: tuple[float, ...]
    token_ids: tuple[tuple[int, ...], ...]
    fit_records: int  # records whose teacher answer named a label (what the bias was fit on)
    before: dict[str, float]  # each label's share of the teacher's decisions on them, bare
    after: dict[str, float]  # and calibrated
    truth: dict[str, Any] = dataclasses.field(default_factory=dict)  # method "labels": accuracy bare/calibrated, AUC

    def record(self) -> dict[str, Any]:
        """What distill.json and a bundle's manifest carry (``from_record`` reads it back)."""
        return {"method": self.method, "labels": list(self.labels), "bias": [round(b, 4) for b in self.bias],
                "token_ids": [list(t) for t in self.token_ids], "fit_records": self.fit_records,
                "label_share_before": self.before, "label_share_after": self.after, **({"truth": self.truth} if self.truth else {})}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Calibration:
        try:
            return cls(method=rec["method"], labels=tuple(rec["labels"]), bias=tuple(float(b) for b in rec["bias"]),
                       token_ids=tuple(tuple(int(i) for i in t) for t in rec["token_ids"]), fit_records=int(rec["fit_records"]),
                       before=dict(rec.get("label_share_before") or {}), after=dict(rec.get("label_share_after") or {}),
                       truth=dict(rec.get("truth") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"a calibration record is malformed ({e}): re-run edgekd distill") from None

    def describe(self) -> str:
        share = lambda d: ", ".join(f"{k} {v:.0%}" for k, v in d.items())  # noqa: E731
        bias = ", ".join(f"{label} {b:+.2f}" for label, b in zip(self.labels, self.bias))
        return f"calibrated teacher labels ({self.method}, {self.fit_records} records): bias {bias} nats; its labels {share(self.before)} -> {share(self.after)}"


@contextlib.contextmanager
def calibrated(model, calibration: Calibration | None) -> Iterator[Any]:
    """``model`` with the calibration's bias on its output head's label rows, removed on exit.

    The head's ``bias`` (a new one where it had none) is what every teacher pass reads: the module's
    forward, and the loss and cache that multiply by ``head.weight`` and add ``head.bias``."""
    if calibration is None:
        yield model
        return
    head = model.get_output_embeddings()
    old = head.bias
    apply_bias(model, calibration)
    try:
        yield model
    finally:
        head.bias = old


def apply_bias(model, calibration: Calibration) -> None:
    """Put the calibration's bias on ``model``'s output head for good (``calibrated`` undoes it)."""
    import torch

    head = model.get_output_embeddings()
    vec = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
    for ids, b in zip(calibration.token_ids, calibration.bias):
        vec[[i for i in ids if i < vec.shape[0]]] += b
    old = head.bias
    head.bias = torch.nn.Parameter(vec if old is None else old.detach() + vec, requires_grad=False)


def read_scores(answers: Sequence[Sequence[int]], logits: Sequence[np.ndarray], token_ids: Sequence[Sequence[int]],
                bias: Sequence[float] | None = None) -> list[np.ndarray | None]:
    """Each answer's label scores ``(G,)`` at the step where it names a label (``label_step``,
    ``label_scores``), None where it names none. ``logits``: per answer, its step logits ``(steps,
    vocab)`` or those of the flattened ``token_ids``. ``bias``: subtracted, e.g. a calibration's, to
    read the uncalibrated teacher off a calibrated one's logits (what it would have chosen there)."""
    less = np.zeros(len(token_ids)) if bias is None else np.asarray(bias, dtype=np.float64)
    out: list[np.ndarray | None] = []
    for ids, lg in zip(answers, logits):
        j = label_step(ids, token_ids)
        out.append(None if j is None else label_scores(np.asarray(lg[j]), token_ids) - less)
    return out


def generated_scores(records: Sequence[dict[str, Any]], token_ids: Sequence[Sequence[int]]) -> list[np.ndarray | None]:
    """``read_scores`` of ``generate_answers`` records kept with ``keep_logits_of`` the flattened
    ``token_ids`` (their generated steps: after an answer prefix)."""
    return read_scores([r["answer_ids"][r.get("prefix_tokens", 0):] for r in records], [r["kept_logits"] for r in records], token_ids)


def label_step(answer_ids: Sequence[int], token_ids: Sequence[Sequence[int]]) -> int | None:
    """The first answer step whose token names a label (one of ``token_ids``' tokens), or None."""
    names = {i for ids in token_ids for i in ids}
    return next((j for j, t in enumerate(answer_ids) if t in names), None)


def label_scores(step_logits: np.ndarray, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """``(G,)`` label scores from one step's logits over the label tokens: per label, the largest
    logit of its tokens (the one a greedy answer would pick). ``step_logits``: ``(V,)`` or the
    logits of the flattened ``token_ids`` in order."""
    flat = [i for ids in token_ids for i in ids]
    values = step_logits if step_logits.shape[-1] == len(flat) else step_logits[flat]
    out, at = [], 0
    for ids in token_ids:
        v = np.asarray(values[at : at + len(ids)], dtype=np.float64)
        out.append(float(np.max(v)))
        at += len(ids)
    return np.array(out)


def shares(z: np.ndarray, bias: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Each label's share of the decisions argmax(z + bias) over the rows of ``z (N, G)``."""
    won = np.argmax(z + bias, axis=1)
    return {label: round(float(np.mean(won == k)), 4) for k, label in enumerate(labels)}


def fit_prior(z: np.ndarray, prior: Sequence[float], sweeps: int = 50) -> np.ndarray:
    """The bias ``(G,)`` under which argmax(z + b) splits the rows of ``z (N, G)`` as ``prior`` says.

    Label k wins a row when z_k + b_k beats every other label's z_j + b_j: for fixed others, the b_k
    that gives it share p_k is a quantile of (max_j(z_j + b_j) - z_k). Coordinate sweeps of that
    (exact in one sweep for two labels), then centred (``_centre``)."""
    n, g = z.shape
    b = np.zeros(g)
    p = np.asarray(prior, dtype=np.float64) / float(np.sum(prior))
    for _ in range(sweeps if g > 2 else 1):
        for k in range(1, g) if g == 2 else range(g):
            others = np.max(np.delete(z + b, k, axis=1), axis=1)
            need = np.sort(others - z[:, k])  # label k wins a row where b_k > need
            # b_k between the order statistics that leave round(p_k * n) rows won
            m = int(round(p[k] * n))
            lo = need[m - 1] if m >= 1 else need[0] - 1.0
            hi = need[m] if m < n else need[-1] + 1.0
            b[k] = (lo + hi) / 2
    return _centre(z, b)


def fit_labels(z: np.ndarray, truth: Sequence[int] | np.ndarray, steps: int = 200) -> np.ndarray:
    """The bias ``(G,)`` maximising the likelihood of the ``truth`` label indices under
    softmax(z + b) (convex; Newton's method on the G - 1 free entries), then centred."""
    n, g = z.shape
    y = np.zeros((n, g))
    y[np.arange(n), np.asarray(truth)] = 1.0
    b = np.zeros(g)
    for _ in range(steps):
        logits = z + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - y).mean(0)[1:]
        hess = (np.einsum("ni,ij->nij", p, np.eye(g)) - np.einsum("ni,nj->nij", p, p)).mean(0)[1:, 1:]
        delta = np.linalg.solve(hess + 1e-6 * np.eye(g - 1), grad)
        b[1:] -= np.clip(delta, -5.0, 5.0)
        if np.max(np.abs(delta)) < 1e-8:
            break
    return _centre(z, b)


def _centre(z: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b`` shifted so that the mean log-sum-exp over the labels is unchanged: the correction
    moves probability between the labels, not to or from them."""
    lse = lambda a: np.logaddexp.reduce(a, axis=1)  # noqa: E731
    return b + float(np.mean(lse(z)) - np.mean(lse(z + b)))


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the rows where ``positive``: how well the teacher
    ranks, whatever its threshold (0.5 = chance; ties count half)."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fit(method: str, labels: Sequence[str], token_ids: Sequence[Sequence[int]], z: np.ndarray,
        truths: Sequence[str | None] | None = None, prior: Sequence[float] | None = None) -> Calibration:
    """A ``Calibration`` of ``method`` from the label scores ``z (N, G)`` of the records whose teacher
    answer named a label; ``truths``: their people's labels (method ``labels``, and the accuracy figures);
    ``prior``: the declared share of each label (method ``prior``)."""
    if method not in METHODS:
        raise UsageError(f"calibration method {method!r}: use one of {', '.join(METHODS)}")
    if len(z) < 2 * len(labels):
        raise UsageError(f"calibration needs label scores on at least {2 * len(labels)} records; the teacher named a label on {len(z)}")
    lower = [label.lower() for label in labels]
    truth_idx = None
    if truths is not None:
        truth_idx = np.array([lower.index(t.lower()) if t and t.lower() in lower else -1 for t in truths])
    if method == "labels":
        if truth_idx is None or (truth_idx >= 0).sum() < 2 * len(labels):
            raise UsageError("calibration from labels needs records with a 'label' that names one of the task's labels (a few dozen at least)")
        keep = truth_idx >= 0
        bias = fit_labels(z[keep], truth_idx[keep])
    else:
        if prior is None or len(prior) != len(labels) or min(prior) <= 0:
            raise UsageError(f"calibration from a prior needs label_prior with a positive share for each of {', '.join(labels)} in task.toml")
        bias = fit_prior(z, prior)
    truth: dict[str, Any] = {}
    if truth_idx is not None and (truth_idx >= 0).any():
        keep = truth_idx >= 0
        zk, yk = z[keep], truth_idx[keep]
        truth = {"labelled": int(keep.sum()),
                 "accuracy_bare": round(float(np.mean(np.argmax(zk, 1) == yk)), 4),
                 "accuracy_calibrated": round(float(np.mean(np.argmax(zk + bias, 1) == yk)), 4)}
        if len(labels) == 2:
            a = auc(zk[:, 0] - zk[:, 1], yk == 0)
            truth["auc"] = None if a is None else round(a, 4)
    if not all(math.isfinite(b) for b in bias):
        raise UsageError("the calibration did not converge (a label the teacher never gives?): check the task's labels")
    return Calibration(method=method, labels=tuple(labels), bias=tuple(float(b) for b in bias),
                       token_ids=tuple(tuple(t) for t in token_ids), fit_records=len(z),
                       before=shares(z, np.zeros(len(labels)), labels), after=shares(z, bias, labels), truth=truth)
