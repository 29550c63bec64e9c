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
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from edgekd import __version__
from edgekd.config import to_dict
from edgekd.distill import answers
from edgekd.distill import checkpoint as ckpt
from edgekd.distill import loop as helpers
from edgekd.distill.config import DistillConfig
from edgekd.distill.data import collate, encode_records, padding_waste, plan_epoch, steps_per_epoch, untarget_common_prefix
from edgekd.distill.losses import LossSpec, TeacherTargets
from edgekd.distill.run import StudentRun
from edgekd.distill.students import build_student
from edgekd.errors import EdgekdError, UsageError
from edgekd.io import write_json
from edgekd.quant import GRID, attach_fake_quantize, refresh_fake_quantize

__all__ = ["Trainer", "distill"]


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
        self.say = helpers._sayer(self.console, self.main)
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

    # ---- data: files, or prompts the teacher answers ------------------------------------------
    def prepare_data(self) -> None:
        cfg, say = self.cfg, self.say
        t0 = time.time()
        args = (cfg, self.out, self.teacher, self.tok, self.fingerprint, self.accel, say)
        self.records, self.data_info = answers.training_records(*args)
        heldout_records = answers.heldout_records_for(*args)
        self.timings["teacher_answers_s"] = round(time.time() - t0, 1)
        self.examples, self.summary = encode_records(self.tok, self.records, cfg.max_length, cfg.train_on_prompt)
        if cfg.train_on_prompt:  # the prompts' own text carries loss; what they all share does not
            self.summary["untargeted_common_prefix"] = untarget_common_prefix(self.examples)
        self.held, self.held_summary = encode_records(self.tok, heldout_records, cfg.max_length, False)
        if not self.examples:
            raise UsageError("no training example has a token to learn from: check --data and --max-length")
        if self.summary["truncated"]:
            say(f"[yellow]{self.summary['truncated']} training sequences were longer than max_length={cfg.max_length} and were truncated[/yellow]")
        self.lengths = [len(e.ids) for e in self.examples]

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
            student.describe["quantization_aware"] = {"bits": cfg.qat_bits, "block_size": cfg.qat_block_size, "grid": GRID,
                                                      "head_bits": cfg.qat_head_bits, "linear_layers": n}
            head = f", head/embedding on the int{cfg.qat_head_bits} grid" if cfg.qat_head_bits else ""
            say(f"quantization-aware: {n} linear layers train on the {cfg.qat_bits}-bit grid, block {cfg.qat_block_size}{head}")
            if n == 0:
                say(f"[yellow]warning: this student ({type(student.model).__name__}) has no nn.Linear layers to train on the grid "
                    "(e.g. GPT-2's Conv1D): --qat-bits does not cover its body[/yellow]")
        helpers.check_memory(cfg, student, sum(e.n_targets for e in self.held) // self.world + 1, max(self.lengths), self.device)

    # ---- teacher targets: top-k log-probs per loss position, kept from its answers or computed once
    def prepare_targets(self) -> None:
        cfg = self.cfg
        groups = helpers.label_token_groups(self.tok, answers.task_of(cfg).labels) if cfg.label_loss and cfg.task else ()
        self.spec = LossSpec(cfg.loss, cfg.alpha, cfg.temperature, cfg.beta, cfg.skew, vocab=self.student.vocab,
                             label_groups=groups, label_weight=cfg.label_loss if groups else 0.0)
        self.cached = None
        if cfg.cache_teacher:
            t0 = time.time()
            self.cached = answers.captured_cache(self.out, self.data_info, self.records, self.examples, self.student.vocab,
                                                 cfg.top_k, self.say)
            if self.cached is None:
                self.cached = answers.teacher_cache(cfg, self.out, self.teacher, self.examples, self.fingerprint,
                                                    self.student.vocab, self.accel, self.device, self.say)
            self.timings["teacher_cache_s"] = round(time.time() - t0, 1)

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
        wrapped = helpers.StudentLoss(model, self.spec, cfg.chunk_size, self.prefix_len)
        # fused on the CPU too: 0.04 s instead of 0.24 s a step for a 50M-parameter student (measured, torch 2.13)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True)
        if cfg.qat_bits:  # the fused step does not bump the weights' version: recompute the grids after it
            optimizer.register_step_post_hook(lambda *_: refresh_fake_quantize(model))
        self.wrapped, self.optimizer = accel.prepare(wrapped, optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]

        self.global_bs = cfg.batch_size * self.world
        self.per_epoch = steps_per_epoch(len(plan_epoch(self.lengths, self.global_bs, cfg.seed, 0)), cfg.grad_accum)
        self.total = cfg.max_steps or cfg.epochs * self.per_epoch
        self.start_step = 0
        if self.resume:
            found = ckpt.latest(self.folder.checkpoints)
            if found is not None:
                self.start_step = ckpt.load(found, accel.unwrap_model(self.wrapped).model, self.optimizer)
                refresh_fake_quantize(model)
                say(f"resuming from {found.name} (step {self.start_step} of {self.total})")
                if self.main:
                    helpers._trim_metrics(self.metrics_path, self.start_step)
                accel.wait_for_everyone()
            else:
                say("no complete checkpoint: starting from the beginning")
        self.reference = helpers.heldout_reference(self.teacher, self.held, self.rank, self.world, self.device, self.student.vocab)
        self.teacher_head = self.teacher.get_output_embeddings()

    def plan(self, step: int) -> tuple[int, list[list[int]]]:
        """The global micro-batches of optimizer step ``step`` and its epoch."""
        epoch, within = divmod(step, self.per_epoch)
        batches = plan_epoch(self.lengths, self.global_bs, self.cfg.seed, epoch)
        return epoch, batches[within * self.cfg.grad_accum : (within + 1) * self.cfg.grad_accum]

    def evaluate(self) -> dict[str, float]:
        return helpers.evaluate(self.accel.unwrap_model(self.wrapped).model, self.reference, self.held, self.rank, self.world,
                                self.device, self.accel)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, say = self.cfg, self.say
        before = helpers._logged_eval(self.metrics_path, 0) if self.start_step else None
        if before is None and self.start_step == 0:
            before = self.evaluate()
            say(f"before: top-1 agreement {before['top1_agreement']:.3f}, KL {before['kl']:.3f}, ppl {before['student_ppl']:.1f} (teacher {before['teacher_ppl']:.1f})")
            helpers._log(self.metrics_path, self.main, {"step": 0, "eval": before})
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
                    helpers._log(self.metrics_path, self.main, {"step": step + 1, "eval": last_eval})
                    say(f"step {step + 1}: top-1 agreement {last_eval['top1_agreement']:.3f}, KL {last_eval['kl']:.3f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < self.total:
                    if self.main:
                        ckpt.save(self.folder.checkpoints, step + 1, self.accel.unwrap_model(self.wrapped).model, self.optimizer,
                                  cfg.keep_checkpoints)
                    self.accel.wait_for_everyone()
        self.epoch_times.append(round(time.time() - epoch_t0, 2))
        self.train_s = time.time() - self.train_t0

    def teacher_targets(self, rows: list[int], batch: dict[str, torch.Tensor], dummy: bool) -> TeacherTargets:
        """What the student learns from for these rows: the cached top-k, or a teacher forward."""
        if self.cached is not None:
            return TeacherTargets(topk_logp=helpers._cat([self.cached[i][0] for i in rows], dummy).to(self.device),
                                  topk_idx=helpers._cat([self.cached[i][1] for i in rows], dummy).to(self.device))
        if self.cfg.alpha == 0:  # plain SFT: the teacher is not needed in the loop
            return TeacherTargets()
        with torch.no_grad():
            th = self.teacher.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return TeacherTargets(hidden=th[batch["loss_mask"]], weight=self.teacher_head.weight, bias=self.teacher_head.bias)

    def step(self, step: int, epoch: int, micro: list[list[int]]) -> tuple[float, float]:
        """One optimizer step over the global micro-batches ``micro``; returns (loss, tokens/s)."""
        cfg, accel, world, rank = self.cfg, self.accel, self.world, self.rank
        step_t0 = time.time()
        n_global = sum(self.examples[i].n_targets for gb in micro for i in gb)  # every process knows it
        for group in self.optimizer.param_groups:
            group["lr"] = helpers.lr_at(step, self.total, cfg)
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss_sum, agree, targets, tokens
        for j, gb in enumerate(micro):
            rows, dummy = (gb[rank::world], False) if gb[rank::world] else ([gb[0]], True)
            batch = {k: v.to(self.device) for k, v in collate([self.examples[i] for i in rows], self.tok.pad_token_id or 0).items()}
            if dummy:  # this process has no row in the last, short batch: a row without loss keeps DDP in step
                batch["loss_mask"].zero_()
            tt = self.teacher_targets(rows, batch, dummy)
            # loss: a sum over this process's positions, scaled so the gradient is the mean over the global step
            sync = contextlib.nullcontext() if j == len(micro) - 1 else accel.no_sync(self.wrapped)
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
        if self.cuda:
            row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        helpers._log(self.metrics_path, self.main, row)
        return loss, tps

    # ---- final evaluation and outputs (main process) -------------------------------------------
    def save(self) -> dict[str, Any]:
        cfg = self.cfg
        after = self.evaluate()
        helpers._log(self.metrics_path, self.main, {"step": self.total, "eval": after})
        self.say(f"after: top-1 agreement {after['top1_agreement']:.3f}, KL {after['kl']:.3f}, ppl {after['student_ppl']:.1f} (teacher {after['teacher_ppl']:.1f})")
        result = {
            "format": "edgekd-distill",
            "edgekd_version": __version__,
            "teacher": cfg.teacher,
            "teacher_fingerprint": self.fingerprint,
            "heldout": answers.HELDOUT,
            "task": answers.task_of(cfg).record() if cfg.task else None,
            "student": self.student.describe,
            "config": to_dict(cfg),
            "data": {**self.data_info, "train": self.summary, "heldout": self.held_summary, "shared_prefix_tokens": self.prefix_len,
                     "padding_waste": round(padding_waste(plan_epoch(self.lengths, self.global_bs, cfg.seed, 0), self.lengths), 4)},
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
            write_json(self.folder.result_json, result)  # last: its presence means the run is complete
            shutil.rmtree(self.folder.checkpoints, ignore_errors=True)
        self.accel.wait_for_everyone()
        return result
