"""``distill(cfg)``: setup -> teacher answers -> teacher cache -> train (one loop) -> save.

The same code runs on one CPU, one GPU (bf16 autocast) and under ``accelerate launch
--num_processes N``: every process builds the same batch plan and takes its rows of each global
batch, gradients are averaged by DDP, metrics are summed across processes, and files are written
by the main process only (each process writes its own part of the data and cache files).

The output folder, as the run goes::

    distill.toml          the resolved config (written first; ``--config`` it to rerun)
    data/train.jsonl      teacher answers (sequence-level KD), reused by a rerun with the same key
    data/heldout.jsonl    held-out {"prompt", "response"} records: what `edgekd validate` uses
    cache/topk-*.safetensors   the teacher-logit cache
    checkpoints/step-N/   atomic checkpoints (deleted once the run has finished)
    metrics.jsonl         one line per step and per evaluation
    model.safetensors, config.json, tokenizer*, generation_config.json   the student
    distill.json          written last: the run is complete when it exists
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgekd import __version__
from edgekd.config import to_dict
from edgekd.distill import cache as tcache
from edgekd.distill import checkpoint as ckpt
from edgekd.distill.config import DistillConfig
from edgekd.distill.data import (
    Example,
    collate,
    common_prefix,
    encode_records,
    examples_digest,
    expand_cache,
    file_digest,
    generate_answers,
    padding_waste,
    plan_epoch,
    read_prompts,
    read_records,
    steps_per_epoch,
)
from edgekd.distill.losses import LossSpec, TeacherTargets, fused_head_loss
from edgekd.distill.students import build_student
from edgekd.errors import EdgekdError, UsageError
from edgekd.io import proc_kib_field, write_json
from edgekd.paths import resource
from edgekd.quant import GRID, attach_fake_quantize, bake_fake_quantize, refresh_fake_quantize

DISTILL_JSON = "distill.json"
CONFIG_TOML = "distill.toml"
HELDOUT = "data/heldout.jsonl"
SHIPPED_TRAIN = "examples/prompts/train.jsonl"
SHIPPED_HELDOUT = "examples/prompts/heldout.jsonl"


class StudentLoss(torch.nn.Module):
    """The student plus its loss, as one module, so DDP sees the whole forward.

    ``forward(input_ids, attention_mask (B, S), loss_mask (B, S) bool, labels (B, S), teacher)``
    -> ``(loss_sum, n_agree)`` over the positions where ``loss_mask`` is set.

    ``prefix_len = P > 0``: every row starts with the same P tokens and none of them carries loss
    (a task's chat template, system prompt and instruction): they are run once, as one row, and
    their keys and values are shared by the batch, so a batch costs B x (S - P) + P tokens, not
    B x S. Exact: the same loss and gradients (``tests/test_distill.py``).
    """

    def __init__(self, model, spec: LossSpec, chunk_size: int, prefix_len: int = 0):
        super().__init__()
        self.model, self.spec, self.chunk_size, self.prefix_len = model, spec, chunk_size, prefix_len

    def forward(self, input_ids, attention_mask, loss_mask, labels, teacher: TeacherTargets):
        decoder, P = self.model.get_decoder(), self.prefix_len
        if P:
            hidden = shared_prefix_forward(decoder, input_ids, attention_mask, P)
            loss_mask, labels = loss_mask[:, P:], labels[:, P:]
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.model.get_output_embeddings()
        return fused_head_loss(hidden[loss_mask], head.weight, labels[loss_mask], teacher, self.spec, self.chunk_size, head.bias)


def shared_prefix_forward(decoder, input_ids, attention_mask, P: int):
    """Hidden states ``(B, S - P, hidden)`` of positions P.. of every row, the first P tokens (the
    same in every row) run once and their key/value cache expanded to the batch."""
    B, S = input_ids.shape
    shared = expand_cache(decoder(input_ids=input_ids[:1, :P], use_cache=True).past_key_values, B)
    positions = torch.arange(P, S, device=input_ids.device)[None].expand(B, -1)
    return decoder(input_ids=input_ids[:, P:], attention_mask=attention_mask, past_key_values=shared,
                   position_ids=positions, use_cache=True).last_hidden_state


def shared_prefix_len(examples: list[Example], minimum: int = 8) -> int:
    """How many leading tokens every example shares, none of them predicting a target (0 when
    fewer than ``minimum``: not worth a second forward call)."""
    n = common_prefix([e.ids for e in examples], minimum=0)
    for e in examples:
        t0 = next((j for j, t in enumerate(e.target) if t), len(e.target))
        n = min(n, t0 - 1)  # position t0 - 1 predicts the first target: it must stay in the batch part
    return n if n >= minimum else 0


def lr_at(step: int, total: int, cfg: DistillConfig) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` (as in nanoGPT)."""
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def distill(cfg: DistillConfig, *, resume: bool = False, overwrite: bool = False, console=None, preloaded=None) -> dict[str, Any]:
    """Run a distillation as ``cfg`` says; return what ``distill.json`` records.

    ``preloaded``: an already loaded ``(teacher, tokenizer)`` for ``cfg.teacher`` (benchmarks that
    run several configurations against one teacher); it is used as it is, so load it with the
    dtype ``cfg.teacher_dtype`` asks for.

    One writer per ``--out`` (a lock beside it); a run refused for bad input leaves a folder it
    created as it found it (absent)."""
    from edgekd.io import output_lock

    if not cfg.out:
        raise UsageError("no output folder: pass --out DIR")
    out = Path(cfg.out)
    fresh = not out.exists()
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch only the main process writes --out
    with output_lock(out) if main else contextlib.nullcontext():
        try:
            return _distill(cfg, resume=resume, overwrite=overwrite, console=console, preloaded=preloaded)
        except UsageError:
            if fresh and main:
                shutil.rmtree(out, ignore_errors=True)
            raise


def _distill(cfg: DistillConfig, *, resume: bool, overwrite: bool, console, preloaded) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from edgekd.teachers import load_model, resolve_source

    t_start = time.time()
    out = Path(cfg.out)
    device_is_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    mixed = {"auto": "bf16" if device_is_cuda else "no", "fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.student_dtype]
    accel = Accelerator(mixed_precision=mixed, cpu=not device_is_cuda)
    main, rank, world, device = accel.is_main_process, accel.process_index, accel.num_processes, accel.device
    say = _sayer(console, main)

    # ---- setup: output folder, teacher, student ------------------------------------------
    if main:
        prepare_out_dir(out, cfg, resume=resume, overwrite=overwrite)
    accel.wait_for_everyone()
    set_seed(cfg.seed)
    source = resolve_source(cfg.teacher)
    t_dtype = {"auto": torch.bfloat16 if device_is_cuda else torch.float32, "fp32": torch.float32,
               "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.teacher_dtype]
    if preloaded is None:
        say(f"loading teacher {cfg.teacher} ...")
        teacher, tok = load_model(source, dtype=t_dtype, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    else:
        teacher, tok = preloaded
    teacher.requires_grad_(False)
    fingerprint = source.fingerprint()
    teacher.to(device)

    # ---- data: files, or prompts the teacher answers ------------------------------------
    timings: dict[str, float] = {}
    t0 = time.time()
    records, data_info = training_records(cfg, out, teacher, tok, fingerprint, accel, say)
    heldout_records = heldout_records_for(cfg, out, teacher, tok, fingerprint, accel, say)
    timings["teacher_answers_s"] = round(time.time() - t0, 1)
    examples, summary = encode_records(tok, records, cfg.max_length, cfg.train_on_prompt)
    held, held_summary = encode_records(tok, heldout_records, cfg.max_length, False)
    if not examples:
        raise UsageError("no training example has a token to learn from: check --data and --max-length")
    if summary["truncated"]:
        say(f"[yellow]{summary['truncated']} training sequences were longer than max_length={cfg.max_length} and were truncated[/yellow]")
    lengths = [len(e.ids) for e in examples]

    # ---- the student: pruned by measured importance on the run's own data (or given) ------
    t0 = time.time()
    student = build_student(cfg.student, teacher, tok, cfg.seed, calibration=calibration_batches(examples, tok, cfg.seed),
                            say=say, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    timings["student_scan_s"] = round(time.time() - t0, 1)
    say(f"student: {describe_student(student.describe)}")
    if cfg.qat_bits:
        n = attach_fake_quantize(student.model, cfg.qat_bits, cfg.qat_block_size, cfg.qat_head_bits)
        student.describe["quantization_aware"] = {"bits": cfg.qat_bits, "block_size": cfg.qat_block_size, "grid": GRID,
                                                  "head_bits": cfg.qat_head_bits, "linear_layers": n}
        head = f", head/embedding on the int{cfg.qat_head_bits} grid" if cfg.qat_head_bits else ""
        say(f"quantization-aware: {n} linear layers train on the {cfg.qat_bits}-bit grid, block {cfg.qat_block_size}{head}")
        if n == 0:
            say(f"[yellow]warning: this student ({type(student.model).__name__}) has no nn.Linear layers to train on the grid "
                "(e.g. GPT-2's Conv1D): --qat-bits does not cover its body[/yellow]")

    check_memory(cfg, student, sum(e.n_targets for e in held) // world + 1, max(lengths), device)

    # ---- teacher cache: top-k log-probs per loss position, computed once ----------------
    groups = label_token_groups(tok, task_of(cfg).labels) if cfg.label_loss and cfg.task else ()
    spec = LossSpec(cfg.loss, cfg.alpha, cfg.temperature, cfg.beta, cfg.skew, vocab=student.vocab,
                    label_groups=groups, label_weight=cfg.label_loss if groups else 0.0)
    cached = None
    if cfg.cache_teacher:
        t0 = time.time()
        cached = captured_cache(out, data_info, records, examples, student.vocab, cfg.top_k, say)
        if cached is None:
            cached = teacher_cache(cfg, out, teacher, examples, fingerprint, student.vocab, accel, device, say)
        timings["teacher_cache_s"] = round(time.time() - t0, 1)

    # ---- the model on its device, the optimizer -----------------------------------------
    model = student.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()  # on the device before the optimizer: fused AdamW checks where params live
    # a task's prompts share their chat template and instruction: run that prefix once per batch
    prefix_len = 0 if cfg.gradient_checkpointing else shared_prefix_len(examples)
    if prefix_len:
        say(f"shared prefix: the first {prefix_len} tokens of every example are run once per batch")
    wrapped = StudentLoss(model, spec, cfg.chunk_size, prefix_len)
    # fused on the CPU too: 0.04 s instead of 0.24 s a step for a 50M-parameter student (measured, torch 2.13)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True)
    if cfg.qat_bits:  # the fused step does not bump the weights' version: recompute the grids after it
        optimizer.register_step_post_hook(lambda *_: refresh_fake_quantize(model))
    wrapped, optimizer = accel.prepare(wrapped, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    global_bs = cfg.batch_size * world
    n_batches = len(plan_epoch(lengths, global_bs, cfg.seed, 0))
    per_epoch = steps_per_epoch(n_batches, cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * per_epoch
    start_step = 0
    if resume:
        found = ckpt.latest(out / "checkpoints")
        if found is not None:
            start_step = ckpt.load(found, accel.unwrap_model(wrapped).model, optimizer)
            refresh_fake_quantize(model)
            say(f"resuming from {found.name} (step {start_step} of {total})")
            if main:
                _trim_metrics(out / "metrics.jsonl", start_step)
            accel.wait_for_everyone()
        else:
            say("no complete checkpoint: starting from the beginning")
    reference = heldout_reference(teacher, held, rank, world, device, student.vocab)
    teacher_head = teacher.get_output_embeddings()

    def plan(step: int) -> tuple[int, list[list[int]]]:
        """The global micro-batches of optimizer step ``step`` and its epoch."""
        epoch, within = divmod(step, per_epoch)
        batches = plan_epoch(lengths, global_bs, cfg.seed, epoch)
        return epoch, batches[within * cfg.grad_accum : (within + 1) * cfg.grad_accum]

    # ---- the loop ------------------------------------------------------------------------
    metrics_path = out / "metrics.jsonl"
    before = _logged_eval(metrics_path, 0) if start_step else None
    if before is None:
        before = evaluate(accel.unwrap_model(wrapped).model, reference, held, rank, world, device, accel) if start_step == 0 else None
    if before is not None and start_step == 0:
        say(f"before: top-1 agreement {before['top1_agreement']:.3f}, KL {before['kl']:.3f}, ppl {before['student_ppl']:.1f} (teacher {before['teacher_ppl']:.1f})")
        _log(metrics_path, main, {"step": 0, "eval": before})
    last_eval, epoch_times, epoch_t0, last_epoch = before, [], time.time(), None
    train_t0, tokens_seen = time.time(), 0
    with _progress(main, console) as progress:
        task = progress.add_task("distilling", total=total, completed=start_step, loss=float("nan"), tps=0.0)
        for step in range(start_step, total):
            epoch, micro = plan(step)
            if last_epoch is not None and epoch != last_epoch:
                epoch_times.append(round(time.time() - epoch_t0, 2))
                epoch_t0 = time.time()
            last_epoch = epoch
            step_t0 = time.time()
            n_global = sum(examples[i].n_targets for gb in micro for i in gb)  # every process knows it
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, agree, targets, tokens
            for j, gb in enumerate(micro):
                rows, dummy = (gb[rank::world], False) if gb[rank::world] else ([gb[0]], True)
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows], tok.pad_token_id or 0).items()}
                if dummy:  # this process has no row in the last, short batch: a row without loss keeps DDP in step
                    batch["loss_mask"].zero_()
                # teacher forward (or the cache)
                if cached is not None:
                    tt = TeacherTargets(topk_logp=_cat([cached[i][0] for i in rows], dummy).to(device),
                                        topk_idx=_cat([cached[i][1] for i in rows], dummy).to(device))
                elif cfg.alpha == 0:  # plain SFT: the teacher is not needed in the loop
                    tt = TeacherTargets()
                else:
                    with torch.no_grad():
                        th = teacher.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                    tt = TeacherTargets(hidden=th[batch["loss_mask"]], weight=teacher_head.weight, bias=teacher_head.bias)
                # loss: a sum over this process's positions, scaled so the gradient is the mean over the global step
                sync = contextlib.nullcontext() if j == len(micro) - 1 else accel.no_sync(wrapped)
                with sync:
                    loss_sum, agree = wrapped(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["labels"], tt)
                    accel.backward(loss_sum * world / max(n_global, 1))
                stats += torch.stack([loss_sum.detach().double(), agree.double(), batch["loss_mask"].sum().double(),
                                      batch["attention_mask"].sum().double() * (not dummy)])
            # step
            grad_norm = accel.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else torch.tensor(0.0)
            stats = accel.reduce(stats, "sum")
            loss = (stats[0] / stats[2].clamp_min(1)).item()
            if not math.isfinite(loss) or not math.isfinite(float(grad_norm)):
                last = ckpt.latest(out / "checkpoints")
                keep = f"the last good checkpoint is {last} (--resume after lowering --lr)" if last else "no checkpoint was written"
                raise EdgekdError(f"the loss became {loss} at step {step + 1}: lower --lr (now {cfg.lr}) or use --student-dtype fp32; {keep}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # log
            tokens_seen += int(stats[3])
            dt = time.time() - step_t0
            tps = tokens_seen / max(time.time() - train_t0, 1e-9)
            row = {"step": step + 1, "epoch": epoch, "loss": round(loss, 5), "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": round(float(grad_norm), 4), "train_top1": round((stats[1] / stats[2].clamp_min(1)).item(), 4),
                   "tokens": int(stats[3]), "step_s": round(dt, 3), "tokens_per_s": round(tps, 1)}
            if device_is_cuda:
                row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            _log(metrics_path, main, row)
            progress.update(task, advance=1, loss=loss, tps=tps)
            # evaluate
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                last_eval = evaluate(accel.unwrap_model(wrapped).model, reference, held, rank, world, device, accel)
                _log(metrics_path, main, {"step": step + 1, "eval": last_eval})
                say(f"step {step + 1}: top-1 agreement {last_eval['top1_agreement']:.3f}, KL {last_eval['kl']:.3f}")
            # checkpoint
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                if main:
                    ckpt.save(out / "checkpoints", step + 1, accel.unwrap_model(wrapped).model, optimizer, cfg.keep_checkpoints)
                accel.wait_for_everyone()
    epoch_times.append(round(time.time() - epoch_t0, 2))
    train_s = time.time() - train_t0

    # ---- final evaluation and outputs (main process) -------------------------------------
    after = evaluate(accel.unwrap_model(wrapped).model, reference, held, rank, world, device, accel)
    _log(metrics_path, main, {"step": total, "eval": after})
    say(f"after: top-1 agreement {after['top1_agreement']:.3f}, KL {after['kl']:.3f}, ppl {after['student_ppl']:.1f} (teacher {after['teacher_ppl']:.1f})")
    result = {
        "format": "edgekd-distill",
        "edgekd_version": __version__,
        "teacher": cfg.teacher,
        "teacher_fingerprint": fingerprint,
        "heldout": HELDOUT,
        "task": task_of(cfg).record() if cfg.task else None,
        "student": student.describe,
        "config": to_dict(cfg),
        "data": {**data_info, "train": summary, "heldout": held_summary, "shared_prefix_tokens": prefix_len,
                 "padding_waste": round(padding_waste(plan_epoch(lengths, global_bs, cfg.seed, 0), lengths), 4)},
        "metrics": {"before": before, "after": after},
        "steps": total,
        "processes": world,
        "device": str(device),
        "timing": {**timings, "train_s": round(train_s, 1), "epoch_s": epoch_times,
                   "train_tokens_per_s": round(tokens_seen / max(train_s, 1e-9), 1),
                   "wall_s": round(time.time() - t_start, 1)},
    }
    if main:
        final = accel.unwrap_model(wrapped).model
        save_student(final, tok, teacher, out)
        write_json(out / DISTILL_JSON, result)  # last: its presence means the run is complete
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accel.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------
# Helpers the loop calls, in the order it calls them
# ---------------------------------------------------------------------------------------------


def prepare_out_dir(out: Path, cfg: DistillConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``--overwrite`` (ours only) or ``--resume``; write the config.

    ``--overwrite`` never deletes a folder that edgekd did not write (no ``distill.toml``): it
    removes our checkpoints, metrics and ``distill.json``, and keeps ``data/`` and ``cache/``,
    which are reused only when their keys match."""
    from edgekd.distill.config_io import write_config_toml
    from edgekd.io import refuse_unsafe_out
    from edgekd.teachers import resolve_source

    teacher = resolve_source(cfg.teacher).path
    refuse_unsafe_out(out, tuple(p for p in (teacher, Path(cfg.task) if cfg.task and Path(cfg.task).is_dir() else None) if p))
    non_empty = out.is_dir() and any(out.iterdir())
    ours = (out / CONFIG_TOML).is_file()
    if resume:
        if not ours:
            raise UsageError(f"--resume: {out} holds no distill run (no {CONFIG_TOML}); start without --resume")
        if (out / DISTILL_JSON).is_file():
            raise UsageError(f"--resume: the run in {out} is already complete ({DISTILL_JSON}); pass --overwrite to run it again")
    elif non_empty:
        if not overwrite:
            raise UsageError(f"{out} exists and is not empty: pass --overwrite to replace the run, --resume to continue it, or choose another --out")
        if not ours:
            raise UsageError(f"{out} is not an edgekd distill folder (no {CONFIG_TOML}): refusing to overwrite files edgekd did not write; choose another --out")
        (out / DISTILL_JSON).unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_config_toml(out / CONFIG_TOML, cfg)


def _shipped(relative: str) -> Path:
    return resource(relative)


def training_records(cfg, out, teacher, tok, fingerprint, accel, say) -> tuple[list[dict], dict]:
    """The training records: ``--data`` files as they are, or teacher answers to ``--prompts``
    (default: the task's train.jsonl, else the shipped prompts), generated once and cached in
    ``data/train.jsonl``. A prompts file whose every record has a response is used as it is."""
    if cfg.data:
        records = []
        for f in cfg.data:
            records += read_records(Path(f))
        return records, {"source": "files", "files": [str(Path(f).resolve()) for f in cfg.data],
                         "sha256": file_digest(Path(f) for f in cfg.data)}
    path = Path(cfg.prompts) if cfg.prompts else task_of(cfg).train if cfg.task else _shipped(SHIPPED_TRAIN)
    if path.suffix.lower() != ".txt":
        given = read_records(path)
        if all(isinstance(r.get("response"), str) for r in given):
            given = given[: cfg.max_prompts] if cfg.max_prompts else given
            return given, {"source": "file responses", "prompts_file": str(path.resolve()), "prompts": len(given)}
    prompts = read_prompts(path)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    records = teacher_answers(cfg, out / "data" / "train.jsonl", prompts, teacher, tok, fingerprint, accel, say, "training",
                              capture=captures_topk(cfg))
    info = {"source": "teacher answers", "prompts_file": str(path.resolve()), "prompts": len(prompts),
            "finished_answers": sum(r["finished"] for r in records)}
    if captures_topk(cfg):
        info["answers_key"] = answers_key(cfg, fingerprint, prompts)
    if cfg.task and task_of(cfg).labels:
        info["answers_without_label"] = check_labels(records, task_of(cfg).labels, say)
    return records, info


def calibration_batches(examples: list[Example], tok, seed: int, n: int = 16, batch_size: int = 4) -> list[dict]:
    """``n`` training examples (a seeded draw), collated: the text the importance scan measures on."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(examples), generator=g)[:n].tolist()
    rows = [examples[i] for i in sorted(pick, key=lambda i: len(examples[i].ids))]
    return [collate(rows[i : i + batch_size], tok.pad_token_id or 0) for i in range(0, len(rows), batch_size)]


def describe_student(d: dict[str, Any]) -> str:
    """One line: layers kept, how they were chosen, width, parameters."""
    line = f"{d['num_hidden_layers']} layers, {d['parameters'] / 1e6:.1f}M parameters ({d['kind']})"
    if "layers" in d:
        line += f"; teacher layers {d['layers']}"
    scan = d.get("scan") or {}
    if scan.get("method"):
        line += f" by {scan['method']}"
    if "width" in d:
        line += f"; MLP {d['width']['mlp_channels']} channels ({d['width']['mlp_share']:.0%})"
    return line


def label_token_groups(tok, labels) -> tuple[tuple[int, ...], ...]:
    """Per label, the first token ids of its surface forms ("positive", " Positive", ...) that name it
    unambiguously: a one-token form, or a first piece of at least 4 letters that starts the label."""
    groups: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for label in labels:
        ids = set()
        for form in {label, label.lower(), label.capitalize(), label.upper()}:
            for text in (form, " " + form):
                pieces = tok(text, add_special_tokens=False)["input_ids"]
                head = tok.decode(pieces[:1]).strip().lower()
                if pieces and (len(pieces) == 1 or (len(head) >= 4 and label.lower().startswith(head))):
                    ids.add(pieces[0])
        ids -= seen
        seen |= ids
        if not ids:
            raise UsageError(f"label {label!r}: no token names it on its own; choose labels that are words")
        groups.append(tuple(sorted(ids)))
    return tuple(groups)


def task_of(cfg: DistillConfig):
    from edgekd.tasks import load_task

    return load_task(cfg.task)


def check_labels(records: list[dict], labels, say) -> int:
    """Count the teacher answers that name none of the task's labels: warn, or refuse when none do."""
    from edgekd.tasks import label_of

    missing = sum(label_of(r["response"], labels) is None for r in records)
    if missing == len(records):
        raise UsageError(f"none of the teacher's {len(records)} answers names a label ({', '.join(labels)}): "
                         "the task's prompts must ask for one of its labels, or the teacher cannot do this task")
    if missing:
        say(f"[yellow]warning: {missing} of {len(records)} teacher answers name none of the labels ({', '.join(labels)})[/yellow]")
    return missing


def heldout_records_for(cfg, out, teacher, tok, fingerprint, accel, say) -> list[dict]:
    """Held-out ``{"prompt", "response"}`` records in ``data/heldout.jsonl``: the file's own
    responses when it has them, else the teacher's answers. Never trained on."""
    path = Path(cfg.heldout) if cfg.heldout else task_of(cfg).heldout if cfg.task else _shipped(SHIPPED_HELDOUT)
    records = read_records(path)
    for n, r in enumerate(records, 1):
        if "prompt" not in r:
            raise UsageError(f"{path}: held-out record {n} needs a 'prompt' (and optionally a 'response')")
    if cfg.max_heldout:
        records = records[: cfg.max_heldout]
    if all("response" in r for r in records):
        records = [{"prompt": r["prompt"], "response": r["response"], "finished": r.get("finished", True)} for r in records]
        if accel.is_main_process:
            _write_jsonl(out / HELDOUT, records)
        accel.wait_for_everyone()
        return records
    return teacher_answers(cfg, out / HELDOUT, [r["prompt"] for r in records], teacher, tok, fingerprint, accel, say, "held-out")


def answers_key(cfg, fingerprint: str, prompts: list[str]) -> str:
    """What the teacher's answers depend on: a rerun with the same key reuses them."""
    key = json.dumps([fingerprint, prompts, cfg.max_new_tokens, cfg.gen_temperature, cfg.gen_top_p, cfg.seed, cfg.max_length, "v2"], sort_keys=True)
    return __import__("hashlib").sha256(key.encode()).hexdigest()


def captures_topk(cfg) -> bool:
    """Whether the training answers keep the teacher's top-k as they are generated (then the
    teacher cache needs no second pass): answer-only loss, with the cache on."""
    return cfg.cache_teacher and not cfg.train_on_prompt and cfg.alpha > 0


def teacher_answers(cfg, path: Path, prompts: list[str], teacher, tok, fingerprint, accel, say, what: str,
                    capture: bool = False) -> list[dict]:
    """Teacher answers to ``prompts`` in ``path`` (jsonl), reused when its key matches. ``capture``:
    keep the teacher's top-k log-probs of every answer position, read off the generation's own
    logits, in ``<path folder>/topk/`` (the teacher cache's format, keyed by the answers' key)."""
    key = answers_key(cfg, fingerprint, prompts)
    meta = path.with_suffix(".key")
    if path.is_file() and meta.is_file() and meta.read_text().strip() == key:
        say(f"reusing the teacher's {what} answers in {path}")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rank, world = accel.process_index, accel.num_processes
    mine = list(range(rank, len(prompts), world))
    with _progress(accel.is_main_process, None, tokens=True) as progress:
        task = progress.add_task(f"teacher answers ({what})", total=len(mine), loss=float("nan"), tps=0.0)
        t0, done_tokens = time.time(), 0

        def on_batch(n, tokens):
            nonlocal done_tokens
            done_tokens += tokens
            progress.update(task, advance=n, tps=done_tokens / max(time.time() - t0, 1e-9))

        answers, truncated = generate_answers(
            teacher, tok, [prompts[i] for i in mine], max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p, batch_size=cfg.gen_batch_size, seed=cfg.seed + 1000 * rank,
            max_prompt_tokens=max(8, cfg.max_length - cfg.max_new_tokens), on_batch=on_batch,
            keep_topk=cfg.top_k if capture else 0, kd_temperature=cfg.temperature,
            vocab=teacher.get_output_embeddings().weight.shape[0])
    if capture:
        tcache.write_part(path.parent / "topk", key, rank, world, _captured_part(answers, mine))
    if truncated:
        say(f"[yellow]{truncated} {what} prompts were longer than max_length - max_new_tokens and were cut from the left[/yellow]")
    part = path.parent / f".{path.name}.part{rank}"
    _write_jsonl(part, answers)
    accel.wait_for_everyone()
    if accel.is_main_process:
        merged: list[dict | None] = [None] * len(prompts)
        for r in range(world):
            p = path.parent / f".{path.name}.part{r}"
            for j, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                merged[r + j * world] = json.loads(line)
            p.unlink()
        _write_jsonl(path, merged)
        meta.write_text(key + "\n")
    accel.wait_for_everyone()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    from edgekd.io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def captured_cache(out: Path, data_info: dict, records: list[dict], examples: list[Example], vocab: int, k: int, say):
    """The teacher's top-k kept while it wrote the answers, when it covers exactly these examples
    (one per record, targets on the generated tokens, same vocabulary), else None."""
    key = data_info.get("answers_key")
    if not key or len(examples) != len(records):
        return None
    table = tcache.load(out / "data" / "topk", key, len(examples))
    if table is None:
        return None
    for i, (ex, rec) in enumerate(zip(examples, records)):
        logp, idx = table[i]
        if logp.shape[0] != ex.n_targets or len(rec.get("answer_ids") or ()) != ex.n_targets or logp.shape[1] != min(k, vocab) \
                or (idx.numel() and int(idx.max()) >= vocab):
            return None
    say("teacher cache: the top-k kept while the teacher wrote the answers (no second teacher pass)")
    return table


def teacher_cache(cfg, out, teacher, examples: list[Example], fingerprint, vocab, accel, device, say):
    """Load the teacher-logit cache for these examples, or build it (each process its share)."""
    key = tcache.cache_key(fingerprint, examples_digest(examples), cfg.top_k, cfg.temperature, vocab)
    folder = out / "cache"
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

    with _progress(accel.is_main_process, None, tokens=True) as progress:
        task = progress.add_task("teacher cache (top-k)", total=len(mine), loss=float("nan"), tps=0.0)
        part = tcache.teacher_topk(teacher, examples, mine, k=cfg.top_k, temperature=cfg.temperature, vocab=vocab,
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


def check_memory(cfg: DistillConfig, student, heldout_positions: int, longest: int, device) -> None:
    """Refuse early a run whose loss, activations or held-out reference cannot fit in free memory,
    naming the setting to lower (rough upper estimates, fp32)."""
    free = _available_memory(device)
    if free is None:
        return
    c = student.model.config
    chunk = min(cfg.chunk_size, cfg.batch_size * min(longest, cfg.max_length))  # positions in one chunk, at most
    needs = [
        # one chunk: student logits, log-probs and their gradient, teacher logits and log-probs
        (5 * chunk * student.vocab * 4, "--chunk-size"),
        # student activations kept for backward: ~34 floats per hidden unit per layer per token
        (34 * cfg.batch_size * min(longest, cfg.max_length) * c.hidden_size * c.num_hidden_layers * 4, "--batch-size or --max-length"),
        # the teacher's held-out log-probs, kept in fp16 for every evaluation
        (heldout_positions * student.vocab * 2, "--max-heldout or --max-new-tokens"),
    ]
    for need, setting in needs:
        if need > 0.6 * free:
            raise UsageError(f"this run needs about {need / 1e9:.1f} GB for one part of it but only {free / 1e9:.1f} GB are free: lower {setting}")


def _available_memory(device) -> int | None:
    """Bytes that can still be allocated: free GPU memory, or MemAvailable (free + reclaimable cache)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def _cat(parts: list[torch.Tensor], dummy: bool) -> torch.Tensor:
    return parts[0][:0] if dummy else torch.cat(parts)


@torch.no_grad()
def heldout_reference(teacher, held: list[Example], rank: int, world: int, device, vocab: int, batch_size: int = 8) -> list[dict]:
    """The teacher's side of the held-out evaluation, computed once: for this process's share of
    the examples, in batches, the teacher's full log-probs at the answer positions (fp16 to halve
    memory: ~0.1 GB per 1,000 positions at a 49k vocabulary)."""
    mine = sorted(range(rank, len(held), world), key=lambda i: len(held[i].ids))
    ref = []
    for b in range(0, len(mine), batch_size):
        batch = collate([held[i] for i in mine[b : b + batch_size]], 0)
        mask = batch["loss_mask"]
        logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        logp = torch.log_softmax(logits[..., :vocab].float(), -1)[mask.to(device)]
        labels = batch["labels"][mask]
        ref.append({"batch": batch, "logp": logp.half().cpu(), "nll": -logp.gather(-1, labels.to(device)[:, None]).squeeze(-1).cpu()})
    return ref


@torch.no_grad()
def evaluate(model, reference: list[dict], held, rank, world, device, accel) -> dict[str, float]:
    """Held-out metrics at the answer positions: top-1 agreement with the teacher, mean
    KL(teacher || student) over the full vocabulary, student and teacher perplexity."""
    was_training = model.training
    model.eval()
    vocab = reference[0]["logp"].shape[-1] if reference else None
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # agree, kl, s_nll, t_nll, n
    for r in reference:
        b = r["batch"]
        with accel.autocast():
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        s_logp = torch.log_softmax(logits[..., :vocab].float(), -1)[b["loss_mask"].to(device)]
        t_logp = r["logp"].to(device).float()
        labels = b["labels"][b["loss_mask"]].to(device)
        sums += torch.stack([
            (s_logp.argmax(-1) == t_logp.argmax(-1)).sum().double(),
            (t_logp.exp() * (t_logp - s_logp)).sum().double(),
            -s_logp.gather(-1, labels[:, None]).sum().double(),
            r["nll"].sum().double().to(device),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
        ])
    sums = accel.reduce(sums, "sum")
    if was_training:
        model.train()
    n = max(sums[4].item(), 1)
    s_ppl, t_ppl = math.exp(sums[2].item() / n), math.exp(sums[3].item() / n)
    return {"top1_agreement": round(sums[0].item() / n, 4), "kl": round(sums[1].item() / n, 4),
            "student_ppl": round(s_ppl, 3), "teacher_ppl": round(t_ppl, 3), "ppl_ratio": round(s_ppl / t_ppl, 4),
            "positions": int(sums[4].item())}


def save_student(model, tok, teacher, out: Path) -> None:
    """The student as a Hugging Face folder: safetensors weights, config, tokenizer (with its chat
    template) and a generation config whose eos and pad match the tokenizer."""
    model = model.float() if next(model.parameters()).dtype != torch.float32 else model
    bake_fake_quantize(model)  # --qat-bits: the weights go out on their grid
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    gen = teacher.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else gen.bos_token_id
    model.generation_config = gen
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from."""
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        from edgekd.io import atomic_write_bytes

        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _logged_eval(path: Path, step: int) -> dict | None:
    """The evaluation logged at ``step`` (the "before" metrics of a resumed run)."""
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("step") == step and "eval" in row:
            return row["eval"]
    return None


def _log(path: Path, main: bool, row: dict) -> None:
    if main:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _sayer(console, main: bool):
    def say(msg: str) -> None:
        if main and console is not None:
            console.print(msg, highlight=False)

    return say


def _progress(main: bool, console, tokens: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if not tokens:
        cols.append(TextColumn("loss {task.fields[loss]:.4f}"))
    cols += [TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*cols, disable=not main, console=console, transient=False)
