"""``edgekd validate``: is the shipped bundle still the model, and what does it cost to run?

Top to bottom, for each bundle: open it with the runtime (hashes checked, execution providers
from its target); measure speed and memory in a fresh process; pick the held-out prompts; load
the reference (the unquantized model it was exported from) and the teacher with PyTorch, refusing
a tokenizer that differs from the bundle's; when the data has no answers, let each of them answer
greedily; compare logits on those answers (teacher-forced through the bundle's KV cache) and the
bundle's own greedy answers with theirs;
apply the target's gates; write ``report.json``, ``report.md`` and plots.

Imports stay lazy here: ``edgekd.device.speed`` runs in a process that must not load torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.device.bundle_report import BundleReport
from edgekd.device.errors import UsageError

__all__ = ["ValidateConfig", "validate", "failed_gates"]

DEFAULT_PROMPTS = 8  # held-out prompts compared when neither --num-prompts nor a task says
DEFAULT_ANSWER_TOKENS = 32  # answer tokens scored and generated when neither --answer-tokens nor a task says
EXAMPLES_SHOWN = 4  # held-out prompts shown with the teacher's, the reference's and the bundle's answers


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """What ``edgekd validate`` compares and how much. Defaults are sized so a validate of the
    SmolLM2 teacher's cpu bundle takes a minute or two on 2 cores (CI runs it)."""

    teacher: str | None = None  # default: the manifest's source.teacher, else the reference itself
    reference: str | None = None  # default: the manifest's source.spec (the unquantized model)
    data: Path | None = None  # default: the distillation's held-out split, else the shipped prompts
    num_prompts: int | None = None  # held-out prompts compared (None: the task's validate_prompts, else 8)
    answer_tokens: int | None = None  # answer length scored and generated (None: the task's, else 32)
    speed: bool = True  # measure load time, prefill, decode and peak memory (a separate process)
    providers: tuple[str, ...] | None = None  # override the target's execution providers
    threads: int | None = None  # onnxruntime intra-op threads (None: one per physical core)
    batch_size: int = 8  # PyTorch batch for the reference/teacher forward and greedy answers
    target: str | None = None  # a profile whose gates apply whatever the bundle's manifest says
    task: str | None = None  # a task (name or folder) to score on, whatever the manifest says

    def __post_init__(self):
        if self.num_prompts is not None and self.num_prompts < 1:
            raise UsageError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.answer_tokens is not None and self.answer_tokens < 1:
            raise UsageError(f"--answer-tokens must be >= 1, got {self.answer_tokens}")

    def record(self) -> dict[str, Any]:
        """The settings as the pipeline's stamps and a search's manifest record them. ``task`` came
        later: left out while unset, so what earlier versions recorded still matches."""
        from edgekd.device.config import to_dict

        table = to_dict(self)
        if table.get("task") is None:
            table.pop("task", None)
        return table


def _bundle_name(path: Path, taken: set[str]) -> str:
    name = Path(path).resolve().name or str(path)
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


