"""Target profiles: where they are, and the fidelity gates they set.

A profile is a TOML file (``targets/cpu.toml``, ``mobile.toml``, ``cuda.toml``, ``web.toml``, or a
user's copy). Its ``[gates]`` table holds the thresholds ``edgekd validate`` and ``edgekd check``
apply, read here (``load_gates``: nothing else in the file, so a device needs no export code to
check a bundle). The rest of the file is the export's: ``edgekd.export.profile`` loads it whole.

    target_path("cpu")                # a shipped profile's file, by name
    load_gates("my-phone.toml")       # its [gates] and its name
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from edgekd.device.config import from_mapping, read_toml, require
from edgekd.device.errors import UsageError

SHIPPED = ("cpu", "mobile", "cuda", "web")


@dataclasses.dataclass(frozen=True)
class Gates:
    """Thresholds ``edgekd validate`` applies; None = not checked. "reference" = the unquantized
    PyTorch model that was exported."""

    min_top1_vs_reference: Optional[float] = None
    max_kl_vs_reference: Optional[float] = None
    max_ppl_ratio_vs_reference: Optional[float] = None
    min_greedy_prefix_vs_reference: Optional[float] = None
    min_greedy_exact_vs_reference: Optional[float] = None
    min_top1_vs_teacher: Optional[float] = None
    max_kl_vs_teacher: Optional[float] = None
    max_ppl_ratio_vs_teacher: Optional[float] = None
    max_size_mb: Optional[float] = None
    # a task's figures (edgekd.device.tasks): usually set in the task's task.toml, a target may set them too
    min_label_agreement_vs_teacher: Optional[float] = None
    min_balanced_label_agreement_vs_teacher: Optional[float] = None
    max_accuracy_drop_vs_teacher: Optional[float] = None
    # against the people's labels where the held-out records carry them: the bundle's accuracy minus
    # the uncalibrated teacher's (0: right at least as often as the teacher as it comes)
    min_accuracy_gain_vs_bare_teacher: Optional[float] = None
    min_exact_match_vs_teacher: Optional[float] = None
    min_rouge_l_vs_teacher: Optional[float] = None
    # decode tokens/s at batch 1 where validate or check runs (a device's own profile sets it)
    min_decode_tokens_per_s: Optional[float] = None
    # resident memory the bundle adds to its process answering a 480-token prompt, MB (validate and check measure it)
    max_peak_rss_mb: Optional[float] = None

    def __post_init__(self):
        for name in ("min_top1_vs_reference", "min_top1_vs_teacher", "min_greedy_exact_vs_reference", "min_label_agreement_vs_teacher",
                     "min_balanced_label_agreement_vs_teacher", "max_accuracy_drop_vs_teacher", "min_exact_match_vs_teacher",
                     "min_rouge_l_vs_teacher"):
            v = getattr(self, name)
            require(v is None or 0.0 <= v <= 1.0, f"gates.{name} = {v}: use a fraction between 0 and 1")
        v = self.min_accuracy_gain_vs_bare_teacher
        require(v is None or -1.0 <= v <= 1.0, f"gates.min_accuracy_gain_vs_bare_teacher = {v}: use a difference of fractions, -1 to 1")
        for name in ("max_kl_vs_reference", "max_kl_vs_teacher", "min_greedy_prefix_vs_reference", "min_decode_tokens_per_s"):
            v = getattr(self, name)
            require(v is None or v >= 0.0, f"gates.{name} = {v}: must be >= 0")
        for name in ("max_ppl_ratio_vs_reference", "max_ppl_ratio_vs_teacher", "max_size_mb", "max_peak_rss_mb"):
            v = getattr(self, name)
            require(v is None or v > 0.0, f"gates.{name} = {v}: must be > 0")


def target_path(target: str | Path) -> Path:
    """The file of a shipped profile's name (``cpu``, ``mobile``, ``cuda``) or of a ``.toml`` path."""
    from edgekd.device.paths import resource

    text = str(target)
    if text in SHIPPED:
        return resource(f"targets/{text}.toml")
    path = Path(text).expanduser()
    if not path.is_file():
        raise UsageError(f"target {text!r} is neither a shipped profile ({', '.join(SHIPPED)}) nor an existing .toml file")
    return path


def load_gates(target: str | Path) -> tuple[Gates, str]:
    """Only a profile's ``[gates]`` (and its name), for the device check: nothing else in the file is
    read, so no export step (nor onnx) is needed to check its gates."""
    path = target_path(target)
    data = read_toml(path)
    return from_mapping(Gates, data.get("gates") or {}, where=f"{path} [gates]"), str(data.get("name") or path.stem)
