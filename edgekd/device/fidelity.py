"""Is the shipped file still the model? Compare the bundle's logits and greedy answers with a
PyTorch model's (the reference it was exported from, or the teacher) on the same token ids.

The bundle side runs through ``edgekd.device.runtime.Runtime`` exactly as an app does: the prompt is
prefilled, then the answer is fed one token at a time through the KV cache (teacher forcing).
The PyTorch side runs one batched forward over prompt + answer.

Metrics (per compared model, over every answer position of every prompt):

- ``top1``: fraction of positions where both argmax tokens agree.
- ``kl_mean``, ``kl_p95``: KL(model || bundle) in nats per position (forward KL: the mass the
  reference puts where the bundle does not).
- ``ppl_bundle``, ``ppl_model``, ``ppl_ratio``: perplexity of the answer tokens under each,
  and bundle / model (1.0 = no loss).
- ``max_abs_logit_error``: the largest |logit difference| (meaningful against the reference).
- ``greedy_exact``: fraction of prompts whose greedy answers are token-for-token identical;
  ``greedy_prefix_tokens``: mean length of the common prefix, an identical answer counting as the
  whole budget (``answer_tokens``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgekd.device.stats import bootstrap_mean_ci, wilson_ci


@dataclasses.dataclass
class Example:
    """One held-out prompt as token ids: ``prompt`` (chat-formatted) and ``answer`` (scored)."""

    prompt: list[int]
    answer: list[int]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(
    bundle: Sequence[np.ndarray], model: Sequence[np.ndarray], answers: Sequence[Sequence[int]]
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``bundle`` against ``model`` logits, each a list of ``(answer_len, vocab)``.

    Returns ``(metrics, kl_per_position)``. When the vocab widths differ (a padded embedding),
    the common leading columns are compared.
    """
    kls, agree, nll_b, nll_m, max_err = [], [], [], [], 0.0
    for b, m, ans in zip(bundle, model, answers):
        v = min(b.shape[-1], m.shape[-1])
        b, m = b[:, :v], m[:, :v]
        lb, lm = log_softmax(b), log_softmax(m)
        kls.append((np.exp(lm) * (lm - lb)).sum(-1))
        agree.append(b.argmax(-1) == m.argmax(-1))
        idx = np.asarray(ans, dtype=np.int64)
        rows = np.arange(len(idx))
        nll_b.append(-lb[rows, idx])
        nll_m.append(-lm[rows, idx])
        max_err = max(max_err, float(np.abs(b.astype(np.float64) - m).max()))
    kl = np.clip(np.concatenate(kls), 0.0, None)
    ppl_b = float(np.exp(np.concatenate(nll_b).mean()))
    ppl_m = float(np.exp(np.concatenate(nll_m).mean()))
    metrics = {
        "positions": int(kl.size),
        "top1": float(np.concatenate(agree).mean()),
        "top1_ci95": bootstrap_mean_ci(agree),
        "kl_mean": float(kl.mean()),
        "kl_mean_ci95": bootstrap_mean_ci([np.clip(k, 0.0, None) for k in kls]),
        "kl_p95": float(np.percentile(kl, 95)),
        "ppl_bundle": ppl_b,
        "ppl_model": ppl_m,
        "ppl_ratio": ppl_b / ppl_m,
        "max_abs_logit_error": max_err,
    }
    return metrics, kl


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_greedy(bundle: Sequence[Sequence[int]], model: Sequence[Sequence[int]], budget: int) -> dict[str, Any]:
    """Exact-match rate and mean common-prefix length (tokens) of greedy answers (token id lists,
    each of at most ``budget`` tokens, ending at its eos). Identical answers count as ``budget``
    tokens: they agree as far as they were generated, whatever their length."""
    exact = [list(b) == list(m) for b, m in zip(bundle, model)]
    prefix = [budget if same else common_prefix(b, m) for same, b, m in zip(exact, bundle, model)]
    return {"greedy_exact": float(np.mean(exact)), "greedy_exact_ci95": wilson_ci(sum(exact), len(exact)),
            "greedy_prefix_tokens": float(np.mean(prefix))}


def bundle_logits(rt, examples: Sequence[Example]) -> list[np.ndarray]:
    """Teacher-forced logits of the bundle, through its KV cache, one example at a time."""
    return [rt.score(ex.prompt, ex.answer) for ex in examples]


def bundle_greedy(rt, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers of the bundle; an answer ended by eos includes that eos token."""
    out = []
    for ids in prompts:
        answer = list(rt.generate_ids(ids, max_new_tokens))
        if rt.last.stop_token is not None:
            answer.append(rt.last.stop_token)
        out.append(answer)
    return out


def fidelity_summary(metrics: dict[str, Any]) -> str:
    return (
        f"top-1 {metrics['top1']:.3f}, KL {metrics['kl_mean']:.4f} (p95 {metrics['kl_p95']:.4f}), "
        f"ppl ratio {metrics['ppl_ratio']:.3f}"
    )
