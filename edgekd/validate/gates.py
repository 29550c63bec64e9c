"""The target's gates: each a threshold on one measured number, pass or fail.

A gate's name says its metric and direction: ``min_top1_vs_reference`` fails when the top-1
agreement with the reference is below the threshold. The gates a bundle must pass come from its
manifest (``target.gates``, written by ``edgekd export`` from the target profile).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgekd.errors import EdgekdError, UsageError

# gate name -> (where the value is in a bundle report, "min" or "max", what it means)
GATES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "min_top1_vs_reference": (("fidelity", "reference", "top1"), "min", "top-1 agreement with the reference"),
    "max_kl_vs_reference": (("fidelity", "reference", "kl_mean"), "max", "mean KL(reference || bundle), nats"),
    "max_ppl_ratio_vs_reference": (("fidelity", "reference", "ppl_ratio"), "max", "perplexity ratio bundle / reference"),
    "min_greedy_prefix_vs_reference": (
        ("fidelity", "reference", "greedy_prefix_tokens"),
        "min",
        "mean common prefix (tokens) of greedy answers with the reference",
    ),
    "min_top1_vs_teacher": (("fidelity", "teacher", "top1"), "min", "top-1 agreement with the teacher"),
    "max_kl_vs_teacher": (("fidelity", "teacher", "kl_mean"), "max", "mean KL(teacher || bundle), nats"),
    "max_ppl_ratio_vs_teacher": (("fidelity", "teacher", "ppl_ratio"), "max", "perplexity ratio bundle / teacher"),
    "max_size_mb": (("cost", "size_mb"), "max", "model file(s) size, MB (1e6 bytes)"),
}


class GateFailed(EdgekdError):
    """A bundle measured outside one of its target's gates (exit code 1)."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class GateResult:
    name: str
    threshold: float
    value: float | None
    passed: bool
    meaning: str

    def line(self) -> str:
        op = ">=" if GATES[self.name][1] == "min" else "<="
        value = "not measured" if self.value is None else f"{self.value:.4g}"
        return f"{self.name}: {value} (needs {op} {self.threshold:g})"


def _lookup(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def apply_gates(gates: dict[str, Any], report: dict[str, Any]) -> list[GateResult]:
    """Check every gate that has a threshold (None = not checked) against a bundle's report.

    A gate whose number was not measured fails: a release gate that cannot be checked must not
    pass silently. An unknown gate name is a usage error (a bundle from a newer edgekd?).
    """
    results = []
    for name, threshold in (gates or {}).items():
        if threshold is None:
            continue
        if name not in GATES:
            raise UsageError(f"unknown gate {name!r} in the bundle's target (known: {', '.join(GATES)}): update edgekd")
        path, direction, meaning = GATES[name]
        value = _lookup(report, path)
        passed = value is not None and (value >= threshold if direction == "min" else value <= threshold)
        results.append(GateResult(name, float(threshold), value, passed, meaning))
    return results
