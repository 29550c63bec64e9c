"""Read a ``DistillConfig`` from TOML + flags, and write the resolved one back as TOML."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgekd.device.config import from_mapping, read_toml, to_dict
from edgekd.device.errors import UsageError
from edgekd.device.io import atomic_write_bytes
from edgekd.device.outputs import DISTILL_TOML_MARKER
from edgekd.distill.config import DistillConfig
from edgekd.distill.run import StudentRun

# Settings a --resume may change: they do not change what the finished steps computed.
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "out"}


def resolve(config_file: Path | None, flags: Mapping[str, Any], *, resume_from: Path | None = None) -> DistillConfig:
    """Defaults < the task's ``[distill]`` table < the run's saved ``distill.toml`` (with --resume)
    < ``--config`` file < flags."""
    data: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    run = StudentRun(resume_from) if resume_from is not None else None
    if run is not None and run.is_ours():
        saved = read_toml(run.config_toml)
        data.update(saved)
    where = "flags"
    if config_file is not None:
        data.update(read_toml(Path(config_file)))
        where = str(config_file)
    data.update({k: v for k, v in flags.items() if v is not None})
    data = with_task_defaults(data)
    cfg = from_mapping(DistillConfig, data, where)
    if saved and run is not None:  # saved is only read with --resume
        before = from_mapping(DistillConfig, saved, str(run.config_toml))
        for f in dataclasses.fields(DistillConfig):
            if f.name not in RESUMABLE_CHANGES and getattr(before, f.name) != getattr(cfg, f.name):
                raise UsageError(
                    f"--resume: {f.name} was {getattr(before, f.name)!r} in {run.config_toml} and is now "
                    f"{getattr(cfg, f.name)!r}; resume with the same settings or start a new run"
                )
    return cfg


def with_task_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` over the ``[distill]`` table of the task it names (if any): a task's defaults sit
    under every setting the user gave."""
    if not data.get("task"):
        return dict(data)
    from edgekd.device.tasks import TASK_TOML, load_task

    task = load_task(data["task"])
    from_mapping(DistillConfig, task.spec.distill, f"{task.folder / TASK_TOML} [distill]")  # its keys and types
    return {**task.spec.distill, **data}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_config_toml(path: Path, cfg: DistillConfig) -> None:
    lines = [DISTILL_TOML_MARKER + "\n"]  # first: it marks the folder as a run of edgekd's
    lines += [f"{k} = {_toml_value(v)}\n" for k, v in to_dict(cfg).items()]
    atomic_write_bytes(Path(path), "".join(lines).encode())
