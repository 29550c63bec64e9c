"""``edgekd run pipeline.toml``: distill -> export (one or several targets) -> validate, from one file.

Each stage is skipped when its output is complete and was made from the same resolved config and
the same inputs, so a rerun after a crash or an edit does only what is needed:

- **distill** (``[distill]``, any ``edgekd distill`` setting): up to date when ``OUT/distill.json``
  exists and the stage key (the resolved ``DistillConfig``, the teacher's SHA-256 and the SHA-256
  of every data / prompts / held-out file named) matches the one recorded in ``OUT/.pipeline.json``.
  A run that crashed with that key resumes from its last checkpoint.
- **export** (``[[export]]``, one per target): up to date when the bundle's manifest (hashes
  checked) records the same source model SHA-256 and the same resolved target profile (for
  ``search = true``: the same profile and search validation settings under ``manifest.search``).
- **validate** (``[validate]``, for every exported bundle): up to date when ``REPORT/report.json``
  exists and ``REPORT/.pipeline.json`` records the same bundle manifest SHA-256 and settings.

A bundle whose target's first execution provider this onnxruntime lacks (``cuda`` on a CPU-only
machine) follows ``[validate] missing_provider``: ``skip`` (default: not validated, shown as
skipped, does not fail the run), ``cpu`` (validated on the CPU provider: fidelity of the same
graph, a proxy for the device) or ``fail``.

Paths in the file are relative to the current folder, as on the command line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

from edgekd.device.config import from_mapping, read_toml, to_dict
from edgekd.device.errors import UsageError
from edgekd.device.io import read_json, sha256_file, write_json
from edgekd.distill.config import DistillConfig
from edgekd.distill.run import StudentRun

__all__ = ["PipelineConfig", "load_pipeline", "run_pipeline", "StageResult"]

STAMP = ".pipeline.json"  # hidden: a model folder's fingerprint skips dot files, so it stays stable


@dataclasses.dataclass(frozen=True)
class ExportStage:
    """One ``[[export]]`` table: a bundle for one target."""

    target: str  # cpu | mobile | cuda | path/to/profile.toml
    out: str  # the bundle folder
    search: bool = False  # try the target's [[candidates]]; keep the smallest that passes its gates
    report: str = ""  # the validation report folder (default: OUT-report)

    def __post_init__(self):
        if not self.out:
            raise UsageError(f"[[export]] for target {self.target!r} has no out: add out = \"path/to/bundle\"")

    @property
    def report_dir(self) -> Path:
        return Path(self.report) if self.report else Path(self.out + "-report")


@dataclasses.dataclass(frozen=True)
class ValidateStage:
    """``[validate]``: how every exported bundle is checked (see ``edgekd validate --help``)."""

    enabled: bool = True  # false: stop after export
    num_prompts: Optional[int] = None  # default: the task's validate_prompts, else 8
    answer_tokens: Optional[int] = None  # default: the task's validate_answer_tokens, else 32
    speed: bool = True
    threads: Optional[int] = None
    data: str = ""  # default: the distillation's held-out split, else the shipped prompts
    missing_provider: Literal["skip", "cpu", "fail"] = "skip"  # a target whose provider is absent here

    def config(self, providers: tuple[str, ...] | None = None):
        from edgekd.validate import ValidateConfig

        return ValidateConfig(num_prompts=self.num_prompts, answer_tokens=self.answer_tokens, speed=self.speed,
                              threads=self.threads, data=Path(self.data) if self.data else None, providers=providers)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    model: str = ""  # the model to export when there is no [distill] (a folder, .gguf, known teacher)
    distill: Optional[DistillConfig] = None
    export: tuple[ExportStage, ...] = ()
    validate: ValidateStage = ValidateStage()

    def __post_init__(self):
        if bool(self.model) == (self.distill is not None):
            raise UsageError("give either model = \"...\" (export it as it is) or a [distill] table (distill a student first), not both or neither")
        if self.distill is not None and not self.distill.out:
            raise UsageError("[distill] has no out: add out = \"path/to/student\"")
        if not self.export:
            raise UsageError("the pipeline has no [[export]] table, so it would do nothing: add one per target, "
                             "e.g. [[export]] target = \"cpu\" out = \"runs/bundle-cpu\"")
        # The whole plan is checked before any stage runs: no two stages write one folder, and no
        # output lies inside (or holds) the model or the student it is made from.
        outs = {"[distill] out": self.distill.out} if self.distill is not None else {}
        for i, e in enumerate(self.export):
            outs[f"[[export]] #{i + 1} out"] = e.out
            outs[f"[[export]] #{i + 1} report"] = str(e.report_dir)
        items = list(outs.items())
        for i, (what, folder) in enumerate(items):
            for other, other_folder in items[:i]:
                a, b = Path(_norm(folder)), Path(_norm(other_folder))
                if a == b:
                    raise UsageError(f"{what} and {other} write the same out folder ({folder}): give each its own")
                if a in b.parents or b in a.parents:
                    raise UsageError(f"{what} {folder} and {other} {other_folder} are nested: replacing one would replace the other; give each its own folder")
        if self.distill is None and self.model and Path(self.model).expanduser().exists():
            src = Path(_norm(self.model))
            for what, folder in items:
                dst = Path(_norm(folder))
                if dst == src or src in dst.parents or dst in src.parents:
                    raise UsageError(f"{what} {folder} is inside (or holds) the model it is made from, {self.model}: choose a folder beside it")


def _norm(p: str) -> str:
    return str(Path(p).expanduser().resolve())


def load_pipeline(path: Path) -> PipelineConfig:
    """Read and check a pipeline file (unknown keys and wrong types name the key and the file)."""
    path = Path(path)
    data = read_toml(path)
    if isinstance(data.get("distill"), dict) and data["distill"].get("task"):
        from edgekd.distill.config_io import with_task_defaults

        data = {**data, "distill": with_task_defaults(data["distill"])}
    return from_mapping(PipelineConfig, data, where=str(path))


@dataclasses.dataclass
class StageResult:
    stage: str  # distill | export | validate
    name: str  # what it made: the folder
    status: str  # ran | up to date | skipped | failed | would run
    detail: str = ""
    passed: Optional[bool] = None  # validate (and search) verdict
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Stage keys: what an output was made from
def _read_json(path: Path) -> dict | None:
    try:
        data = read_json(path)
    except (OSError, UsageError):
        return None
    return data if isinstance(data, dict) else None


def distill_key(cfg: DistillConfig) -> dict[str, Any]:
    """The resolved config, the teacher's fingerprint and the hash of every input file named."""
    from edgekd.models import resolve_source

    files = [*cfg.data, cfg.prompts, cfg.heldout]
    inputs = {}
    for f in files:
        if f:
            if not Path(f).is_file():
                raise UsageError(f"[distill] names {f}, which does not exist")
            inputs[f] = sha256_file(Path(f))
    return {"config": to_dict(cfg), "teacher_sha256": resolve_source(cfg.teacher).fingerprint(), "inputs": inputs}


