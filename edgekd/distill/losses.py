"""Distillation losses: small functions of tensors, each with its shapes and its source.

Notation: ``P`` is the teacher's next-token distribution, ``Q`` the student's (``Q_theta``).
Every divergence takes log-probabilities over the same last dimension ``K`` (the vocabulary, or
the teacher's top-k plus one tail bucket, see ``topk_support``) and returns one value per position.

- ``fkl``  forward KL(P || Q), mean-seeking.        Hinton, Vinyals, Dean 2015, "Distilling the
           Knowledge in a Neural Network" (temperature T and the T^2 factor).
- ``rkl``  reverse KL(Q || P), mode-seeking.        Gu et al. 2024, "MiniLLM: Knowledge
           Distillation of Large Language Models".
- ``jsd``  generalized JSD with weight beta:         Agarwal et al. 2024, "On-Policy Distillation of
           beta KL(P || M) + (1-beta) KL(Q || M),    Language Models: Learning from Self-Generated
           M = beta P + (1-beta) Q.                  Mistakes" (GKD); as in TRL's GKDTrainer.
- ``skl``  skew KL(P || a P + (1-a) Q), a = skew.    Ko et al. 2024, "DistiLLM: Towards Streamlined
                                                     Distillation for Large Language Models".

``hidden_state_loss`` is intermediate-state distillation (Minitron, Muralidharan et al. 2024,
arXiv 2407.14679: logit plus intermediate-state KD when the depth is cut a lot; TinyBERT, Jiao et
al. 2020): a pruned student's layer outputs pulled toward the teacher's residual stream at the
same depth.

``fused_head_loss`` computes any of them (mixed with cross-entropy by ``alpha``) straight from the
student's last hidden states, ``chunk_size`` positions at a time, so the ``(positions x vocab)``
logits of teacher and student never all exist at once, in forward or backward.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgekd.device.errors import UsageError

Divergence = Callable[..., torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {}
# each divergence's hyperparameters, read from its signature: the keywords it takes after the two
# distributions (``beta`` for jsd). The trainer passes a loss the config fields of those names.
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {}


def divergence(name: str) -> Callable[[Divergence], Divergence]:
    """Register a divergence under the name ``--loss`` uses. Its hyperparameters are the keyword
    parameters with defaults in its signature; a new one needs only a field of the same name in
    ``DistillConfig`` (and, for a flag, a line in the CLI)."""

    def deco(fn: Divergence) -> Divergence:
        DIVERGENCES[name] = fn
        HYPERPARAMETERS[name] = tuple(p.name for p in inspect.signature(fn).parameters.values()
                                      if p.default is not inspect.Parameter.empty)
        return fn

    return deco


def hyperparameters(loss: str, source) -> tuple[tuple[str, float], ...]:
    """The hyperparameters loss ``loss`` declares, with their values read from ``source`` (a
    ``DistillConfig``) where it has them: ``(("beta", 0.5),)`` for jsd."""
    get_divergence(loss)
    return tuple((name, getattr(source, name)) for name in HYPERPARAMETERS[loss] if hasattr(source, name))


def kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position. ``(..., K), (..., K) -> (...)``; inputs are finite log-probs."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def _mix(p_logp: torch.Tensor, q_logp: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1-w) q), computed in log space. ``(..., K) -> (..., K)``."""
    return torch.logaddexp(p_logp + math.log(w), q_logp + math.log1p(-w))


@divergence("fkl")
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, **_) -> torch.Tensor:
    """KL(P || Q) (Hinton et al. 2015). ``(N, K), (N, K) -> (N,)``."""
    return kl(teacher_logp, student_logp)


@divergence("rkl")
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, **_) -> torch.Tensor:
    """KL(Q || P) (MiniLLM, Gu et al. 2024). ``(N, K), (N, K) -> (N,)``."""
    return kl(student_logp, teacher_logp)


@divergence("jsd")
def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5, **_) -> torch.Tensor:
    """beta KL(P || M) + (1-beta) KL(Q || M), M = beta P + (1-beta) Q (GKD, Agarwal et al. 2024).
    ``(N, K), (N, K) -> (N,)``; beta = 0.5 is the symmetric Jensen-Shannon divergence."""
    m = _mix(teacher_logp, student_logp, beta)
    return beta * kl(teacher_logp, m) + (1 - beta) * kl(student_logp, m)


@divergence("skl")
def skew_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, skew: float = 0.1, **_) -> torch.Tensor:
    """KL(P || a P + (1-a) Q), a = ``skew`` (skew KL, DistiLLM, Ko et al. 2024).
    ``(N, K), (N, K) -> (N,)``; a = 0 is forward KL; a > 0 keeps the gradient bounded where Q ~ 0."""
    return kl(teacher_logp, _mix(teacher_logp, student_logp, skew))


