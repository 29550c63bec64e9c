"""Uncertainty of the figures edgekd reports from small samples (8 prompts, 226 positions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_mean_ci(groups: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the pooled mean of per-prompt arrays, resampling whole prompts (the positions
    of one answer are not independent, so a per-position interval would be too narrow)."""
    sums = np.array([float(np.sum(g)) for g in groups])
    counts = np.array([np.size(g) for g in groups], dtype=np.float64)
    if len(groups) < 2:
        mean = float(sums.sum() / max(counts.sum(), 1))
        return [mean, mean]
    idx = np.random.default_rng(seed).integers(0, len(groups), (n_boot, len(groups)))
    means = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def wilson_ci(successes: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson's 95% interval of a share ``successes / n`` (sound at small n and near 0 or 1)."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]