def export_up_to_date(stage: ExportStage, model_sha256: str, profile, search_validate: dict | None) -> tuple[bool, str]:
    """Whether the bundle at ``stage.out`` was made from this model and this profile."""
    from edgekd.device.bundle import Manifest, read_manifest

    out = Path(stage.out)
    if not (out / "manifest.json").is_file():
        return False, "no bundle yet"
    try:
        manifest = Manifest(read_manifest(out, verify=True))
    except UsageError as e:
        return False, f"the bundle is damaged ({e})"
    if manifest.source.sha256 != model_sha256:
        return False, "the model changed"
    if stage.search:
        record = manifest.data.get("search") or {}
        if record.get("profile") != profile.to_dict():
            return False, "the target profile changed" if record else "it was not made by a search"
        if record.get("validate") != search_validate:
            return False, "the search's validation settings changed"
    else:
        if "search" in manifest.data:
            return False, "it was made by a search"
        if manifest.target != profile.to_dict():
            return False, "the target profile changed"
    return True, "same model and profile"


def _can_resume(out: Path, cfg: DistillConfig, stamp: dict | None, key: dict) -> bool:
    """A distill run in ``out`` that stopped before the end, with the same config (and, when one
    was recorded, the same inputs): ``edgekd distill --resume`` continues it from its checkpoint."""
    run = StudentRun(out)
    if not run.stopped_midway():
        return False
    try:
        saved = run.saved_config()
    except UsageError:
        return False
    return saved == cfg and (stamp is None or stamp.get("key") == key)


