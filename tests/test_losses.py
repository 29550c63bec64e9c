"""Every loss against a value computed by hand, the top-k tail bucket, and chunked == unchunked."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F

from edgekd.device.errors import UsageError
from edgekd.distill.config import DistillConfig
from edgekd.distill.losses import (
    DIVERGENCES,
    LossSpec,
    TeacherTargets,
    chunk_loss,
    distillation_loss,
    fused_head_loss,
    hidden_state_loss,
    topk_support,
)

P = [0.5, 0.5]  # teacher
Q = [0.25, 0.75]  # student


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _logits(probs):
    return torch.tensor([probs]).log()  # log-probs are valid logits


HAND = {
    "fkl": _kl(P, Q),  # 0.5 ln 2 + 0.5 ln(2/3)
    "rkl": _kl(Q, P),
    "jsd": 0.5 * _kl(P, [0.375, 0.625]) + 0.5 * _kl(Q, [0.375, 0.625]),
    "skl": _kl(P, [0.1 * 0.5 + 0.9 * 0.25, 0.1 * 0.5 + 0.9 * 0.75]),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_each_loss_matches_hand_computed_value(name):
    got = distillation_loss(_logits(Q), _logits(P), loss=name, beta=0.5, skew=0.1)
    assert got.item() == pytest.approx(HAND[name], abs=1e-6)


def test_every_config_loss_is_registered_and_tested():
    assert set(typing.get_args(typing.get_type_hints(DistillConfig)["loss"])) == set(DIVERGENCES) == set(HAND)


def test_temperature_softens_both_and_scales_by_t_squared():
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p1 = math.exp(1) / (math.exp(1) + 1)  # softmax([2, 0] / 2)
    expected = 4 * _kl([p1, 1 - p1], [0.5, 0.5])
    assert distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_jsd_beta_weights_the_teacher_mixture():
    m = [0.25 * 0.5 + 0.75 * 0.25, 0.25 * 0.5 + 0.75 * 0.75]  # beta = 0.25
    expected = 0.25 * _kl(P, m) + 0.75 * _kl(Q, m)
    assert distillation_loss(_logits(Q), _logits(P), loss="jsd", beta=0.25).item() == pytest.approx(expected, abs=1e-6)


def test_mask_excludes_positions():
    student = torch.cat([_logits(Q), torch.tensor([[9.0, -9.0]])])
    teacher = torch.cat([_logits(P), torch.tensor([[-9.0, 9.0]])])
    got = distillation_loss(student, teacher, mask=torch.tensor([1, 0]))
    assert got.item() == pytest.approx(HAND["fkl"], abs=1e-6)


def test_identical_distributions_give_zero():
    x = torch.randn(5, 11)
    for name in DIVERGENCES:
        assert distillation_loss(x, x, loss=name).item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_loss_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown loss 'kld'"):
        LossSpec(loss="kld")


def test_a_losss_hyperparameters_come_from_its_signature_to_the_chunk_loss():
    """A loss declares its hyperparameters once, as keywords of its function; the trainer reads the
    config fields of those names (``hyperparameters``) and the chunk loss passes them on."""
    import types

    from edgekd.distill.losses import HYPERPARAMETERS, chunk_loss, divergence, hyperparameters

    assert HYPERPARAMETERS["jsd"] == ("beta",) and HYPERPARAMETERS["skl"] == ("skew",) and HYPERPARAMETERS["fkl"] == ()
    assert hyperparameters("jsd", DistillConfig(beta=0.3)) == (("beta", 0.3),)
    with pytest.raises(UsageError, match="loss 'fkl' takes no beta"):
        LossSpec("fkl", params=(("beta", 0.3),))

    @divergence("scaled_fkl_test")
    def scaled(student_logp, teacher_logp, scale: float = 1.0, **_):
        return scale * DIVERGENCES["fkl"](student_logp, teacher_logp)

    try:
        torch.manual_seed(2)
        s, t = torch.randn(6, 9), torch.randn(6, 9)
        labels = torch.zeros(6, dtype=torch.long)
        spec = LossSpec("scaled_fkl_test", params=hyperparameters("scaled_fkl_test", types.SimpleNamespace(scale=3.0)))
        got, _ = chunk_loss(s, labels, ("full", t, None), spec)
        want, _ = chunk_loss(s, labels, ("full", t, None), LossSpec("fkl"))
        assert got.item() == pytest.approx(3.0 * want.item(), rel=1e-5)
        jsd = chunk_loss(s, labels, ("full", t, None), LossSpec("jsd", params=(("beta", 0.25),)))[0]
        assert jsd.item() == pytest.approx(DIVERGENCES["jsd"](F.log_softmax(s, -1), F.log_softmax(t, -1), beta=0.25).sum().item(), rel=1e-5)
    finally:
        del DIVERGENCES["scaled_fkl_test"], HYPERPARAMETERS["scaled_fkl_test"]


def test_topk_tail_bucket_by_hand():
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    student = torch.tensor([[0.2, 0.4, 0.4]]).log()
    s, t = topk_support(student, teacher[:, :1], torch.tensor([[0]]))
    assert torch.allclose(t.exp(), torch.tensor([[0.5, 0.5]]), atol=1e-6)
    assert torch.allclose(s.exp(), torch.tensor([[0.2, 0.8]]), atol=1e-6)
    kd = DIVERGENCES["fkl"](s, t)
    assert kd.item() == pytest.approx(_kl([0.5, 0.5], [0.2, 0.8]), abs=1e-6)
    full = _kl([0.5, 0.3, 0.2], [0.2, 0.4, 0.4])
    assert kd.item() <= full + 1e-6  # a lower bound on the full divergence (data-processing inequality)


def test_topk_with_full_vocabulary_equals_full_loss():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(7, 13), torch.randn(7, 13)
    t_logp = F.log_softmax(t_logits, -1)
    top = t_logp.topk(13, -1)
    for name in DIVERGENCES:
        s, t = topk_support(F.log_softmax(s_logits, -1), top.values, top.indices)
        got = DIVERGENCES[name](s, t).mean()
        assert got.item() == pytest.approx(distillation_loss(s_logits, t_logits, loss=name).item(), abs=1e-5), name


def _reference(hidden, weight, labels, teacher_logits, spec):
    """The plain, unchunked computation: full logits, autograd end to end."""
    logits = (hidden @ weight.T).float()
    return chunk_loss(logits, labels, ("full", teacher_logits, None), spec)[0]


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_chunked_equals_unchunked_loss_and_gradients(name, alpha):
    torch.manual_seed(0)
    N, H, V = 10, 8, 17
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    t_hidden, t_weight = torch.randn(N, H), torch.randn(V, H)
    labels = torch.randint(0, V, (N,))
    spec = LossSpec(name, alpha=alpha, temperature=1.5)

    ref = _reference(hidden, weight, labels, t_hidden @ t_weight.T, spec)
    g_ref = torch.autograd.grad(ref, [hidden, weight])
    for chunk in (1, 3, 100):
        loss, agree = fused_head_loss(hidden, weight, labels, TeacherTargets(hidden=t_hidden, weight=t_weight), spec, chunk)
        g = torch.autograd.grad(loss * 2.0, [hidden, weight])  # the upstream gradient is applied
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(g[0], 2 * g_ref[0], atol=1e-5) and torch.allclose(g[1], 2 * g_ref[1], atol=1e-5)
        expected_agree = ((hidden @ weight.T).argmax(-1) == (t_hidden @ t_weight.T).argmax(-1)).sum()
        assert agree.item() == expected_agree.item()


def test_chunked_topk_equals_unchunked_topk():
    torch.manual_seed(1)
    N, H, V, k = 9, 6, 23, 5
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    top = F.log_softmax(torch.randn(N, V), -1).topk(k, -1)
    spec = LossSpec("jsd", temperature=1.0)
    labels = torch.randint(0, V, (N,))
    s, t = topk_support(F.log_softmax(hidden @ weight.T, -1), top.values, top.indices)
    ref = DIVERGENCES["jsd"](s, t, beta=0.5).sum()
    loss, _ = fused_head_loss(hidden, weight, labels, TeacherTargets(topk_logp=top.values, topk_idx=top.indices), spec, 4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g_ref = torch.autograd.grad(ref, [hidden, weight])
    g = torch.autograd.grad(loss, [hidden, weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_ref))


def test_vocab_slice_ignores_padded_rows():
    torch.manual_seed(2)
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(12, 6, requires_grad=True)  # student padded to 12 rows; only 10 are real tokens
    t_hidden, t_weight = torch.randn(4, 6), torch.randn(10, 6)
    labels = torch.randint(0, 10, (4,))
    loss, _ = fused_head_loss(hidden, weight, labels, TeacherTargets(hidden=t_hidden, weight=t_weight), LossSpec(vocab=10), 2)
    ref = _reference(hidden, weight[:10], labels, t_hidden @ t_weight.T, LossSpec())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    (g_w,) = torch.autograd.grad(loss, [weight])
    assert torch.all(g_w[10:] == 0)


def test_empty_positions_give_zero_loss_with_a_gradient_path():
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    loss, agree = fused_head_loss(hidden, weight, torch.zeros(0, dtype=torch.long), TeacherTargets(hidden=torch.zeros(0, 4), weight=weight.detach()), LossSpec())
    loss.backward()
    assert loss.item() == 0 and agree.item() == 0 and weight.grad is not None


def test_pure_cross_entropy_needs_no_teacher():
    torch.manual_seed(3)
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    labels = torch.randint(0, 9, (5,))
    loss, agree = fused_head_loss(hidden, weight, labels, TeacherTargets(), LossSpec(alpha=0.0), 2)
    assert loss.item() == pytest.approx(F.cross_entropy(hidden @ weight.T, labels, reduction="sum").item(), rel=1e-5)
    assert agree.item() == 0


def test_label_decision_kl_renormalises_over_the_labels():
    import torch

    from edgekd.distill.losses import label_decision_kl

    V = 10
    groups = ((2, 3), (5,))  # label A: tokens 2 and 3; label B: token 5
    t = torch.full((3, V), -20.0)
    t[0, 2], t[0, 5], t[0, 7] = 0.30, 0.20, 0.50  # probabilities (a near-tie beside another word)
    t[1, 7] = 1.0  # this position names no label
    t[2, 3], t[2, 5] = 0.5, 0.5
    t_logp = torch.log(t.clamp_min(1e-9) / t.clamp_min(1e-9).sum(-1, keepdim=True))
    t_group = torch.stack([torch.logsumexp(t_logp[:, list(g)], -1) for g in groups], -1)
    kl = label_decision_kl(t_logp, t_group, groups)  # a student equal to the teacher
    assert torch.allclose(kl, torch.zeros(3), atol=1e-6)
    s = t_logp.clone()
    s[0, 2], s[0, 5] = t_logp[0, 5], t_logp[0, 2]  # the student breaks the tie the other way
    kl = label_decision_kl(s, t_group, groups)
    p = torch.tensor([0.6, 0.4])
    assert kl[0].item() == pytest.approx(float((p * (p.log() - p.flip(0).log())).sum()), rel=1e-4)
    assert kl[1].item() == 0.0  # no label named here: no term
    # hard: cross-entropy on the label the teacher picks (A, 0.6 against 0.4), whatever its margin
    ce = label_decision_kl(s, t_group, groups, hard=True)
    assert ce[0].item() == pytest.approx(-float(torch.tensor(0.4).log()), rel=1e-4)  # the student gives A 0.4
    assert ce[1].item() == 0.0
    assert label_decision_kl(t_logp, t_group, groups, hard=True)[0].item() == pytest.approx(-float(torch.tensor(0.6).log()), rel=1e-4)


def test_label_token_groups_refuse_labels_no_token_names(tiny_teacher_dir):
    from edgekd.distill.loop import label_token_groups
    from edgekd.models import load_model

    _, tok = load_model(str(tiny_teacher_dir))  # its tiny BPE splits "Paris" into pieces of 3 letters
    with pytest.raises(UsageError, match="no token names it"):
        label_token_groups(tok, ["Paris", "Rome"])


@pytest.mark.smollm2
def test_label_token_groups_of_the_real_tokenizer():
    from edgekd.distill.loop import label_token_groups
    from edgekd.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")  # the tokenizer alone: no weights to dequantize
    groups = label_token_groups(tok, ["positive", "negative"])
    assert [sorted(tok.decode([i]) for i in g) for g in groups] == [
        [" Positive", " positive", "Positive", "positive"], [" Negative", " negative", "Negative", "negative"]]


def test_label_decision_kl_gradients_are_finite_when_a_label_is_missing_from_the_topk():
    import torch

    from edgekd.distill.losses import label_decision_kl

    s = torch.randn(4, 10, requires_grad=True)
    t_group = torch.tensor([[-1.0, float("-inf")], [float("-inf"), float("-inf")], [-0.5, -1.5], [-9.0, -9.0]])
    kl = label_decision_kl(torch.log_softmax(s, -1), t_group, ((2,), (5, 6)))
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all()
    assert kl[1] == 0 and kl[3] == 0 and kl[2] > 0  # rows 1 and 3 name no label (mass < 0.1)


def test_hidden_state_loss_is_normalised_per_position_and_depth():
    """0 where the states agree, 1 for a zero state, 2 at right angles, the same whatever
    the stream's scale (a massive-activation position weighs as any other), averaged over layers."""
    t = torch.tensor([[[3.0, 4.0], [0.0, 1000.0]]])  # (L=1, N=2, H=2)
    orth = torch.tensor([[[-4.0, 3.0], [1000.0, 0.0]]])
    assert hidden_state_loss(t, t).tolist() == [0.0, 0.0]
    assert hidden_state_loss(orth, t).tolist() == pytest.approx([2.0, 2.0])
    assert hidden_state_loss(0 * t, t).tolist() == pytest.approx([1.0, 1.0])
    assert hidden_state_loss(0.5 * t, t).tolist() == pytest.approx([0.25, 0.25])
    two = hidden_state_loss(torch.cat([t, orth]), torch.cat([t, t]))  # layers 1 and 2: 0 and 2
    assert two.tolist() == pytest.approx([1.0, 1.0])