def topk_support(student_logp: torch.Tensor, topk_logp: torch.Tensor, topk_idx: torch.Tensor):
    """Project both distributions onto the teacher's top-k tokens plus one tail bucket.

    ``student_logp (N, V)`` full log-probs, ``topk_logp (N, k)`` the teacher's largest log-probs and
    ``topk_idx (N, k)`` their token ids -> ``(student (N, k+1), teacher (N, k+1))`` log-probs.

    How the tail is handled: the teacher's mass outside its top-k (1 - sum of the k probs, known
    exactly because the cached log-probs are normalized over the full vocabulary) becomes one
    bucket, and the student's mass on those same tokens becomes its tail bucket. Both are proper
    distributions over k+1 outcomes, so every divergence applies unchanged. By the data-processing
    inequality the result is a lower bound on the full-vocabulary divergence; it is exact when the
    tail carries no mass, and only the *shape* of the tail is lost, never its total.
    """
    s_top = student_logp.gather(-1, topk_idx)
    return torch.cat([s_top, _tail(s_top)], -1), torch.cat([topk_logp, _tail(topk_logp)], -1)


def _tail(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top_logp))) as a ``(N, 1)`` column, floored at 1e-12 to stay finite."""
    covered = torch.logsumexp(top_logp, -1, keepdim=True).exp()
    return torch.log((1 - covered).clamp_min(1e-12))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "fkl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    **kw,
) -> torch.Tensor:
    """Mean divergence over the unmasked positions, with temperature and the T^2 factor (Hinton 2015).

    ``student_logits, teacher_logits (..., V)``, ``mask (...)`` (1 = counts) -> scalar.
    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    fn = get_divergence(loss)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    per_pos = fn(s, t, **kw) * temperature**2
    if mask is None:
        return per_pos.mean()
    mask = mask.to(per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp_min(1)


def get_divergence(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise UsageError(f"unknown loss {name!r}: choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which divergence, how it is mixed with cross-entropy, and over how many vocabulary entries."""

    loss: str = "fkl"
    alpha: float = 1.0  # weight of the divergence; 1 - alpha goes to cross-entropy on the labels
    temperature: float = 1.0
    params: tuple[tuple[str, float], ...] = ()  # the divergence's hyperparameters (``hyperparameters``); unset: its defaults
    vocab: int | None = None  # compare only the first `vocab` logits (teacher and student padded differently)
    # A labelled task's decision (``label_decision_kl``): token ids per label, and the term's weight.
    label_groups: tuple[tuple[int, ...], ...] = ()
    label_weight: float = 0.0
    label_hard: bool = False  # the label term as cross-entropy on the teacher's chosen label
    label_margin: float = 0.0  # weight of ``label_margin_error``: the teacher's label scores matched as numbers
    hidden_weight: float = 0.0  # weight of ``hidden_state_loss`` (teacher states in ``TeacherTargets.states``)

    def __post_init__(self):
        get_divergence(self.loss)
        unknown = [name for name, _ in self.params if name not in HYPERPARAMETERS[self.loss]]
        if unknown:
            raise UsageError(f"loss {self.loss!r} takes no {', '.join(unknown)}: it takes {', '.join(HYPERPARAMETERS[self.loss]) or 'none'}")


@dataclasses.dataclass
class TeacherTargets:
    """What the teacher says at the selected positions: either its last hidden states and head
    (full vocabulary, logits computed a chunk at a time) or cached top-k log-probs at ``temperature``.

    Full: ``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)`` or None.
    Cached: ``topk_logp (N, k)`` log_softmax(teacher_logits / T) of the k largest, ``topk_idx (N, k)``.
    ``states (L, N, H)``: the teacher's residual stream at the depths the student's L matched
    layers stand for (``hidden_state_loss``), or None.
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    states: torch.Tensor | None = None

    def chunk(self, start: int, end: int, vocab: int | None) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        if self.topk_logp is not None:
            assert self.topk_idx is not None  # cached targets carry both
            return "topk", self.topk_logp[start:end].float(), self.topk_idx[start:end].long()
        if self.hidden is None:  # no teacher (alpha = 0: plain cross-entropy)
            return "none", None, None
        assert self.weight is not None  # full targets carry the head with the hidden states
        with torch.no_grad():
            w = self.weight[:vocab] if vocab else self.weight
            b = None if self.bias is None else (self.bias[:vocab] if vocab else self.bias)
            return "full", F.linear(self.hidden[start:end], w, b).float(), None


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Intermediate-state distillation, per position: ``(L, N, H), (L, N, H) -> (N,)``, the mean
    over the L matched layers of ``||s - t||^2 / ||t||^2``.

    Normalised by the teacher's own norm at each position and depth, because the residual stream's
    scale grows with depth and differs between tokens by orders of magnitude (massive activations):
    a plain MSE would be set by a few positions of the last layers. 0 when the states agree, 1 for
    a zero state, 2 for one of the right norm at right angles."""
    t = teacher.float()
    err = (student.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(eps)
    return err.mean(0)


def _named_label_rows(s_logp: torch.Tensor, t_group_logp: torch.Tensor, groups: tuple[tuple[int, ...], ...],
                      min_mass: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The positions where the teacher names a label (at least ``min_mass`` on the labels), and there
    the student's and the teacher's log-prob of each label, ``(n,), (n, G), (n, G)``; None where it names none."""
    t_group = t_group_logp.clamp_min(-50.0)  # a label outside a cached top-k: a tiny, finite mass
    named = t_group.exp().sum(-1) >= min_mass
    if not bool(named.any()):
        return None
    rows = named.nonzero().squeeze(1)
    s_group = torch.stack([torch.logsumexp(s_logp[rows][:, list(g)], -1) for g in groups], -1)
    return rows, s_group, t_group[rows]


def label_decision_kl(s_logp: torch.Tensor, t_group_logp: torch.Tensor, groups: tuple[tuple[int, ...], ...],
                      min_mass: float = 0.1, hard: bool = False) -> torch.Tensor:
    """KL between the teacher's and the student's choice among a task's labels, per position.

    ``s_logp (c, V)`` the student's log-probs, ``t_group_logp (c, G)`` the teacher's log-prob of
    each label (its surface forms' tokens summed), ``groups``: G tuples of token ids -> ``(c,)``.
    Both are renormalised over the G labels, so a near-tie the teacher breaks (P(" positive") 0.30
    against P(" negative") 0.22, beside " generally" 0.25) weighs as the 0.58 / 0.42 decision it
    is, not as a 0.08 sliver of a full-vocabulary KL. Zero where the teacher puts less than
    ``min_mass`` on the labels (positions that name none). A task-specific form of the
    classification KD of Hinton et al. 2015 at the one token where the answer is decided.

    ``hard``: cross-entropy on the label the teacher's greedy answer picks instead (sequence-level
    KD's hard target, Kim & Rush 2016): a near-tie the teacher breaks 0.51 / 0.49 is taught as the
    decision it makes, not as a coin flip the student may land either way.
    """
    out = s_logp.new_zeros(s_logp.shape[0])
    named = _named_label_rows(s_logp, t_group_logp, groups, min_mass)
    if named is None:
        return out
    rows, s_group, t_rows = named
    t_bin = torch.log_softmax(t_rows, -1)
    s_bin = torch.log_softmax(s_group, -1)
    if hard:
        return out.index_put((rows,), -s_bin.gather(-1, t_bin.argmax(-1, keepdim=True)).squeeze(-1))
    return out.index_put((rows,), (t_bin.exp() * (t_bin - s_bin)).sum(-1))


def label_margin_error(s_logp: torch.Tensor, t_group_logp: torch.Tensor, groups: tuple[tuple[int, ...], ...],
                       min_mass: float = 0.1, clip: float = 10.0) -> torch.Tensor:
    """Squared error between the student's and the teacher's label score margins, per position.

    The score margin of labels i and j is log P(i) - log P(j) (each label's surface forms summed):
    for two labels the teacher's score s = logit(" positive") - logit(" negative") that ranks the
    inputs. ``(c, V), (c, G) -> (c,)``: the mean over label pairs of (margin_student - margin_teacher)^2,
    the teacher's margin clipped to +-``clip`` nats (a label its cached top-k misses), zero where the
    teacher puts less than ``min_mass`` on the labels. Logit matching (Ba & Caruana 2014) at the one
    position where the decision is made: a near-tie is taught as a near-tie and a clear case as a clear
    one, so the student learns the teacher's order of the inputs, which a hard label (every case as
    sure as any other) does not carry and a softmax KL carries only weakly where the teacher is sure.
    """
    out = s_logp.new_zeros(s_logp.shape[0])
    named = _named_label_rows(s_logp, t_group_logp, groups, min_mass) if len(groups) >= 2 else None
    if named is None:
        return out
    rows, s_group, t_rows = named
    s_pair = s_group[:, :, None] - s_group[:, None, :]
    t_pair = (t_rows[:, :, None] - t_rows[:, None, :]).clamp(-clip, clip)
    n_pairs = len(groups) * (len(groups) - 1)  # ordered pairs: each unordered one counted twice, as in the sum
    return out.index_put((rows,), (s_pair - t_pair).pow(2).sum((-1, -2)) / n_pairs)


def _teacher_group_logp(kind: str, t_val: torch.Tensor, t_idx: torch.Tensor | None, groups) -> torch.Tensor:
    """``(c, G)`` the teacher's log-prob of each label group (-inf where a cached top-k misses it)."""
    if kind == "full":
        t_logp = F.log_softmax(t_val, -1)
        return torch.stack([torch.logsumexp(t_logp[:, list(g)], -1) for g in groups], -1)
    assert t_idx is not None  # cached top-k targets come with their indices
    cols = []
    for g in groups:
        hit = (t_idx[..., None] == torch.tensor(g, device=t_idx.device)).any(-1)
        cols.append(torch.logsumexp(t_val.masked_fill(~hit, float("-inf")), -1))
    return torch.stack(cols, -1)


def chunk_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher, spec: LossSpec):
    """Summed loss and top-1 agreement over one chunk.

    ``student_logits (c, V)`` float, ``labels (c,)``, ``teacher``: ``("full", logits (c, V), None)``,
    ``("topk", logp (c, k), idx (c, k))`` or ``("none", None, None)`` (alpha = 0, agreement 0) -> ``(loss_sum scalar, n_agree scalar)``.
    Per position: ``alpha * T^2 * D(P_T, Q_T) + (1 - alpha) * CE(labels)``.
    """
    total = student_logits.new_zeros(())
    kind, t_val, t_idx = teacher
    if spec.alpha > 0:
        T = spec.temperature
        s_logp = F.log_softmax(student_logits / T, -1)
        if kind == "full":
            t_logp = F.log_softmax(t_val / T, -1)
            t_top1 = t_val.argmax(-1)
        else:
            s_logp, t_logp = topk_support(s_logp, t_val, t_idx)
            t_top1 = t_idx[:, 0]
        if (spec.label_weight > 0 or spec.label_margin > 0) and spec.label_groups:
            t_group = _teacher_group_logp(kind, t_val / T if kind == "full" else t_val, t_idx, spec.label_groups)
            full_s = F.log_softmax(student_logits / T, -1)
            if spec.label_weight > 0:
                total = total + spec.label_weight * T * T * label_decision_kl(full_s, t_group, spec.label_groups, hard=spec.label_hard).sum()
            if spec.label_margin > 0:
                total = total + spec.label_margin * T * T * label_margin_error(full_s, t_group, spec.label_groups).sum()
        div = get_divergence(spec.loss)(s_logp, t_logp, **dict(spec.params))
        total = total + spec.alpha * T * T * div.sum()
    elif kind == "none":
        t_top1 = None
    else:
        t_top1 = t_val.argmax(-1) if kind == "full" else t_idx[:, 0]
    if spec.alpha < 1:
        total = total + (1 - spec.alpha) * F.cross_entropy(student_logits, labels, reduction="sum")
    agree = (student_logits.argmax(-1) == t_top1).sum() if t_top1 is not None else torch.zeros((), dtype=torch.long, device=student_logits.device)
    return total, agree


class _FusedHeadLoss(torch.autograd.Function):
    """Head + loss a chunk at a time; each chunk's gradient is taken in forward and its logits freed.

    The same idea as Liger-Kernel's fused linear cross-entropy: peak memory holds one chunk's
    ``(chunk x vocab)`` logits, and nothing is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, spec, chunk_size):
        vocab = spec.vocab
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight)
        grad_b = None if bias is None else torch.zeros_like(bias)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        agree = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_()
                w = weight.detach().requires_grad_()
                b = None if bias is None else bias.detach().requires_grad_()
                logits = F.linear(h, w[:vocab] if vocab else w, None if b is None else (b[:vocab] if vocab else b))
                loss, n_agree = chunk_loss(logits.float(), labels[start:end], teacher.chunk(start, end, vocab), spec)
                grads = torch.autograd.grad(loss, [h, w] + ([b] if b is not None else []))
            grad_h[start:end] = grads[0]
            grad_w += grads[1]
            if grad_b is not None:
                grad_b += grads[2]
            total += loss.detach()
            agree += n_agree
        ctx.save_for_backward(grad_h, grad_w, *([grad_b] if grad_b is not None else []))
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(agree)
        return total, agree

    @staticmethod
    def backward(ctx, grad_total, _grad_agree):
        saved = ctx.saved_tensors
        grad_b = saved[2] * grad_total if ctx.has_bias else None
        return saved[0] * grad_total, saved[1] * grad_total, grad_b, None, None, None, None


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherTargets,
    spec: LossSpec,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss over positions, computed from the student's last hidden states in chunks.

    ``hidden (N, H)`` the student's final-norm outputs at the N positions that carry loss,
    ``weight (V, H)`` (and ``bias (V,)``) its output head, ``labels (N,)`` the next tokens ->
    ``(loss_sum, n_agree)``: a differentiable scalar (divide by the token count yourself) and the
    number of positions where the student's top-1 token equals the teacher's.
    """
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero, torch.zeros((), dtype=torch.long, device=hidden.device)
    return _FusedHeadLoss.apply(hidden, weight, bias, labels, teacher, spec, chunk_size)