def _bundle_to_replace(out: Path) -> None:
    """Refuse to replace a folder that is not an edgekd bundle (the user's files)."""
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise UsageError(f"{out} exists and is not an edgekd bundle: refusing to replace it; choose another out")


# ---------------------------------------------------------------------------------------------
def run_pipeline(path: Path, dry_run: bool = False, log: Callable[[str], None] = lambda m: None) -> list[StageResult]:
    """Run (or, with ``dry_run``, plan) every stage of the pipeline file; return what each did.

    A failed gate is a ``passed = False`` result, not an exception: the other targets still run.
    Bad input raises ``UsageError``; a failing distill or export raises ``EdgekdError``.
    """
    import onnxruntime as ort

    from edgekd.export.profile import load_target
    from edgekd.models import resolve_source

    cfg = load_pipeline(Path(path))
    results: list[StageResult] = []
    profiles = {e.target: load_target(e.target) for e in cfg.export}  # bad profiles fail before work
    model, rebuilt = _distill_stage(cfg, dry_run, log, results)  # rebuilt: everything below is stale
    model_sha = None if (rebuilt and dry_run) else resolve_source(model).fingerprint()
    available = set(ort.get_available_providers())
    for e in cfg.export:
        bundle_ok, stale = _export_stage(e, model, model_sha, profiles[e.target], cfg, rebuilt, dry_run, log, results)
        if bundle_ok and cfg.validate.enabled:
            _validate_stage(e, profiles[e.target], cfg, available, stale, dry_run, log, results)
    return results


def _distill_stage(cfg: PipelineConfig, dry_run: bool, log, results: list[StageResult]) -> tuple[str, bool]:
    """The distill stage, when the pipeline has one: the model the exports read, and whether the
    stage ran (or would run)."""
    if cfg.distill is None:
        return cfg.model, False
    d = cfg.distill
    out = Path(d.out)
    key = distill_key(d)
    stamp = _read_json(out / STAMP)
    complete = StudentRun(out).is_complete()
    if complete and stamp is not None and stamp.get("key") == key:
        results.append(StageResult("distill", d.out, "up to date", "same config, teacher and data"))
        return d.out, False
    resume = _can_resume(out, d, stamp, key)
    why = "resuming a run that stopped" if resume else "no student yet" if not complete else "the config, teacher or data changed"
    if dry_run:
        results.append(StageResult("distill", d.out, "would run", why))
        return d.out, True
    from edgekd.distill import distill

    log(f"distill -> {d.out}: {why}")
    t0 = time.time()
    (out / STAMP).unlink(missing_ok=True)
    overwrite = not resume and out.is_dir() and any(out.iterdir())
    result = distill(d, resume=resume, overwrite=overwrite)
    write_json(out / STAMP, {"key": key})  # after distill.json: the stage is complete
    after = result["metrics"]["after"]
    results.append(StageResult("distill", d.out, "ran", f"{why}; held-out top-1 {after['top1_agreement']:.3f}",
                               seconds=time.time() - t0))
    return d.out, True


