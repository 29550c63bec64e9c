"""The target's gates: each a threshold on one measured number, pass or fail.

A gate's name says its metric and direction: ``min_top1_vs_reference`` fails when the top-1
agreement with the reference is below the threshold. The gates a bundle must pass come from its
manifest (``target.gates``, written by ``edgekd export`` from the target profile).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edgekd.device.errors import EdgekdError, UsageError
from edgekd.device.metrics import GATES


class GateFailed(EdgekdError):
    """A bundle measured outside one of its target's gates (exit code 1)."""

    exit_code = 1


def gate_side(name: str) -> str:
    """Which verdict a gate belongs to: "teacher" (does the job the way the teacher does) or
    "reference" (is still the model it was exported from; size included)."""
    return "teacher" if name.endswith(("_vs_teacher", "_vs_bare_teacher")) else "reference"


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


def metric(report: dict[str, Any] | None, *path: str) -> float | None:
    """The number at ``path`` in a bundle report (``metric(r, "cost", "size_mb")``), or None where
    it was not measured. Gates, the search and the tables all read reports through this."""
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
        value = metric(report, *path)
        if value is not None and not math.isfinite(value):
            value = None  # NaN measured: not a pass
        passed = value is not None and (value >= threshold if direction == "min" else value <= threshold)
        results.append(GateResult(name, float(threshold), value, passed, meaning))
    return results


# Below this top-1 agreement with the teacher a student is called far from it, gated or not.
FAR_FROM_TEACHER_TOP1 = 0.5


def verdict_lines(report) -> list[str]:
    """Two verdicts for a bundle report (a ``BundleReport``), said separately: faithful to the
    reference it was exported from (export quality), and to the teacher (distillation quality, on
    the task where there is one). Never a bare "pass" over a student that is far from its teacher."""
    name = report.name
    lines = []
    for side, what in (("reference", "faithful to the reference (the model it was exported from)"),
                       ("teacher", "does the job the way the teacher does")):
        gates = [g for g in report.gates if gate_side(g.name) == side]
        failed = [g for g in gates if not g.passed]
        if failed:
            lines.append(f"{name}: {what}: FAIL ({'; '.join(g.line() for g in failed)})")
        elif gates:
            lines.append(f"{name}: {what}: PASS ({len(gates)} gate{'s' if len(gates) > 1 else ''})")
        elif side == "teacher" and report.details.get("teacher") != report.details.get("reference"):
            top1 = report.metric("fidelity", "teacher", "top1")
            far = top1 is not None and top1 < FAR_FROM_TEACHER_TOP1
            lines.append(f"{name}: {what}: not gated" + (f"; FAR from the teacher (top-1 {top1:.2f} < {FAR_FROM_TEACHER_TOP1})" if far
                                                         else f" (top-1 vs teacher {top1:.3f})" if top1 is not None else ""))
        elif side == "reference":
            lines.append(f"{name}: {what}: not gated")
    return lines
