"""What the student learns from: the training and held-out records (files, or the teacher's
answers to prompts, reused by a rerun with the same key), and the teacher's top-k log-probs per
answer position (kept from the teacher's own generation logits, or a cache pass over the records).

    data/train.jsonl, data/heldout.jsonl    the records (each process writes its own part)
    data/topk/                              the top-k captured while the teacher answered
    cache/topk-*.safetensors                the cache pass, when nothing was captured
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from edgekd.device.errors import EdgekdError, UsageError
from edgekd.device.paths import SHIPPED_HELDOUT, SHIPPED_TRAIN, resource
from edgekd.distill import cache as tcache
from edgekd.distill.config import DistillConfig
from edgekd.distill.data import (
    Example,
    examples_digest,
    file_digest,
    read_prompts,
    read_records,
)
from edgekd.distill.generate import generate_answers
from edgekd.distill.loop import progress_bar

HELDOUT = "data/heldout.jsonl"  # the held-out split distill.json names (what `edgekd validate` uses)


def _shipped(relative: str) -> Path:
    return resource(relative)


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """What the teacher's passes over a distill run's data read: its settings, its folder, the
    teacher and its tokenizer, the teacher's fingerprint (answers and caches are keyed by it), the
    processes (accelerate's) and where progress is said."""

    cfg: DistillConfig
    out: Path
    teacher: Any
    tok: Any
    fingerprint: str
    accel: Any
    say: Callable[..., None]


def training_records(run: TeacherRun) -> tuple[list[dict], dict]:
    """The training records: ``--data`` files as they are, or teacher answers to ``--prompts``
    (default: the task's train.jsonl, else the shipped prompts), generated once and cached in
    ``data/train.jsonl``. A prompts file whose every record has a response is used as it is."""
    cfg = run.cfg
    if cfg.data:
        records = []
        for f in cfg.data:
            records += read_records(Path(f))
        return records, {"source": "files", "files": [str(Path(f).resolve()) for f in cfg.data],
                         "sha256": file_digest(Path(f) for f in cfg.data)}
    path = Path(cfg.prompts) if cfg.prompts else task_of(cfg).train if cfg.task else _shipped(SHIPPED_TRAIN)
    task = task_of(cfg) if cfg.task and not cfg.prompts else None  # the task's own file: its prompt_template
    if path.suffix.lower() != ".txt":
        given = read_records(path)
        if all(isinstance(r.get("response"), str) for r in given):
            given = given[: cfg.max_prompts] if cfg.max_prompts else given
            given = task.records(given) if task else given
            return given, {"source": "file responses", "prompts_file": str(path.resolve()), "prompts": len(given)}
    prompts = [task.prompt(p) for p in read_prompts(path)] if task else read_prompts(path)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    records = teacher_answers(run, run.out / "data" / "train.jsonl", prompts, "training", capture=captures_topk(cfg))
    info = {"source": "teacher answers", "prompts_file": str(path.resolve()), "prompts": len(prompts),
            "finished_answers": sum(r["finished"] for r in records)}
    if captures_topk(cfg):
        info["answers_key"] = answers_key(cfg, run.fingerprint, prompts)
    if cfg.task and task_of(cfg).labels:
        info["answers_without_label"] = check_labels(records, task_of(cfg).labels, run.say)
    return records, info


def task_of(cfg: DistillConfig):
    from edgekd.device.tasks import load_task

    return load_task(cfg.task)


def check_labels(records: list[dict], labels, say) -> int:
    """Count the teacher answers that name none of the task's labels: warn, or refuse when none do."""
    from edgekd.device.tasks import label_of

    missing = sum(label_of(r["response"], labels) is None for r in records)
    if missing == len(records):
        raise UsageError(f"none of the teacher's {len(records)} answers names a label ({', '.join(labels)}): "
                         "the task's prompts must ask for one of its labels, or the teacher cannot do this task")
    if missing:
        say(f"warning: {missing} of {len(records)} teacher answers name none of the labels ({', '.join(labels)})", style="yellow")
    return missing


def heldout_records_for(run: TeacherRun) -> list[dict]:
    """Held-out ``{"prompt", "response"}`` records in ``data/heldout.jsonl``: the file's own
    responses when it has them, else the teacher's answers. Never trained on."""
    cfg = run.cfg
    path = Path(cfg.heldout) if cfg.heldout else task_of(cfg).heldout if cfg.task else _shipped(SHIPPED_HELDOUT)
    records = read_records(path)
    for n, r in enumerate(records, 1):
        if "prompt" not in r:
            raise UsageError(f"{path}: held-out record {n} needs a 'prompt' (and optionally a 'response')")
    if cfg.task and not cfg.heldout:  # the task's own file: its prompt_template
        records = task_of(cfg).records(records)
    if cfg.max_heldout:
        records = records[: cfg.max_heldout]
    if all("response" in r for r in records):
        records = [{"prompt": r["prompt"], "response": r["response"], "finished": r.get("finished", True)} for r in records]
        if run.accel.is_main_process:
            _write_jsonl(run.out / HELDOUT, records)
        run.accel.wait_for_everyone()
        return records
    return teacher_answers(run, run.out / HELDOUT, [r["prompt"] for r in records], "held-out")


def answers_key(cfg, fingerprint: str, prompts: list[str]) -> str:
    """What the teacher's answers depend on: a rerun with the same key reuses them."""
    prefix = answer_prefix(cfg)
    key = json.dumps([fingerprint, prompts, cfg.max_new_tokens, cfg.gen_temperature, cfg.gen_top_p, cfg.seed, cfg.max_length, "v2"]
                     + ([prefix] if prefix else []), sort_keys=True)
    return __import__("hashlib").sha256(key.encode()).hexdigest()


def answer_prefix(cfg) -> str:
    """How the task's answers open (``answer_prefix`` in task.toml), given to the teacher."""
    return task_of(cfg).spec.answer_prefix if cfg.task else ""


def captures_topk(cfg) -> bool:
    """Whether the training answers keep the teacher's top-k as they are generated (then the
    teacher cache needs no second pass): answer-only loss, with the cache on (and no
    intermediate-state KD, whose teacher runs in the loop, nor an answer prefix, whose positions
    the generation does not compute)."""
    return cfg.cache_teacher and not cfg.train_on_prompt and cfg.alpha > 0 and not cfg.hidden_loss and not answer_prefix(cfg)


def teacher_answers(run: TeacherRun, path: Path, prompts: list[str], what: str, capture: bool = False) -> list[dict]:
    """Teacher answers to ``prompts`` in ``path`` (jsonl), reused when its key matches. ``capture``:
    keep the teacher's top-k log-probs of every answer position, read off the generation's own
    logits, in ``<path folder>/topk/`` (the teacher cache's format, keyed by the answers' key)."""
    cfg, teacher, accel, say = run.cfg, run.teacher, run.accel, run.say
    key = answers_key(cfg, run.fingerprint, prompts)
    meta = path.with_suffix(".key")
    if path.is_file() and meta.is_file() and meta.read_text().strip() == key:
        say(f"reusing the teacher's {what} answers in {path}")
        return _read_jsonl(path)
    rank, world = accel.process_index, accel.num_processes
    mine = list(range(rank, len(prompts), world))
    with progress_bar(accel.is_main_process, None, tokens=True) as progress:
        task = progress.add_task(f"teacher answers ({what})", total=len(mine), loss=float("nan"), tps=0.0)
        t0, done_tokens = time.time(), 0

        def on_batch(n, tokens):
            nonlocal done_tokens
            done_tokens += tokens
            progress.update(task, advance=n, tps=done_tokens / max(time.time() - t0, 1e-9))

        answers, truncated = generate_answers(
            teacher, run.tok, [prompts[i] for i in mine], max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p, batch_size=cfg.gen_batch_size, seed=cfg.seed + 1000 * rank,
            max_prompt_tokens=max(8, cfg.max_length - cfg.max_new_tokens), on_batch=on_batch,
            keep_topk=cfg.top_k if capture else 0, kd_temperature=cfg.temperature,
            vocab=teacher.get_output_embeddings().weight.shape[0], answer_prefix=answer_prefix(cfg))
    if capture:
        tcache.write_part(path.parent / "topk", key, rank, world, _captured_part(answers, mine))
    if truncated:
        say(f"{truncated} {what} prompts were longer than max_length - max_new_tokens and were cut from the left", style="yellow")
    part = path.parent / f".{path.name}.part{rank}"
    _write_jsonl(part, answers)
    accel.wait_for_everyone()
    if accel.is_main_process:
        merged: list[dict | None] = [None] * len(prompts)
        for r in range(world):
            p = path.parent / f".{path.name}.part{r}"
            for j, rec in enumerate(_read_jsonl(p)):
                merged[r + j * world] = rec
            p.unlink()
        _write_jsonl(path, merged)
        meta.write_text(key + "\n")
    accel.wait_for_everyone()
    return _read_jsonl(path)


def _captured_part(answers: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
    """The top-k that ``generate_answers`` kept, in the teacher cache's layout (popped from the records)."""
    logps, idxs, starts, counts, row = [], [], [], [], 0
    for a in answers:
        logp, idx = a.pop("topk")
        logps.append(logp)
        idxs.append(idx)
        starts.append(row)
        counts.append(logp.shape[0])
        row += logp.shape[0]
    return {"logp": torch.cat(logps), "idx": torch.cat(idxs), "example": torch.tensor(indices, dtype=torch.long),
            "start": torch.tensor(starts, dtype=torch.long), "count": torch.tensor(counts, dtype=torch.long)}


def _write_jsonl(path: Path, records: Sequence[dict | None]) -> None:
    from edgekd.device.io import atomic_write_bytes, jsonl_text

    atomic_write_bytes(path, jsonl_text(records).encode())


def _read_jsonl(path: Path) -> list[dict]:
    """What ``_write_jsonl`` wrote."""
    from edgekd.device.io import iter_jsonl

    return [rec for _, rec in iter_jsonl(path)]


def captured_cache(run: TeacherRun, data_info: dict, records: list[dict], examples: list[Example], vocab: int):
    """The teacher's top-k kept while it wrote the answers, when it covers exactly these examples
    (one per record, targets on the generated tokens, same vocabulary), else None."""
    key = data_info.get("answers_key")
    if not key or len(examples) != len(records):
        return None
    table = tcache.load(run.out / "data" / "topk", key, len(examples))
    if table is None:
        return None
    for i, (ex, rec) in enumerate(zip(examples, records)):
        logp, idx = table[i]
        if logp.shape[0] != ex.n_targets or len(rec.get("answer_ids") or ()) != ex.n_targets or logp.shape[1] != min(run.cfg.top_k, vocab) \
                or (idx.numel() and int(idx.max()) >= vocab):
            return None
    run.say("teacher cache: the top-k kept while the teacher wrote the answers (no second teacher pass)")
    return table


def teacher_cache(run: TeacherRun, examples: list[Example], vocab: int, device):
    """Load the teacher-logit cache for these examples, or build it (each process its share)."""
    cfg, accel, say = run.cfg, run.accel, run.say
    key = tcache.cache_key(run.fingerprint, examples_digest(examples), cfg.top_k, cfg.temperature, vocab)
    folder = run.out / "cache"
    table = tcache.load(folder, key, len(examples))
    if table is not None:
        say(f"teacher cache: reusing {folder}")
        return table
    rank, world = accel.process_index, accel.num_processes
    mine = list(range(rank, len(examples), world))
    t0, seen = time.time(), [0]

    def advance(n: int, tokens: int) -> None:
        seen[0] += tokens
        progress.update(task, advance=n, tps=seen[0] / max(time.time() - t0, 1e-9))

    with progress_bar(accel.is_main_process, None, tokens=True) as progress:
        task = progress.add_task("teacher cache (top-k)", total=len(mine), loss=float("nan"), tps=0.0)
        part = tcache.teacher_topk(run.teacher, examples, mine, k=cfg.top_k, temperature=cfg.temperature, vocab=vocab,
                                   batch_size=max(cfg.batch_size, 8), chunk_size=cfg.chunk_size, device=device,
                                   on_batch=advance)
    tcache.write_part(folder, key, rank, world, part)
    accel.wait_for_everyone()
    if accel.is_main_process:
        for stale in tcache.stale_parts(folder, key):
            stale.unlink(missing_ok=True)
    table = tcache.load(folder, key, len(examples))
    if table is None:
        raise EdgekdError(f"the teacher cache in {folder} could not be read back: is the disk full?")
    return table


def fit_calibration(run: TeacherRun):
    """The run's ``Calibration`` (``edgekd.distill.calibrate``), or None where it does not apply.

    ``auto``: from labels where the calibration data (``--calibration-data``, else the training
    prompts) carry them, else from the task's ``label_prior``, else off. The teacher answers the
    fitting prompts once, greedily and bare, keeping its label tokens' logits; the fit is kept in
    ``data/calibration.json`` and reused by a rerun with the same key."""
    from edgekd.distill import calibrate as cal
    from edgekd.distill.loop import label_token_groups

    cfg, say = run.cfg, run.say
    task = task_of(cfg) if cfg.task else None
    if cfg.calibrate == "off" or task is None or not task.labels:
        if cfg.calibrate in ("prior", "labels"):
            raise UsageError(f"--calibrate {cfg.calibrate} needs a labelled task (--task with labels = [...] in its task.toml)")
        return None
    if cfg.data and not cfg.calibration_data:
        if cfg.calibrate != "auto":
            raise UsageError(f"--calibrate {cfg.calibrate} with --data: the answers are yours, not the teacher's; pass --calibration-data to calibrate the teacher's targets")
        return None
    if cfg.calibration_data:
        rows = read_records(Path(cfg.calibration_data))
    else:
        rows = task.records(read_records(task.train)) if not cfg.prompts else read_records(Path(cfg.prompts))
    rows = [r for r in rows if isinstance(r.get("prompt"), str)][: cfg.calibration_records]
    truths = [r.get("label") if isinstance(r.get("label"), str) else None for r in rows]
    has_labels = sum(t is not None for t in truths) >= 2 * len(task.labels)
    method = cfg.calibrate if cfg.calibrate != "auto" else "labels" if has_labels else "prior" if task.spec.label_prior else None
    if method is None:
        say("no calibration: the task declares no label_prior and its prompts carry no labels (calibrate = auto)", style="yellow")
        return None
    groups = label_token_groups(run.tok, task.labels)
    prompts = [r["prompt"] for r in rows]
    key = json.dumps([run.fingerprint, prompts, truths, method, list(task.spec.label_prior), cfg.max_new_tokens, task.spec.answer_prefix, "cal-v1"])
    key = __import__("hashlib").sha256(key.encode()).hexdigest()
    path = run.out / "data" / "calibration.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            found = cal.Calibration.from_record(saved["calibration"])
            say(f"reusing {path}: {found.describe()}")
            return found
    say(f"calibrating the teacher's labels ({method}) on {len(prompts)} prompts ...")
    answers, _ = generate_answers(run.teacher, run.tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0,
                                  batch_size=cfg.gen_batch_size, seed=cfg.seed, max_prompt_tokens=max(8, cfg.max_length - cfg.max_new_tokens),
                                  keep_logits_of=[i for g in groups for i in g], answer_prefix=task.spec.answer_prefix)
    import numpy as np

    named = [(z, t) for z, t in zip(cal.generated_scores(answers, groups), truths) if z is not None]
    z, named_truths = [z for z, _ in named], [t for _, t in named]

    found = cal.fit(method, task.labels, groups, np.array(z).reshape(len(z), len(groups)),
                    truths=named_truths if any(named_truths) else None, prior=task.spec.label_prior or None)
    if run.accel.is_main_process:
        from edgekd.device.io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps({"key": key, "calibration": found.record()}, indent=1).encode())
    run.accel.wait_for_everyone()
    say(found.describe())
    return found


def label_rows(examples: Sequence[Example], prefix_ids: Sequence[int], names: set[int]) -> dict[int, int]:
    """Example index -> the row of its cached targets that predicts the token right after the
    task's answer prefix (its last occurrence), where that token names a label."""
    out: dict[int, int] = {}
    n = len(prefix_ids)
    for i, ex in enumerate(examples):
        end = next((p + n for p in range(len(ex.ids) - n, -1, -1) if ex.ids[p : p + n] == list(prefix_ids)), None)
        if end is None or end >= len(ex.ids) or ex.ids[end] not in names or not ex.target[end]:
            continue
        out[i] = sum(ex.target[1:end])  # loss rows before it: position p predicts token p + 1
    return out


def restrict_to_labels(table: dict, examples: Sequence[Example], prefix_ids: Sequence[int], groups) -> int:
    """Where an answer names its label right after the task's answer prefix, make the teacher's
    cached target there its (calibrated) distribution over the label tokens alone, renormalised:
    the task says a label comes there, so the mass the teacher puts on openings such as
    " overwhelmingly" is not taught. Without it a student that cannot tell a review apart falls
    back on the one label whose mass is not spread over such words (measured: a student that said
    "negative" on 86% of its own balanced training reviews). Returns how many targets changed."""
    names = {i for g in groups for i in g}
    label_ids = torch.tensor(sorted(names), dtype=torch.int32)
    changed = 0
    for i, row in label_rows(examples, prefix_ids, names).items():
        logp, idx = table[i]
        keep = torch.isin(idx[row], label_ids)
        if not bool(keep.any()):
            continue
        logp = logp.clone()
        kept = logp[row].masked_fill(~keep, float("-inf"))
        logp[row] = (kept - torch.logsumexp(kept, -1)).masked_fill(~keep, -40.0)  # finite: 0 * log 0 stays 0
        table[i] = (logp, idx)
        changed += 1
    return changed
