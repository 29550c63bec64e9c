"""What the search tried and what it keeps: each candidate's validation, the pick (the smallest
passing bundle, the fastest within ``SIZE_TIE`` of it), and the result recorded in the manifest."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from edgekd.device.bundle_report import BundleReport
from edgekd.device.gates import GateFailed, GateResult
from edgekd.export.profile import Candidate

SIZE_TIE = 0.02  # passing bundles within 2% of the smallest size are ranked by decode speed

# ---------------------------------------------------------------------------------------------
# The search
@dataclasses.dataclass
class Tried:
    """One exported (or failed) candidate and what validation measured."""

    name: str
    description: str
    overrides: dict
    bundle: Path | None
    report: BundleReport | None = None
    error: str | None = None
    int8_layers: list[int] | None = None
    skipped: str | None = None  # why it was not tried (it could not have won)
    same_as: str | None = None  # an earlier candidate whose export gave the same model files (its report reused)

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed

    def metric(self, *path: str) -> float | None:
        return None if self.report is None else self.report.metric(*path)

    @property
    def size_mb(self) -> float:
        """The model's size (measured for every validated candidate; inf for one that failed before)."""
        value = self.metric("cost", "size_mb")
        return float("inf") if value is None else value

    def shortfall(self) -> float:
        """How far the worst failed gate is from its threshold, relative to it (0 = passes)."""
        if self.report is None:
            return math.inf
        return max((_gap(g) for g in self.report.failed), default=0.0)

    def record(self) -> dict:
        return {
            "name": self.name, "description": self.description, "overrides": self.overrides,
            "int8_layers": self.int8_layers, "error": self.error, "skipped": self.skipped, "same_as": self.same_as,
            "passed": self.passed,
            "size_mb": self.metric("cost", "size_mb"),
            "decode_tokens_per_s": self.metric("cost", "decode_tokens_per_s"),
            "top1_vs_reference": self.metric("fidelity", "reference", "top1"),
            "kl_vs_reference": self.metric("fidelity", "reference", "kl_mean"),
            "top1_vs_teacher": self.metric("fidelity", "teacher", "top1"),
            "gates": [dataclasses.asdict(g) for g in self.report.gates] if self.report else [],
        }


def _gap(g: GateResult) -> float:
    if g.value is None:
        return math.inf
    return abs(g.value - g.threshold) / max(abs(g.threshold), 1e-12)


@dataclasses.dataclass
class SearchResult:
    target: str
    tried: list[Tried]
    chosen: str | None
    chosen_index: int | None  # into ``tried`` (a mixed candidate may be tried more than once)
    out: Path | None
    sensitivity: dict[str, dict]
    validate: dict
    seconds: float

    def record(self) -> dict:
        return {"target": self.target, "chosen": self.chosen, "chosen_index": self.chosen_index, "candidates": [t.record() for t in self.tried],
                "sensitivity": self.sensitivity, "validate": self.validate, "size_tie": SIZE_TIE,
                "seconds": round(self.seconds, 1)}

    def closest(self) -> str:
        """The candidate that came closest to passing, and its failed gates (closest first)."""
        best = min(self.tried, key=lambda t: t.shortfall())
        if best.report is None:
            return f"every candidate failed to export (first: {self.tried[0].name}: {self.tried[0].error})"
        failed = sorted(best.report.failed, key=_gap)
        return f"closest: {best.name!r}, which fails " + "; ".join(g.line() for g in failed)


class NoCandidatePasses(GateFailed):
    """Every candidate failed a gate (exit 1); ``result`` holds what was measured."""

    def __init__(self, message: str, result: SearchResult):
        super().__init__(message)
        self.result = result


def _over_budget(bundle: Path, max_size_mb: float | None) -> BundleReport | None:
    """A report with only the failed size gate when the bundle is over ``max_size_mb``, else None."""
    from edgekd.device.bundle import Manifest, read_manifest

    if max_size_mb is None:
        return None
    size = Manifest(read_manifest(bundle, verify=False)).model_bytes / 1e6
    if size <= max_size_mb:
        return None
    report = BundleReport(bundle=str(bundle), cost={"size_mb": size}, validated=False)
    report.judge({"max_size_mb": max_size_mb})
    return report


def model_digest(bundle: Path) -> str:
    """What a runtime loads from ``bundle``, as one hash: its manifest's file hashes but the golden
    replay's. Two candidates with the same digest are the same model (e.g. an int8-head setting
    on a student whose head export keeps on its int4 grid), so one validation speaks for both."""
    import hashlib

    from edgekd.device.bundle import read_manifest

    files = read_manifest(bundle, verify=False)["files"]
    kept = sorted((f["path"], f["sha256"]) for f in files if f["path"] != "golden.json")
    return hashlib.sha256(repr(kept).encode()).hexdigest()


def _beaten(mixed: Candidate, cands: Sequence[Candidate], tried: Sequence[Tried]) -> str | None:
    """Why ``mixed`` cannot win, or None. Its smallest form is its 4-bit base recipe (8-bit layers
    only add bytes): when that recipe was tried as a fixed candidate and is over the size budget,
    or something at or below its size passes, the mixed candidate cannot be the pick."""
    base = next((t for c, t in zip((c for c in cands if not c.mixed_precision), tried)
                 if c.profile == mixed.profile and t.report is not None), None)
    if base is None:
        return None
    floor = base.size_mb
    budget = mixed.profile.gates.max_size_mb
    if budget is not None and floor > budget:
        return f"its 4-bit base {base.name!r} is already over max_size_mb ({floor:.1f} MB > {budget:g})"
    winner = min((t for t in tried if t.passed and t.size_mb <= floor),
                 key=lambda t: t.size_mb, default=None)
    if winner is None:
        return None
    return (f"{winner.name!r} passes at {winner.size_mb:.1f} MB, no more than its 4-bit base "
            f"{base.name!r} ({floor:.1f} MB)")


def _pick(tried: Sequence[Tried]) -> Tried | None:
    """The smallest passing candidate; among those within ``SIZE_TIE`` of it, the fastest."""
    passing = [t for t in tried if t.passed]
    if not passing:
        return None
    smallest = min(t.size_mb for t in passing)
    close = [t for t in passing if t.size_mb <= smallest * (1 + SIZE_TIE)]
    return max(close, key=lambda t: (t.metric("cost", "decode_tokens_per_s") or 0.0, -t.size_mb))


