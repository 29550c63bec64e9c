"""``distill(cfg)``: the trainer, read top to bottom (torchtune's KD recipe, litgpt's fit).

``Trainer.run`` is the whole road: ``setup`` (device, output folder, teacher) -> ``prepare_data``
(files or teacher answers) -> ``build_student`` (pruned by measured importance, QAT grid) ->
``prepare_targets`` (the teacher's top-k, kept from its answers or computed once) ->
``prepare_optimizer`` (+ resume) -> ``train`` (one loop: ``step`` = micro-batches -> clip ->
optimizer step -> log -> evaluate/checkpoint) -> ``save``. State lives on the trainer; the helpers
it calls are in ``edgekd.distill.answers`` (records, teacher answers and top-k) and
``edgekd.distill.loop`` (loss module, evaluation, saving, logging).

The same code runs on one CPU, one GPU (bf16 autocast) and under ``accelerate launch
--num_processes N``: every process builds the same batch plan and takes its rows of each global
batch, gradients are averaged by DDP, metrics are summed across processes, and files are written
by the main process only. The output folder is described in ``edgekd.distill.loop``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize

from edgekd import __version__
from edgekd.device.bundle import QatGrid
from edgekd.device.config import to_dict
from edgekd.device.errors import EdgekdError, UsageError
from edgekd.distill import answers
from edgekd.distill import checkpoint as ckpt
from edgekd.distill import loop as helpers
from edgekd.distill.config import DistillConfig
from edgekd.distill.data import (
    Example,
    balanced_repeats,
    collate,
    encode_records,
    padding_waste,
    plan_epoch,
    steps_per_epoch,
    untarget_common_prefix,
)
from edgekd.distill.generate import generate_answers
from edgekd.distill.losses import LossSpec, TeacherTargets, hyperparameters
from edgekd.distill.run import StudentRun
from edgekd.distill.students import build_student
from edgekd.models import decoder_of
from edgekd.quant import GRID, attach_fake_quantize, refresh_fake_quantize

__all__ = ["Trainer", "distill"]


def distill(cfg: DistillConfig, *, resume: bool = False, overwrite: bool = False, console=None, preloaded=None) -> dict[str, Any]:
    """Run a distillation as ``cfg`` says; return what ``distill.json`` records.

    ``preloaded``: an already loaded ``(teacher, tokenizer)`` for ``cfg.teacher`` (benchmarks that
    run several configurations against one teacher); it is used as it is, so load it with the
    dtype ``cfg.teacher_dtype`` asks for.

    One writer per ``--out`` (a lock beside it); a run refused for bad input leaves a folder it
    created as it found it (absent)."""
    from edgekd.device.outputs import output_lock

    if not cfg.out:
        raise UsageError("no output folder: pass --out DIR")
    out = Path(cfg.out)
    fresh = not out.exists()
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch only the main process writes --out
    with output_lock(out) if main else contextlib.nullcontext():
        try:
            return Trainer(cfg, resume=resume, overwrite=overwrite, console=console, preloaded=preloaded).run()
        except UsageError:
            if fresh and main:
                shutil.rmtree(out, ignore_errors=True)
            raise


class Trainer:
    """One distillation run. Each method below is one stage; ``run`` calls them in order."""

    def __init__(self, cfg: DistillConfig, *, resume: bool, overwrite: bool, console=None, preloaded=None):
        self.cfg, self.resume, self.overwrite, self.console, self.preloaded = cfg, resume, overwrite, console, preloaded
        self.out = Path(cfg.out)
        self.folder = StudentRun(self.out)  # the run's file names
        self.metrics_path = self.folder.metrics
        self.timings: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        self.t_start = time.time()
        self.setup()
        with contextlib.ExitStack() as calibrated:  # the calibrated teacher teaches; a preloaded one is given back bare
            self.calibrate_teacher(calibrated)
            self.prepare_data()
            self.build_student()
            self.prepare_targets()
            self.prepare_optimizer()
            self.train()
            return self.save()

    # ---- setup: device, output folder, teacher -----------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from edgekd.models import load_model, resolve_source

        cfg = self.cfg
        self.cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        mixed = {"auto": "bf16" if self.cuda else "no", "fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.student_dtype]
        self.accel = accel = Accelerator(mixed_precision=mixed, cpu=not self.cuda)
        self.main, self.rank, self.world, self.device = accel.is_main_process, accel.process_index, accel.num_processes, accel.device
        self.say = helpers.sayer(self.console, self.main)
        if self.main:
            helpers.prepare_out_dir(self.out, cfg, resume=self.resume, overwrite=self.overwrite)
        accel.wait_for_everyone()
        set_seed(cfg.seed)
        source = resolve_source(cfg.teacher)
        t_dtype = {"auto": torch.bfloat16 if self.cuda else torch.float32, "fp32": torch.float32,
                   "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.teacher_dtype]
        if self.preloaded is None:
            self.say(f"loading teacher {cfg.teacher} ...")
            self.teacher, self.tok = load_model(source, dtype=t_dtype, trust_remote_code=cfg.trust_remote_code,
                                                allow_pickle=cfg.allow_pickle)
        else:
            self.teacher, self.tok = self.preloaded
        self.teacher.requires_grad_(False)
        self.fingerprint = source.fingerprint()
        self.teacher.to(self.device)

    # ---- calibration: the teacher's lean taken out of a labelled task's labels ----------------
    def calibrate_teacher(self, stack: contextlib.ExitStack) -> None:
        """Fit the per-label bias (``edgekd.distill.calibrate``) and put it on the teacher's head for
        the rest of the run; answers and caches are keyed by the calibrated teacher."""
        from edgekd.distill.calibrate import calibrated

        t0 = time.time()
        bare = answers.TeacherRun(self.cfg, self.out, self.teacher, self.tok, self.fingerprint, self.accel, self.say)
        self.calibration = answers.fit_calibration(bare)
        self.keyed_fingerprint = self.fingerprint
        if self.calibration is not None:
            stack.enter_context(calibrated(self.teacher, self.calibration))
            self.keyed_fingerprint += "+calibrated:" + ",".join(f"{b:.6f}" for b in self.calibration.bias)
            self.timings["calibration_s"] = round(time.time() - t0, 1)

    # ---- data: files, or prompts the teacher answers ------------------------------------------
    def prepare_data(self) -> None:
        cfg, say = self.cfg, self.say
        t0 = time.time()
        self.teacher_run = answers.TeacherRun(cfg, self.out, self.teacher, self.tok, self.keyed_fingerprint, self.accel, say)
        self.records, self.data_info = answers.training_records(self.teacher_run)
        heldout_records = answers.heldout_records_for(self.teacher_run)
        self.timings["teacher_answers_s"] = round(time.time() - t0, 1)
        self.examples, self.summary = encode_records(self.tok, self.records, cfg.max_length, cfg.train_on_prompt)
        if cfg.train_on_prompt:  # the prompts' own text carries loss; what they all share does not
            self.summary["untargeted_common_prefix"] = untarget_common_prefix(self.examples)
        self.held, self.held_summary = encode_records(self.tok, heldout_records, cfg.max_length, False)
        if not self.examples:
            raise UsageError("no training example has a token to learn from: check --data and --max-length")
        if self.summary["truncated"]:
            say(f"{self.summary['truncated']} training sequences were longer than max_length={cfg.max_length} and were truncated", style="yellow")
        self.lengths = [len(e.ids) for e in self.examples]
        self.repeats = self.label_repeats() if cfg.balance_labels else None
        if cfg.on_policy and any(e.prompt is None for e in self.examples):
            raise UsageError("--on-policy needs prompt records (the student answers their prompts); text and messages records "
                             "have none: pass --prompts, or set --on-policy 0")

    def label_repeats(self) -> list[int]:
        """``balance_labels``: each example's draws per epoch, from the label of its teacher answer."""
        from edgekd.device.tasks import label_of

        labels = answers.task_of(self.cfg).labels if self.cfg.task else ()
        if not labels:
            raise UsageError("balance_labels needs a labelled task (--task with labels = [...] in its task.toml)")
        by_prompt = {r.get("prompt"): label_of(r.get("response") or "", labels) for r in self.records}
        example_labels = [by_prompt.get(e.prompt) for e in self.examples]
        repeats = balanced_repeats(example_labels, self.cfg.seed)
        counts = {label: example_labels.count(label) for label in labels}
        self.summary["balance_labels"] = {"teacher_labels": counts, "drawn_per_epoch": sum(repeats)}
        self.say(f"balancing labels: the teacher answered {', '.join(f'{k} {v}' for k, v in counts.items())}; "
                 f"{sum(repeats)} examples drawn per epoch (was {len(repeats)})")
        return repeats

    # ---- the student: pruned by measured importance on the run's own data (or given) ----------
    def build_student(self) -> None:
        cfg, say = self.cfg, self.say
        t0 = time.time()
        calibration = helpers.calibration_batches(self.examples, self.tok, cfg.seed)
        self.student = student = build_student(cfg.student, self.teacher, self.tok, cfg.seed, calibration=calibration, say=say,
                                               trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        self.timings["student_scan_s"] = round(time.time() - t0, 1)
        say(f"student: {helpers.describe_student(student.describe)}")
        if cfg.qat_bits:
            n = attach_fake_quantize(student.model, cfg.qat_bits, cfg.qat_block_size, cfg.qat_head_bits)
            student.describe["quantization_aware"] = QatGrid(cfg.qat_bits, cfg.qat_block_size, cfg.qat_head_bits, GRID, n).table()
            head = f", head/embedding on the int{cfg.qat_head_bits} grid" if cfg.qat_head_bits else ""
            say(f"quantization-aware: {n} linear layers train on the {cfg.qat_bits}-bit grid, block {cfg.qat_block_size}{head}")
            if n == 0:
                say(f"warning: this student ({type(student.model).__name__}) has no nn.Linear layers to train on the grid "
                    "(e.g. GPT-2's Conv1D): --qat-bits does not cover its body", style="yellow")
        helpers.check_memory(cfg, student, sum(e.n_targets for e in self.held) // self.world + 1, max(self.lengths), self.device)
        self.matched: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        if cfg.hidden_loss:
            if "layers" not in student.describe or student.model.config.hidden_size != self.teacher.config.hidden_size:
                raise UsageError(f"--hidden-loss needs a student pruned from the teacher (layers:N, layers-kl:N, even:N, layers:i,j,...), "
                                 f"whose layers stand for the teacher's; {cfg.student!r} is not one: set --hidden-loss 0")
            self.matched = helpers.matched_layers(student.describe["layers"])
            say(f"intermediate-state KD: student layers 0-{len(self.matched[0]) - 1} follow the teacher's stream at the inputs of "
                f"teacher layers {list(self.matched[1])} (weight {cfg.hidden_loss}); the teacher runs in the loop")

    # ---- teacher targets: top-k log-probs per loss position, kept from its answers or computed once
    def prepare_targets(self) -> None:
        cfg = self.cfg
        labelled = (cfg.label_loss or cfg.label_margin) and cfg.task
        groups = helpers.label_token_groups(self.tok, answers.task_of(cfg).labels) if labelled else ()
        self.spec = LossSpec(cfg.loss, cfg.alpha, cfg.temperature, hyperparameters(cfg.loss, cfg), vocab=self.student.vocab,
                             label_groups=groups, label_weight=cfg.label_loss if groups else 0.0, label_hard=cfg.label_hard,
                             label_margin=cfg.label_margin if groups else 0.0, hidden_weight=cfg.hidden_loss)
        self.cached = None
        if cfg.cache_teacher and not cfg.hidden_loss:  # intermediate states are not cached: the teacher runs in the loop
            t0 = time.time()
            self.cached = answers.captured_cache(self.teacher_run, self.data_info, self.records, self.examples, self.student.vocab)
            if self.cached is None:
                self.cached = answers.teacher_cache(self.teacher_run, self.examples, self.student.vocab, self.device)
            self.timings["teacher_cache_s"] = round(time.time() - t0, 1)
            prefix = answers.answer_prefix(cfg)
            if prefix and cfg.task and answers.task_of(cfg).labels:  # after the opening comes the label: taught over the labels alone
                groups = helpers.label_token_groups(self.tok, answers.task_of(cfg).labels)
                n = answers.restrict_to_labels(self.cached, self.examples, self.tok(prefix, add_special_tokens=False)["input_ids"], groups)
                self.summary["label_targets_after_prefix"] = n
                self.say(f"{n} of {len(self.examples)} answers name their label right after {prefix!r}: taught there over the labels alone")

    # ---- the model on its device, the optimizer, the step plan, resume ----------------------
    def prepare_optimizer(self) -> None:
        cfg, say, accel = self.cfg, self.say, self.accel
        self.model = model = self.student.model
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device).train()  # on the device before the optimizer: fused AdamW checks where params live
        # a task's prompts share their chat template and instruction: run that prefix once per batch
        self.prefix_len = 0 if cfg.gradient_checkpointing else helpers.shared_prefix_len(self.examples)
        if self.prefix_len:
            say(f"shared prefix: the first {self.prefix_len} tokens of every example are run once per batch")
        wrapped = helpers.StudentLoss(model, self.spec, cfg.chunk_size, self.prefix_len, self.matched[0])
        # fused on the CPU too: 0.04 s instead of 0.24 s a step for a 50M-parameter student (measured, torch 2.13)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True)
        if cfg.qat_bits:  # the fused step does not bump the weights' version: recompute the grids after it
            optimizer.register_step_post_hook(lambda *_: refresh_fake_quantize(model))
        self.wrapped, self.optimizer = accel.prepare(wrapped, optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]

        self.global_bs = cfg.batch_size * self.world
        self.per_epoch = steps_per_epoch(len(plan_epoch(self.lengths, self.global_bs, cfg.seed, 0, self.repeats)), cfg.grad_accum)
        self.total = cfg.max_steps or cfg.epochs * self.per_epoch
        self.start_step = 0
        if self.resume:
            found = ckpt.latest(self.folder.checkpoints)
            if found is not None:
                self.start_step = ckpt.load(found, accel.unwrap_model(self.wrapped).model, self.optimizer)
                refresh_fake_quantize(model)
                say(f"resuming from {found.name} (step {self.start_step} of {self.total})")
                if self.main:
                    helpers.trim_metrics(self.metrics_path, self.start_step)
                accel.wait_for_everyone()
            else:
                say("no complete checkpoint: starting from the beginning")
        self.reference = helpers.heldout_reference(self.teacher, self.held, self.rank, self.world, self.device, self.student.vocab)
        self.teacher_head = self.teacher.get_output_embeddings()

    def plan(self, step: int) -> tuple[int, list[list[int]]]:
        """The global micro-batches of optimizer step ``step`` and its epoch."""
        epoch, within = divmod(step, self.per_epoch)
        batches = plan_epoch(self.lengths, self.global_bs, self.cfg.seed, epoch, self.repeats)
        return epoch, batches[within * self.cfg.grad_accum : (within + 1) * self.cfg.grad_accum]

    def evaluate(self) -> dict[str, float]:
        return helpers.evaluate(self.accel.unwrap_model(self.wrapped).model, self.reference, self.held, self.rank, self.world,
                                self.device, self.accel)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, say = self.cfg, self.say
        before = helpers.logged_eval(self.metrics_path, 0) if self.start_step else None
        if before is None and self.start_step == 0:
            before = self.evaluate()
            say(f"before: top-1 agreement {before['top1_agreement']:.3f}, KL {before['kl']:.3f}, ppl {before['student_ppl']:.1f} (teacher {before['teacher_ppl']:.1f})")
            helpers.log_row(self.metrics_path, self.main, {"step": 0, "eval": before})
        self.before = before
        self.epoch_times: list[float] = []
        epoch_t0, last_epoch = time.time(), None
        self.train_t0, self.tokens_seen = time.time(), 0
        with helpers.progress_bar(self.main, self.console) as progress:
            task = progress.add_task("distilling", total=self.total, completed=self.start_step, loss=float("nan"), tps=0.0)
            for step in range(self.start_step, self.total):
                epoch, micro = self.plan(step)
                if last_epoch is not None and epoch != last_epoch:
                    self.epoch_times.append(round(time.time() - epoch_t0, 2))
                    epoch_t0 = time.time()
                last_epoch = epoch
                loss, tps = self.step(step, epoch, micro)
                progress.update(task, advance=1, loss=loss, tps=tps)
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < self.total:
                    last_eval = self.evaluate()
                    helpers.log_row(self.metrics_path, self.main, {"step": step + 1, "eval": last_eval})
                    say(f"step {step + 1}: top-1 agreement {last_eval['top1_agreement']:.3f}, KL {last_eval['kl']:.3f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < self.total:
                    if self.main:
                        ckpt.save(self.folder.checkpoints, step + 1, self.accel.unwrap_model(self.wrapped).model, self.optimizer,
                                  cfg.keep_checkpoints)
                    self.accel.wait_for_everyone()
        self.epoch_times.append(round(time.time() - epoch_t0, 2))
        self.train_s = time.time() - self.train_t0

    def teacher_targets(self, rows: list[int], batch: dict[str, torch.Tensor], dummy: bool, online: bool = False) -> TeacherTargets:
        """What the student learns from for these rows: the cached top-k, or a teacher forward (its
        last hidden states, and its stream at the matched depths for intermediate-state KD);
        ``online``: always the forward (the batch holds the student's own answers)."""
        if self.cached is not None and not online:
            return TeacherTargets(topk_logp=helpers.cat_parts([self.cached[i][0] for i in rows], dummy).to(self.device),
                                  topk_idx=helpers.cat_parts([self.cached[i][1] for i in rows], dummy).to(self.device))
        depths = self.matched[1]
        if self.cfg.alpha == 0 and not depths:  # plain SFT: the teacher is not needed in the loop
            return TeacherTargets()
        with torch.no_grad():
            out = helpers.decoder_forward(decoder_of(self.teacher), batch["input_ids"], batch["attention_mask"], self.prefix_len,
                                          bool(depths))
        mask = batch["loss_mask"][:, self.prefix_len :]
        states = torch.stack([out.hidden_states[t][mask] for t in depths]) if depths else None
        return TeacherTargets(hidden=out.last_hidden_state[mask], weight=self.teacher_head.weight, bias=self.teacher_head.bias,
                              states=states)

    def on_policy(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the student's own answers (GKD's lambda, in the
        run's second half, once the student has learnt from the teacher's answers): a seeded draw,
        the same in every process and after a resume."""
        lam = self.cfg.on_policy
        return lam > 0 and step >= self.total // 2 and random.Random(f"{self.cfg.seed}/{step}").random() < lam

    def student_answers(self, rows: list[int], step: int) -> list[Example]:
        """The student's own answers to the prompts of ``rows`` (greedy, or sampled at
        gen_temperature), as examples whose targets are the answer: the teacher scores them."""
        cfg, model = self.cfg, self.accel.unwrap_model(self.wrapped).model
        model.eval()
        with parametrize.cached():  # a QAT student's grids applied once per generation, not per token
            records, _ = generate_answers(model, self.tok, [self.examples[i].prompt or "" for i in rows],
                                          max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, batch_size=len(rows),
                                          seed=cfg.seed * 1000 + step, max_prompt_tokens=max(8, cfg.max_length - cfg.max_new_tokens))
        model.train()
        return encode_records(self.tok, records, cfg.max_length, False)[0]

    def step(self, step: int, epoch: int, micro: list[list[int]]) -> tuple[float, float]:
        """One optimizer step over the global micro-batches ``micro``; returns (loss, tokens/s)."""
        cfg, accel, world, rank = self.cfg, self.accel, self.world, self.rank
        step_t0 = time.time()
        on_policy = self.on_policy(step)
        plan = []  # (rows, dummy, examples) per micro-batch: this process's rows of it
        for gb in micro:
            rows, dummy = (gb[rank::world], False) if gb[rank::world] else ([gb[0]], True)
            examples = self.student_answers(rows, step) if on_policy and not dummy else [self.examples[i] for i in rows]
            plan.append((rows, dummy, examples))
        if on_policy:  # the answers' lengths are known only where they were written
            mine = sum(e.n_targets for _, dummy, ex in plan if not dummy for e in ex)
            n_global = int(accel.reduce(torch.tensor([float(mine)], dtype=torch.float64, device=self.device), "sum").item())
        else:
            n_global = sum(self.examples[i].n_targets for gb in micro for i in gb)  # every process knows it
        for group in self.optimizer.param_groups:
            group["lr"] = helpers.lr_at(step, self.total, cfg)
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss_sum, agree, targets, tokens
        for j, (rows, dummy, examples) in enumerate(plan):
            batch = {k: v.to(self.device) for k, v in collate(examples, self.tok.pad_token_id or 0).items()}
            if dummy:  # this process has no row in the last, short batch: a row without loss keeps DDP in step
                batch["loss_mask"].zero_()
            tt = self.teacher_targets(rows, batch, dummy, online=on_policy)
            # loss: a sum over this process's positions, scaled so the gradient is the mean over the global step
            sync = contextlib.nullcontext() if j == len(plan) - 1 else accel.no_sync(self.wrapped)
            with sync:
                loss_sum, agree = self.wrapped(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["labels"], tt)
                accel.backward(loss_sum * world / max(n_global, 1))
            stats += torch.stack([loss_sum.detach().double(), agree.double(), batch["loss_mask"].sum().double(),
                                  batch["attention_mask"].sum().double() * (not dummy)])
        grad_norm = accel.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else torch.tensor(0.0)
        stats = accel.reduce(stats, "sum")
        loss = (stats[0] / stats[2].clamp_min(1)).item()
        if not math.isfinite(loss) or not math.isfinite(float(grad_norm)):
            last = ckpt.latest(self.folder.checkpoints)
            keep = f"the last good checkpoint is {last} (--resume after lowering --lr)" if last else "no checkpoint was written"
            raise EdgekdError(f"the loss became {loss} at step {step + 1}: lower --lr (now {cfg.lr}) or use --student-dtype fp32; {keep}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += int(stats[3])
        tps = self.tokens_seen / max(time.time() - self.train_t0, 1e-9)
        row = {"step": step + 1, "epoch": epoch, "loss": round(loss, 5), "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": round(float(grad_norm), 4), "train_top1": round((stats[1] / stats[2].clamp_min(1)).item(), 4),
               "tokens": int(stats[3]), "step_s": round(time.time() - step_t0, 3), "tokens_per_s": round(tps, 1)}
        if cfg.on_policy:
            row["on_policy"] = on_policy
        if self.cuda:
            row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        helpers.log_row(self.metrics_path, self.main, row)
        return loss, tps

    def task_record(self) -> dict[str, Any] | None:
        """The task as distill.json (and so the bundle's manifest) records it, with the calibration
        its teacher taught under (validate compares with the teacher as it taught)."""
        if not self.cfg.task:
            return None
        record = answers.task_of(self.cfg).record()
        if self.calibration is not None:
            record["calibration"] = self.calibration.record()
        return record

    # ---- final evaluation and outputs (main process) -------------------------------------------
    def save(self) -> dict[str, Any]:
        cfg = self.cfg
        after = self.evaluate()
        helpers.log_row(self.metrics_path, self.main, {"step": self.total, "eval": after})
        self.say(f"after: top-1 agreement {after['top1_agreement']:.3f}, KL {after['kl']:.3f}, ppl {after['student_ppl']:.1f} (teacher {after['teacher_ppl']:.1f})")
        result = {
            "format": "edgekd-distill",
            "edgekd_version": __version__,
            "teacher": cfg.teacher,
            "teacher_fingerprint": self.fingerprint,
            "heldout": answers.HELDOUT,
            "task": self.task_record(),
            "student": self.student.describe,
            "config": to_dict(cfg),
            "data": {**self.data_info, "train": self.summary, "heldout": self.held_summary, "shared_prefix_tokens": self.prefix_len,
                     "padding_waste": round(padding_waste(plan_epoch(self.lengths, self.global_bs, cfg.seed, 0, self.repeats), self.lengths), 4)},
            "metrics": {"before": self.before, "after": after},
            "steps": self.total,
            "processes": self.world,
            "device": str(self.device),
            "timing": {**self.timings, "train_s": round(self.train_s, 1), "epoch_s": self.epoch_times,
                       "train_tokens_per_s": round(self.tokens_seen / max(self.train_s, 1e-9), 1),
                       "wall_s": round(time.time() - self.t_start, 1)},
        }
        if self.main:
            helpers.save_student(self.accel.unwrap_model(self.wrapped).model, self.tok, self.teacher, self.out)
            self.folder.write_result(result)  # last: its presence means the run is complete
            shutil.rmtree(self.folder.checkpoints, ignore_errors=True)
        self.accel.wait_for_everyone()
        return result