class _Models:
    """PyTorch models loaded once per spec, with their answers and logits cached per prompt set."""

    def __init__(self, batch_size: int, log: Callable[[str], None]):
        self.batch_size, self.log = batch_size, log
        self.models: dict[str, Any] = {}
        self.cache: dict[tuple, Any] = {}

    def get(self, spec: str, role: str, calibration: dict[str, Any] | None = None):
        """The model of ``spec``; ``calibration`` (a task's record of it): a copy of its own whose
        head carries the calibration's bias, under the name ``calibrated_name(spec)``."""
        key = calibrated_name(spec) if calibration else spec
        if key not in self.models:
            from edgekd.validate.fidelity import TorchModel

            self.log(f"loading the {role} {key} with PyTorch ...")
            self.models[key] = TorchModel(spec, role, self.batch_size)
            if calibration:
                from edgekd.distill.calibrate import Calibration, apply_bias

                apply_bias(self.models[key].model, Calibration.from_record(calibration))
        return self.models[key]

    def memo(self, key: tuple, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, computed once per ``key``."""
        if key not in self.cache:
            self.cache[key] = fn(*args)
        return self.cache[key]


def calibrated_name(spec: str) -> str:
    """How a calibrated teacher is named in a report (and keyed in validate's caches)."""
    return f"{spec} (calibrated)"


def answer_room(n: int, prompts: list[list[int]], context: int) -> int:
    """``n`` answer tokens, capped so that the longest prompt and its answer fit the context."""
    longest = max(len(p) for p in prompts)
    if longest + 1 >= context:
        raise UsageError(f"a prompt of {longest} tokens fills the bundle's {context}-token context: use shorter prompts")
    return min(n, context - longest - 1)


def _task_figures(task: dict[str, Any], records: list[dict], texts: dict[str, list[str]], rt, teacher_read,
                  label_tokens: tuple[tuple[int, ...], ...] = ()) -> dict[str, Any]:
    """The task's figures of the bundle's answers against the teacher's (``tasks.score_answers``),
    the reference's beside them, and, for a labelled task, how decided the teacher's labels were
    (``teacher_read``: the teacher's answers, its greedy ones or the split's, and its logits on them;
    ``label_tokens``: the tokens naming each label, for the teacher's ranking)."""
    from edgekd.device.data import record_truths
    from edgekd.device.metrics import TASK_FIGURES
    from edgekd.device.tasks import label_margins, score_answers, task_inputs

    labels = task.get("labels") or ()
    margins = None
    if labels and teacher_read is not None:
        answers, logits = teacher_read
        margins = label_margins(answers, logits, labels, lambda ids: rt.tokenizer.decode(list(ids)),
                                lambda text: rt.tokenizer.encode(text, add_special_tokens=False).ids)
    truths = record_truths(records, task.get("folder"), task.get("prompt_template") or "{prompt}")
    figures = {"name": task.get("name"), **score_answers(texts["bundle"], texts["teacher"], labels, truths=truths,
                                                         inputs=task_inputs([r["prompt"] for r in records]), teacher_margins=margins)}
    reference = score_answers(texts["reference"], texts["teacher"], labels)  # only its gated figures are kept
    figures["reference_vs_teacher"] = {k: reference[k] for k in TASK_FIGURES if k in reference}
    if labels and truths and teacher_read is not None and isinstance(figures.get("truth"), dict) and figures["truth"].get("labelled"):
        truth = figures["truth"]
        truth.update(_teacher_judgement(task, list(truths), teacher_read, labels, label_tokens))
        if truth.get("teacher_bare_accuracy") is not None:
            truth["accuracy_gain_vs_bare_teacher"] = truth["accuracy"] - truth["teacher_bare_accuracy"]
    return figures


def _teacher_judgement(task: dict[str, Any], truths: list[str | None], teacher_read, labels, label_tokens) -> dict[str, Any]:
    """Where the records carry labels (``truths``): how well the teacher ranks them (AUC of its label
    score, two labels) and, when it taught calibrated, how often it was right without the calibration."""
    from edgekd.distill import calibrate as cal

    calibration = cal.Calibration.from_record(task["calibration"]) if task.get("calibration") else None
    token_ids = calibration.token_ids if calibration is not None else label_tokens
    if not token_ids:
        return {}
    answers, logits = teacher_read
    scores = cal.read_scores(answers, logits, token_ids, calibration.bias if calibration is not None else None)
    lower = [label.lower() for label in labels]
    rows = [(z, lower.index(t.lower())) for z, t in zip(scores, truths) if z is not None and t and t.lower() in lower]
    out: dict[str, Any] = {}
    labelled = sum(1 for t in truths if t)
    if rows and calibration is not None:  # over every labelled record, as the bundle's accuracy: no label named is wrong
        out["teacher_bare_accuracy"] = sum(int(np.argmax(z)) == y for z, y in rows) / labelled
    if rows and len(labels) == 2:
        z = np.array([r[0] for r in rows])
        out["teacher_auc"] = cal.auc(z[:, 0] - z[:, 1], np.array([r[1] == 0 for r in rows]))
    return out


@dataclasses.dataclass
class _Run:
    """What every bundle of one ``validate`` shares: the settings, the held-out records and where
    they came from, the task, the gates a target pins, the PyTorch models, the per-prompt KLs for
    the plots, and the progress line."""

    config: ValidateConfig
    say: Callable[[str], None]
    models: _Models
    records: list[dict[str, Any]]
    data_path: Path
    data_source: str
    data_notes: list[str]
    task: dict[str, Any] | None
    pinned: tuple[dict[str, Any], str] | None
    kls: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Compared:
    """One bundle against the reference and the teacher on the held-out prompts."""

    fidelity: dict[str, Any]  # role -> logits and greedy figures
    texts: dict[str, list[str]]  # "bundle", "reference", "teacher" -> greedy answers
    teacher_read: tuple[list, list] | None  # the teacher's answers and its logits on them: how decided its labels were
    answer_tokens: int
    asked: int  # the answer tokens asked for, before the bundle's context capped them
    answers_from: str


def validate(
    bundles: Sequence[str | Path],
    config: ValidateConfig = ValidateConfig(),
    out: Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    command: str | None = None,
) -> tuple[list[BundleReport], Path]:
    """Validate each bundle; write the report into ``out`` (default: ``<first bundle>-report``).

    Returns ``(reports, out)``: one ``BundleReport`` per bundle (``report.json`` holds them, each
    with ``passed`` and ``gates``) and the folder written.
    Raises ``UsageError`` for bad input; a failed gate is not an exception here (see
    ``failed_gates``), so the report is always written first.

    The stages: open every bundle (hashes checked) -> choose the held-out records and the gates
    (``_prepare``) -> per bundle, time it, compare it with the reference and the teacher, score
    the task and apply the gates (``_validate_bundle``) -> write the report.
    """
    import time

    from edgekd.device.report import check_out, write_report

    if not bundles:
        raise UsageError("no bundle given: pass one or more folders written by `edgekd export`")
    t_start = time.perf_counter()

    def say(msg: str) -> None:  # every progress line carries the time since the start
        log(f"[{time.perf_counter() - t_start:5.0f} s] {msg}")

    paths = [Path(b) for b in bundles]
    out = Path(out) if out is not None else paths[0].resolve().with_name(paths[0].resolve().name + "-report")
    check_out(out, inputs=tuple(paths))
    runtimes = _open_bundles(paths, config, say)
    run = _prepare(config, runtimes[0], say)
    taken: set[str] = set()
    reports = [_validate_bundle(run, p, rt, _bundle_name(p, taken)) for p, rt in zip(paths, runtimes)]

    say(f"writing the report into {out}")
    for r in reports:
        r.details["validate_seconds"] = round(time.perf_counter() - t_start, 1)
        gate = next((g.threshold for g in r.gates if g.name == "max_kl_vs_reference"), None)
        r.details["plots"] = {"kl_gate": gate}
    write_report(out, [r.to_json() for r in reports], run.kls, command)
    return reports, out


def _open_bundles(paths: list[Path], config: ValidateConfig, say: Callable[[str], None]) -> list:
    """Every bundle opened first: a tampered or foreign folder fails before minutes of work."""
    from edgekd.device.runtime import Runtime

    runtimes = []
    for p in paths:
        say(f"opening {p} (checking file hashes) ...")
        runtimes.append(Runtime(p, providers=config.providers, threads=config.threads))
    for rt in runtimes:
        for note in rt.warnings:
            say(f"warning: {rt.root}: {note}")
    return runtimes


def _prepare(config: ValidateConfig, first, say: Callable[[str], None]) -> _Run:
    """The gates a target pins, the task (the first bundle's, or ``config.task``) and the held-out records."""
    from edgekd.device.data import choose_data, load_records

    pinned = None
    if config.target is not None:  # a release pipeline pins its gates: the bundle cannot loosen them
        from edgekd.device.config import to_dict
        from edgekd.device.targets import load_gates

        gates, name = load_gates(config.target)
        pinned = (to_dict(gates), f"the target profile {name} (--target {config.target})")
    task = first.manifest.source.task
    task_heldout, chosen = None, None
    if config.task is not None:  # e.g. the teacher's own bundle, scored on the user's job
        from edgekd.device.tasks import load_task

        chosen = load_task(config.task)
        task, task_heldout = chosen.record(), chosen.heldout
    data_path, data_source, data_notes = choose_data(config.data, task_heldout=task_heldout, heldout=first.manifest.source.heldout)
    num_prompts = config.num_prompts or (task or {}).get("validate_prompts") or DEFAULT_PROMPTS
    records = load_records(data_path, limit=num_prompts)
    if chosen is not None and data_path == task_heldout:  # the task's own file: its prompt_template
        records = chosen.records(records)
    say(f"{len(records)} held-out prompts from {data_source} ({data_path})")
    return _Run(config, say, _Models(config.batch_size, say), records, data_path, data_source, list(data_notes), task, pinned)


def _validate_bundle(run: _Run, p: Path, rt, name: str) -> BundleReport:
    """One bundle's report: its cost, its fidelity to the reference and the teacher, its task
    figures and its gates."""
    from edgekd.device.speed import environment

    manifest, source, config = rt.manifest, rt.manifest.source, run.config
    notes = list(run.data_notes)
    ref_spec = config.reference or source.spec
    if not ref_spec:
        raise UsageError(f"{p}'s manifest names no source model: pass --reference MODEL")
    teacher_spec = config.teacher or source.teacher
    if not teacher_spec:
        teacher_spec = ref_spec
        notes.append("no teacher recorded in the manifest: the reference is compared as the teacher")
    cost = _cost(run, p, rt, name)
    from edgekd.device.tokenizer import SentencePieceTokenizer, open_tokenizer

    # the models' vocabularies are compared with tokenizer.json's, which the runtime may have opened as its SentencePiece twin
    vocabulary = open_tokenizer(p, None) if isinstance(rt.tokenizer, SentencePieceTokenizer) else rt.tokenizer
    reference = run.models.get(ref_spec, "reference")
    reference.check_tokenizer(vocabulary)
    calibration = (run.task or {}).get("calibration")  # the teacher as it taught: calibrated where it was
    teacher = run.models.get(teacher_spec, "teacher", calibration)
    teacher.check_tokenizer(vocabulary)
    if calibration:
        teacher_spec = calibrated_name(teacher_spec)
    compared = _compare(run, p, rt, name, {"reference": (ref_spec, reference), "teacher": (teacher_spec, teacher)})
    texts, records = compared.texts, run.records
    cost["reference_fp32_mb"] = (manifest.export_check.get("fp32_model_bytes") or 0) / 1e6 or None
    cost["teacher_fp32_mb"] = teacher.fp32_bytes() / 1e6
    cost["size_vs_teacher_fp32"] = cost["size_mb"] / cost["teacher_fp32_mb"]
    n, asked = compared.answer_tokens, compared.asked
    report = BundleReport(
        name=name, bundle=str(p.resolve()), target=manifest.target_name,
        environment=environment(config.threads, rt.session.get_providers()),
        fidelity=compared.fidelity,
        task=_task_figures(run.task, records, texts, rt, compared.teacher_read, _label_tokens(run.task, teacher)) if run.task else None,
        examples=[{"prompt": records[i]["prompt"], "teacher": texts["teacher"][i], "reference": texts["reference"][i],
                   "bundle": texts["bundle"][i]} for i in range(min(EXAMPLES_SHOWN, len(records)))],
        cost=cost,
        details={"model_sha256": manifest.model_sha256, "providers": rt.session.get_providers(), "warnings": list(rt.warnings),
                 "reference": ref_spec, "teacher": teacher_spec,
                 "data": {"file": str(run.data_path), "source": run.data_source, "prompts": len(records), "answer_tokens": n,
                          **({"answer_tokens_asked": asked} if n < asked else {}), "answers_from": compared.answers_from},
                 "notes": notes},
    )
    _apply_gates(report, run, manifest)
    return report


def _label_tokens(task: dict[str, Any] | None, teacher) -> tuple[tuple[int, ...], ...]:
    """The teacher's tokens naming each of a labelled task's labels (``label_token_groups``), or ()."""
    from edgekd.distill.loop import label_token_groups

    labels = (task or {}).get("labels") or ()
    try:
        return label_token_groups(teacher.tokenizer, labels) if labels else ()
    except UsageError:  # a label no token names alone: no ranking figure
        return ()


def _cost(run: _Run, p: Path, rt, name: str) -> dict[str, Any]:
    """Size, and (``config.speed``) load time, prefill, decode, peak memory and the decode's share
    of the bandwidth roofline, measured in a fresh process."""
    from edgekd.device.bundle import bundle_decode_weight_bytes
    from edgekd.device.speed import measure_memory, measure_speed, memory_cost, roofline

    manifest, config = rt.manifest, run.config
    cost: dict[str, Any] = {"size_mb": manifest.model_bytes / 1e6, "bundle_mb": manifest.bundle_bytes / 1e6}
    if config.speed:
        run.say(f"{name}: measuring load time, prefill, decode and peak memory ...")
        speed = measure_speed(p, list(config.providers) if config.providers else None, config.threads)
        cost.update({k: speed[k] for k in ("load_s", "prefill_ms", "prefill_tokens", "decode_tokens_per_s")})
        cost.update(memory_cost(measure_memory(p, list(config.providers) if config.providers else None, config.threads)))
        cost.update(roofline(speed["decode_tokens_per_s"], bundle_decode_weight_bytes(p, manifest), speed["read_bandwidth_bytes_per_s"]))
    return cost


def _compare(run: _Run, p: Path, rt, name: str, models: dict[str, tuple[str, Any]]) -> _Compared:
    """The bundle's logits and greedy answers against each of ``models`` (role -> (spec, TorchModel)).
    The same token ids go to the bundle and to PyTorch: encoded once, by the bundle's tokenizer."""
    from edgekd.device.fidelity import Example, bundle_greedy, bundle_logits, compare_greedy, compare_logits
    from edgekd.device.runtime import answer_text

    config, records, say, memo = run.config, run.records, run.say, run.models.memo
    prefix = (run.task or {}).get("answer_prefix") or ""  # the task's answers open with it, given
    prompts = [rt.encode_prompt(r["prompt"], answer_prefix=prefix) for r in records]
    pkey = tuple(map(tuple, prompts))
    eos = sorted(rt.eos_token_ids)
    n = config.answer_tokens or (run.task or {}).get("validate_answer_tokens") or DEFAULT_ANSWER_TOKENS
    asked, n = n, answer_room(n, prompts, rt.context_length)
    if n < asked:
        say(f"{name}: answers capped at {n} tokens (asked {asked}): the longest prompt and its answer fill the bundle's {rt.context_length}-token context")
    given = None
    if all("response" in r for r in records):
        # a split written with the task's answer prefix: the prompts carry it, the answers go on after it
        texts_given = [r["response"][len(prefix):] if prefix and r["response"].startswith(prefix) else r["response"] for r in records]
        given = [rt.tokenizer.encode(t, add_special_tokens=False).ids[:n] or eos[:1] for t in texts_given]
        answers_from = f"{run.data_source} (teacher-forced)"
    else:
        # Each model is compared on its own greedy answers: the reference's for "vs reference",
        # the teacher's for "vs teacher" (what a distilled student was trained to imitate).
        answers_from = "each compared model's own greedy answers"

    say(f"{name}: greedy answers of the bundle through its KV cache ...")
    ours_greedy = bundle_greedy(rt, prompts, n)
    fidelity: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    teacher_read = None
    for role, (spec, model) in models.items():
        say(f"{name}: comparing with the {role} ({spec}) ...")
        their_greedy = memo(("greedy", spec, n, pkey), model.greedy, prompts, n, eos)
        answers = given if given is not None else their_greedy
        examples = [Example(pr, an) for pr, an in zip(prompts, answers)]
        akey = tuple(map(tuple, answers))
        ours = memo(("bundle", str(p.resolve()), pkey, akey), bundle_logits, rt, examples)
        theirs = memo(("logits", spec, pkey, akey), model.logits, examples)
        metrics, kl = compare_logits(ours, theirs, answers)
        fidelity[role] = {**metrics, **compare_greedy(ours_greedy, their_greedy, n), "model": spec}
        texts[role] = [answer_text(rt.tokenizer, a, rt.eos_token_ids) for a in their_greedy]
        if role == "teacher":  # the teacher's logits on its answers (its greedy ones, or those it wrote for the split)
            teacher_read = (answers, theirs)
        if role == "reference":  # per prompt, for the plots
            run.kls[name] = np.split(kl, np.cumsum([len(a) for a in answers])[:-1])
    texts["bundle"] = [answer_text(rt.tokenizer, a, rt.eos_token_ids) for a in ours_greedy]
    return _Compared(fidelity, texts, teacher_read, n, asked, answers_from)


def _apply_gates(report: BundleReport, run: _Run, manifest) -> None:
    """The target's gates (pinned, else the bundle's own) and the task's, applied to ``report``."""
    task = run.task
    task_gates = {k: v for k, v in ((task or {}).get("gates") or {}).items() if v is not None}
    if run.pinned is not None:
        target_gates, report.gates_from = run.pinned
    else:
        target_gates = manifest.gates
        report.gates_from = f"the bundle's own manifest (target {report.target}); pin them with --target"
    if task and task_gates:
        report.gates_from += f", and the task {task.get('name')}'s task.toml"
    report.judge({**target_gates, **task_gates})


def failed_gates(reports: Sequence[BundleReport]) -> list[str]:
    """``"bundle: gate: value (needs op threshold)"`` for every failed gate."""
    return [f"{r.name}: {g.line()}" for r in reports for g in r.failed]
