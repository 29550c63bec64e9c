"""One bundle's report, typed: what ``edgekd validate`` and ``edgekd check`` both produce, what the
CLI, the search and the pipeline read by attribute, and what ``report.json`` holds (``to_json``,
``from_json``).

The numbers live where ``edgekd.device.metrics.METRICS`` says (``fidelity[side]``, ``task``, ``cost``) and
are read through ``metric``; the gates are ``GateResult`` values. What only one command measures
(validate's data, models and notes; check's golden replay) is in ``details``, written beside the
common fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from edgekd.device.gates import GateResult, apply_gates, metric

_ORDER_FIRST = ("name", "bundle", "target", "environment")  # report.json's first keys, then the details


@dataclasses.dataclass
class BundleReport:
    bundle: str = ""  # the folder, resolved
    target: str | None = None  # the target profile's name
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    fidelity: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # "reference" / "teacher" -> figures
    cost: dict[str, Any] = dataclasses.field(default_factory=dict)
    task: dict[str, Any] | None = None
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    name: str | None = None  # validate's short name of the bundle in its tables
    gates_from: str = ""
    gates: list[GateResult] = dataclasses.field(default_factory=list)
    not_checked: list[str] = dataclasses.field(default_factory=list)  # gates a golden replay cannot answer (check)
    problems: list[str] = dataclasses.field(default_factory=list)  # failures that are not gates (check)
    validated: bool = True  # False: the search judged it on its size alone
    passed: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # one command's own sections

    def _figures(self) -> dict[str, Any]:
        """The sections every metric's path starts in (``metrics.METRICS``)."""
        return {"fidelity": self.fidelity, "task": self.task, "cost": self.cost}

    def metric(self, *path: str) -> float | None:
        """The number at ``path`` (``("cost", "size_mb")``), None where it was not measured."""
        return metric(self._figures(), *path)

    def judge(self, wanted: Mapping[str, Any]) -> None:
        """Apply the gates ``wanted`` (name -> threshold; None = not checked): ``gates`` and
        ``passed`` (every gate passes and no problem was found)."""
        self.gates = apply_gates(dict(wanted), self._figures())
        self.passed = all(g.passed for g in self.gates) and not self.problems

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_json(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        fields["gates"] = [dataclasses.asdict(g) for g in self.gates]
        out = {k: fields.pop(k) for k in _ORDER_FIRST}
        if out["name"] is None:
            del out["name"]  # check's report: one bundle, no table name
        out.update(self.details)
        if fields["validated"]:
            del fields["validated"]  # said only where it is false
        out.update(fields)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BundleReport:
        """A report read back from ``report.json`` (or ``edgekd check --json``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"details"}
        known = {k: v for k, v in data.items() if k in names}
        known["gates"] = [GateResult(**g) for g in known.get("gates") or []]
        return cls(**known, details={k: v for k, v in data.items() if k not in names})
