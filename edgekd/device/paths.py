"""Where shipped resources (target profiles, example prompts) live, and safe path handling."""

from __future__ import annotations

from pathlib import Path

from edgekd.device.errors import UsageError

# In a source checkout (and an editable install) the resources sit beside the package; a wheel
# carries them as edgekd/shipped/{targets,tasks,examples} (pyproject.toml).
_PKG = Path(__file__).resolve().parent.parent  # edgekd/, above this folder
_ROOTS = (_PKG.parent, _PKG / "shipped")
SHIPPED_TRAIN = "examples/prompts/train.jsonl"  # general prompts: distill's default, calibration
SHIPPED_HELDOUT = "examples/prompts/heldout.jsonl"  # held out from them: distill's and validate's default


def resource(relative: str) -> Path:
    """The path of a shipped resource such as ``targets/cpu.toml`` or ``examples/prompts.jsonl``."""
    for root in _ROOTS:
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise UsageError(f"edgekd's resource {relative!r} is missing: reinstall edgekd")


def inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``root``, refusing absolute paths, ``..`` and symlinks that escape.

    Used for every path read from a bundle's manifest or an ONNX external-data location.
    """
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or relative.strip() == "":
        raise UsageError(f"refused path {relative!r}: it escapes the bundle {root}")
    root_resolved = root.resolve()
    target = (root / rel).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise UsageError(f"refused path {relative!r}: it resolves outside the bundle {root} (symlink?)")
    return target
