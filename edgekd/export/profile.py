"""A target profile, loaded: the export's recipe for one kind of device, as data.

A profile is a TOML file (``targets/cpu.toml``, ``mobile.toml``, ``cuda.toml``, ``web.toml``, or a
user's copy) loaded into the frozen ``TargetProfile`` below. It names the export steps to run, in
order (``steps``); each step reads its settings from the table of the same name, whose keys are the
fields of the step's settings class, declared beside the step's code (``edgekd.export.steps``).
``[check]`` bounds export's own probe against PyTorch; ``[gates]`` holds the fidelity thresholds
validate applies (``edgekd.device.targets``); ``[[candidates]]`` are the recipes ``export --search`` tries.
Every key is documented in the shipped files.

    load_target("cpu")                # a shipped profile, by name
    load_target("my-phone.toml")      # a file
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from edgekd.device import config
from edgekd.device.config import read_toml, require, to_dict
from edgekd.device.errors import UsageError
from edgekd.device.targets import Gates, target_path
from edgekd.export.steps import STEPS


@dataclasses.dataclass(frozen=True)
class Check:
    """What export measures against PyTorch on a short probe (prompt + one cached decode step)."""

    atol_fp32: float = 1e-3  # the unquantized ONNX export must match PyTorch this closely (else: a bug)
    max_abs_logit_diff: float = 1.0  # the final model may drift this far; export fails beyond it

    def __post_init__(self):
        require(self.atol_fp32 > 0, "check.atol_fp32 must be > 0")
        require(self.max_abs_logit_diff > 0, "check.max_abs_logit_diff must be > 0")


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    """A profile file's tables, checked. ``to_dict``/``from_mapping`` are the file's shape (the
    manifest's ``target`` table): the step tables at the top level beside the profile's own keys."""

    name: str
    description: str = ""
    opset: int = 17
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    steps: tuple[str, ...] = ()
    external_data: bool = False  # weights in model.onnx.data beside the graph (forced above 2 GB)
    # "edgekd": model.onnx (or model.ort) at the bundle's root; "transformers.js": the folder
    # transformers.js v4 loads (onnx/model_<dtype>.onnx, config.json's transformers.js_config)
    layout: Literal["edgekd", "transformers.js"] = "edgekd"
    check: Check = Check()
    gates: Gates = Gates()
    # `edgekd export --search`: recipes to try, in order of preference, each a [[candidates]] table
    # with a name and the tables it overrides (checked like the profile itself; see edgekd/search/).
    candidates: tuple[dict, ...] = ()
    # every registered step's settings by the step's name (in the file: the table of that name),
    # its class's defaults where the file has no table: settings["matmul_nbits"].bits. Read-only:
    # with_settings gives a profile with other settings
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        require(14 <= self.opset <= 21, f"opset = {self.opset}: use 14..21 (17 is what optimum-onnx tests)")
        require(len(self.execution_providers) > 0, "execution_providers is empty: list at least CPUExecutionProvider")
        for s in self.steps:
            require(s in STEPS, f"unknown step {s!r} in steps (known: {', '.join(sorted(STEPS))})")
        require(len(set(self.steps)) == len(self.steps), "steps lists a step twice")
        require("to_ort" not in self.steps or self.steps[-1] == "to_ort", "to_ort must be the last step")
        require(self.layout != "transformers.js" or ("to_ort" not in self.steps and not self.external_data),
                'layout = "transformers.js" loads one .onnx file: drop to_ort from steps and set external_data = false')
        classes = _settings_classes()
        for name, value in self.settings.items():
            require(name in classes, f"settings[{name!r}]: no registered step has that name")
            require(isinstance(value, classes[name]), f"settings[{name!r}] must be a {classes[name].__name__}")
        settings = {name: self.settings[name] if name in self.settings else cls() for name, cls in classes.items()}
        object.__setattr__(self, "settings", types.MappingProxyType(settings))
        if self.candidates:
            resolve_candidates(self)  # an unknown key or a wrong type in a candidate fails at load

    def step_settings(self, step: str) -> Any:
        """The settings a step reads (its table in the file), or None for a step without one."""
        return self.settings.get(step)

    def with_settings(self, **settings: Any) -> TargetProfile:
        """This profile with some steps' settings replaced: ``with_settings(matmul_nbits=...)``."""
        return dataclasses.replace(self, settings={**self.settings, **settings})

    def to_dict(self) -> dict[str, Any]:
        """The profile as its file has it: each step's settings a table named as the step, after
        ``check`` (where the manifest's ``target`` table has always had them)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "settings":
                out[f.name] = to_dict(getattr(self, f.name))
            if f.name == "check":
                out.update({name: to_dict(s) for name, s in self.settings.items()})
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> TargetProfile:
        """A profile from a file's table (or ``to_dict``'s): the errors name the key and ``where``,
        in the file's order."""
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: expected a table of settings")
        classes = _settings_classes()
        known = sorted({f.name for f in dataclasses.fields(cls)} - {"settings"} | set(classes))
        unknown = [key for key in data if key not in known]
        if unknown:
            raise UsageError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(known)})")
        settings: dict[str, Any] = {}
        for name in (key for key in data if key in classes):
            if not isinstance(data[name], Mapping):
                raise UsageError(f"{where}: [{name}] must be a table")
            settings[name] = config.from_mapping(classes[name], data[name], where, prefix=f"{name}.")
        own = {k: v for k, v in data.items() if k not in classes}
        return config.from_mapping(cls, {**own, "settings": settings}, where)


