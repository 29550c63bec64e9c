"""A distill run's folder: the hand-off between ``edgekd distill`` and what reads its output
(``edgekd export``, the pipeline, ``--resume``). The file names are said here once, and
``distill.json`` is read into typed fields instead of ``data.get(...)`` at every reader.

::

    OUT/distill.toml     the resolved config, written first: the folder is a run of ours
    OUT/checkpoints/     while training; removed when the run completes
    OUT/metrics.jsonl    one line per step and per evaluation
    OUT/distill.json     written last: the run is complete when it exists

Light on purpose (no torch): export and the pipeline read runs without training anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgekd.device.bundle import QatGrid
from edgekd.device.errors import UsageError

CONFIG_TOML = "distill.toml"
DISTILL_JSON = "distill.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a complete run's ``distill.json`` says, as export and validate use it."""

    teacher: str | None  # the teacher's spec
    heldout: Path | None  # the held-out split (absolute), what validate compares on
    task: dict[str, Any] | None  # the task's record (edgekd.device.tasks.Task.record), or None
    quantization_aware: QatGrid | None  # the --qat-bits grid the student was trained on
    data: dict[str, Any]  # the whole file, for what has no field of its own


@dataclasses.dataclass(frozen=True)
class StudentRun:
    """An ``edgekd distill --out`` folder, finished or not."""

    folder: Path

    @property
    def config_toml(self) -> Path:
        return self.folder / CONFIG_TOML

    @property
    def result_json(self) -> Path:
        return self.folder / DISTILL_JSON

    @property
    def checkpoints(self) -> Path:
        return self.folder / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS

    def is_ours(self) -> bool:
        """edgekd distill wrote this folder: its distill.toml (written first) or distill.json carries
        edgekd's marker. A file of the user's that only has the name is not enough."""
        from edgekd.device.outputs import DISTILL_RUN, edgekd_output

        return edgekd_output(self.folder) == DISTILL_RUN

    def is_complete(self) -> bool:
        return self.result_json.is_file()

    def stopped_midway(self) -> bool:
        """Started, not complete, with checkpoints to resume from."""
        return self.is_ours() and not self.is_complete() and self.checkpoints.is_dir()

    def saved_config(self):
        """The run's ``distill.toml`` as a ``DistillConfig`` (UsageError naming the file if bad)."""
        from edgekd.device.config import from_mapping, read_toml
        from edgekd.distill.config import DistillConfig

        return from_mapping(DistillConfig, read_toml(self.config_toml), str(self.config_toml))

    def write_result(self, data: dict[str, Any]) -> RunResult:
        """Write ``distill.json`` (atomically; last, as its presence means the run is complete) from
        what the trainer measured, read back as the ``RunResult`` export and validate will see."""
        from edgekd.device.io import write_json

        result = self._parse(data)
        write_json(self.result_json, data)
        return result

    def result(self) -> RunResult | None:
        """The complete run's ``distill.json``, or None when the run is not complete."""
        if not self.is_complete():
            return None
        from edgekd.device.io import read_json

        data = read_json(self.result_json, ": re-run `edgekd distill` or remove it")
        if not isinstance(data, dict):
            raise UsageError(f"{self.result_json} must hold a JSON object: re-run `edgekd distill` or remove it")
        return self._parse(data)

    def _parse(self, data: dict[str, Any]) -> RunResult:
        held = data.get("heldout")
        return RunResult(
            teacher=data.get("teacher"),
            heldout=(self.folder / held).resolve() if held else None,
            task=data.get("task") or None,
            quantization_aware=QatGrid.from_table((data.get("student") or {}).get("quantization_aware"), str(self.result_json)),
            data=data,
        )