def _export_stage(e: ExportStage, model: str, model_sha: str | None, profile, cfg: PipelineConfig, rebuilt: bool,
                  dry_run: bool, log, results: list[StageResult]) -> tuple[bool, bool]:
    """One target's export: whether its bundle is there to validate, and whether it is stale."""
    search_validate = cfg.validate.config().record() if e.search else None
    if model_sha is None:
        ok, why = False, "the model is rebuilt"
    else:
        ok, why = export_up_to_date(e, model_sha, profile, search_validate)
    if ok:
        results.append(StageResult("export", e.out, "up to date", why))
        return True, rebuilt
    if dry_run:
        results.append(StageResult("export", e.out, "would run", why))
        return True, True
    return _export(e, model, profile, why, results, log, cfg.validate.config()), True


def _validate_stage(e: ExportStage, profile, cfg: PipelineConfig, available: set[str], stale: bool, dry_run: bool,
                    log, results: list[StageResult]) -> None:
    """One bundle's validation, unless its report is up to date (or its provider is missing and
    the pipeline says to skip or fail)."""
    first = profile.execution_providers[0]
    providers = None
    if first not in available:
        policy = cfg.validate.missing_provider
        note = f"{first} is not available in this onnxruntime"
        if policy == "skip":
            results.append(StageResult("validate", str(e.report_dir), "skipped", f"{note} (missing_provider = skip)"))
            return
        if policy == "fail":
            results.append(StageResult("validate", str(e.report_dir), "failed", f"{note} (missing_provider = fail)", passed=False))
            return
        providers = ("CPUExecutionProvider",)
    vcfg = cfg.validate.config(providers)
    report = e.report_dir
    if dry_run and stale:
        results.append(StageResult("validate", str(report), "would run", "the bundle is rebuilt"))
        return
    key = {"bundle_manifest_sha256": sha256_file(Path(e.out) / "manifest.json"), "config": vcfg.record()}
    stamp = _read_json(report / STAMP) or {}
    previous = _read_json(report / "report.json")
    if previous is not None and stamp.get("key") == key:
        failed = stamp.get("failed") or []
        results.append(StageResult("validate", str(report), "up to date", "same bundle and settings; " + (
            "all gates pass" if not failed else "fails " + "; ".join(failed)), passed=bool(previous.get("passed"))))
        return
    why = "no report yet" if previous is None else "the bundle or the settings changed"
    if dry_run:
        results.append(StageResult("validate", str(report), "would run", why))
        return
    results.append(_validate(e, vcfg, key, why, log))


def _export(e: ExportStage, model: str, profile, why: str, results: list[StageResult], log, search_config) -> bool:
    """Run one export stage; a search that finds no passing candidate is a failed stage."""
    from edgekd.export import export_bundle
    from edgekd.search import NoCandidatePasses, search_export

    out = Path(e.out)
    _bundle_to_replace(out)
    log(f"export -> {e.out} ({profile.name}{', search' if e.search else ''}): {why}")
    t0 = time.time()
    if e.search:
        try:
            result = search_export(model, profile, out, overwrite=True, validate_config=search_config, log=log)
        except NoCandidatePasses as err:
            results.append(StageResult("export", e.out, "failed", str(err), passed=False, seconds=time.time() - t0))
            return False
        detail = f"{why}; search kept {result.chosen!r}"
    else:
        manifest = export_bundle(model, profile, out, overwrite=True, log=log)
        detail = f"{why}; {manifest['export_check']['model_bytes'] / 1e6:.1f} MB"
    results.append(StageResult("export", e.out, "ran", detail, seconds=time.time() - t0))
    return True


def _validate(e: ExportStage, vcfg, key: dict, why: str, log) -> StageResult:
    from edgekd.validate import failed_gates, validate

    log(f"validate {e.out} -> {e.report_dir}: {why}")
    t0 = time.time()
    reports, out = validate([Path(e.out)], vcfg, out=e.report_dir, log=log)
    failed = failed_gates(reports)
    write_json(out / STAMP, {"key": key, "failed": failed})
    detail = f"{why}; " + ("all gates pass" if not failed else "fails " + "; ".join(failed))
    return StageResult("validate", str(e.report_dir), "ran", detail, passed=not failed, seconds=time.time() - t0)