def _settings_classes() -> dict[str, type]:
    """Each registered step's settings class, by the step's name."""
    classes = {name: s.settings for name, s in STEPS.items() if s.settings is not None}
    taken = sorted(set(classes) & {f.name for f in dataclasses.fields(TargetProfile)})
    if taken:
        raise RuntimeError(f"export step {taken[0]!r} is named as a profile key: its table would be that key; rename the step")
    return classes


def load_target(target: str | Path) -> TargetProfile:
    """A shipped profile by name (``cpu``, ``mobile``, ``cuda``) or a path to a ``.toml`` file."""
    path = target_path(target)
    data = read_toml(path)
    data.setdefault("name", path.stem)
    return TargetProfile.from_mapping(data, where=str(path))


# ---------------------------------------------------------------------------------------------
# Candidates (`edgekd export --search`): data in the profile, resolved into full profiles
OWN_KEYS = ("name", "description", "mixed_precision")  # a candidate's own keys, not profile overrides
FIXED_KEYS = ("name", "description", "gates", "execution_providers", "candidates")  # not overridable


@dataclasses.dataclass(frozen=True)
class CandidateMeta:
    """A candidate's own keys (the rest of its table overrides the profile)."""

    name: str
    description: str = ""
    mixed_precision: bool = False  # the search keeps the most sensitive layers at 8 bits

    def __post_init__(self):
        if not self.name.strip() or not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise UsageError(f"candidate name {self.name!r}: use letters, digits, '-', '_', '.' or '+'")


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    mixed_precision: bool
    overrides: dict  # the table as written (without its own keys)
    profile: TargetProfile  # the target's settings with this candidate's overrides, no candidates


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    """``base`` with ``overrides``; a table overrides key by key (one level, as profiles nest)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def resolve_candidates(profile) -> list[Candidate]:
    """Every ``[[candidates]]`` table of ``profile`` as a full ``TargetProfile``.

    Each is built with ``from_mapping`` from the profile's own settings overlaid with the table, so
    an unknown key or a wrong type is the same error as in the profile itself, naming the candidate.
    """
    base = profile.to_dict()
    base["candidates"] = []
    out: list[Candidate] = []
    for i, raw in enumerate(profile.candidates, 1):
        where = f"target {profile.name!r}, [[candidates]] #{i}"
        if not isinstance(raw, Mapping):
            raise UsageError(f"{where}: must be a table with a name")
        if "name" not in raw:
            raise UsageError(f"{where}: has no name: add name = \"...\"")
        where = f"target {profile.name!r}, candidate {raw['name']!r}"
        meta = config.from_mapping(CandidateMeta, {k: raw[k] for k in OWN_KEYS if k in raw}, where)
        overrides = {k: v for k, v in raw.items() if k not in OWN_KEYS}
        for key in FIXED_KEYS:
            if key in overrides:
                raise UsageError(f"{where}: '{key}' cannot be set per candidate: every candidate is held to the target's {key}")
        resolved = TargetProfile.from_mapping(_merge(base, overrides), where)
        if meta.mixed_precision and not ("matmul_nbits" in resolved.steps and resolved.settings["matmul_nbits"].bits == 4):
            raise UsageError(f"{where}: mixed_precision needs the matmul_nbits step with bits = 4 (it keeps some layers at 8)")
        if any(c.name == meta.name for c in out):
            raise UsageError(f"{where}: two candidates are named {meta.name!r}: give each a different name")
        out.append(Candidate(meta.name, meta.description, meta.mixed_precision, dict(overrides), resolved))
    return out
