"""How a runtime picks each next token (greedy, temperature, top-k, top-p) and turns the ids into
text as they arrive. numpy only: the device side's (``runtime.py``) choice of token and text."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from edgekd.device.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked. ``temperature == 0`` is greedy (argmax).

    ``top_k == 0`` and ``top_p == 1.0`` keep the whole vocabulary; ``seed`` makes sampling
    repeatable.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise UsageError(f"temperature and top-p must be finite numbers, got {self.temperature} and {self.top_p}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")


def pick_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token id from one row of logits ``(vocab,)``."""
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < x.shape[0]:
        idx = np.argpartition(x, -sampling.top_k)[-sampling.top_k :]
    else:
        idx = np.arange(x.shape[0])
    vals = x[idx]
    order = np.argsort(-vals, kind="stable")
    idx, vals = idx[order], vals[order]
    p = np.exp(vals - vals[0])
    p /= p.sum()
    if sampling.top_p < 1.0:
        keep = (np.cumsum(p) - p) < sampling.top_p  # smallest prefix whose mass reaches top_p
        idx, p = idx[keep], p[keep] / p[keep].sum()
    return int(idx[rng.choice(idx.shape[0], p=p)])


class TextStream:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character.

    Decodes a short window of recent ids and emits only what is new (the method of
    huggingface/text-generation-inference's ``decode_token``).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""