def test_matched_layers_pair_each_student_layer_with_the_depth_it_stands_for():
    from edgekd.distill.loop import matched_layers

    assert matched_layers([0, 1, 8, 29]) == ((1, 2, 3), (1, 8, 29))
    assert matched_layers([5]) == ((), ())


def test_label_margin_error_matches_the_teachers_score_as_a_number():
    """Zero where the student's label score margin equals the teacher's, the squared error of the
    margin otherwise (two labels), a sure case weighed by how sure; a label missing from the teacher's
    top-k is clipped, and a position naming no label carries no term."""
    from edgekd.distill.losses import label_margin_error

    groups = ((2, 3), (5,))
    s = torch.log_softmax(torch.randn(4, 10), -1)
    s_score = torch.logsumexp(s[:, [2, 3]], -1) - s[:, 5]
    t_group = torch.stack([torch.zeros(4), -s_score], -1)  # the teacher's margin is the student's
    t_group = torch.log_softmax(t_group, -1)
    assert torch.allclose(label_margin_error(s, t_group, groups), torch.zeros(4), atol=1e-5)
    shifted = torch.log_softmax(torch.stack([torch.zeros(4), -(s_score + 1.5)], -1), -1)  # margin 1.5 nats larger
    assert torch.allclose(label_margin_error(s, shifted, groups), torch.full((4,), 2.25), atol=1e-4)
    missing = torch.tensor([[0.0, -60.0]] * 4)  # a label outside the top-k: the margin clipped at 10 nats
    assert torch.allclose(label_margin_error(s, missing, groups), (s_score - 10.0).pow(2), atol=1e-4)
    none = torch.full((4, 2), -9.0)  # the labels' mass under 0.1
    assert (label_margin_error(s, none, groups) == 0).all()


def test_label_margin_rides_beside_the_decision_term():
    torch.manual_seed(5)
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(8, 4, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(6, 8) * 3, -1)
    labels = torch.zeros(6, dtype=torch.long)
    targets = TeacherTargets(topk_logp=t_logp, topk_idx=torch.arange(8).expand(6, 8).to(torch.int32))
    groups = ((1,), (2,))
    base, _ = fused_head_loss(hidden, weight, labels, targets, LossSpec(label_groups=groups), 3)
    with_margin, _ = fused_head_loss(hidden, weight, labels, targets, LossSpec(label_groups=groups, label_margin=2.0), 3)
    from edgekd.distill.losses import label_margin_error

    s_logp = torch.log_softmax(hidden.detach() @ weight.detach().T, -1)
    t_group = t_logp[:, [1, 2]]
    expected = 2.0 * label_margin_error(s_logp, t_group, groups).sum()
    assert with_margin.item() - base.item() == pytest.approx(expected.item(), rel=1e-4)
    with_margin.backward()
    assert torch.isfinite(hidden.grad).all()
