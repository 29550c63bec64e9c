"""The distillation's parts that ``edgekd.distill.trainer.Trainer`` calls, in the order it calls
them: the student's loss module, the output folder, training and held-out records (teacher
answers), the teacher's top-k (kept from its answers, or a cache pass), memory check, evaluation,
saving, metrics logging and progress. Each process writes its own part of the data and cache
files; everything else is written by the main process.

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

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from edgekd.device.errors import UsageError
from edgekd.device.io import json_line, jsonl_lines, proc_kib_field
from edgekd.distill.config import DistillConfig
from edgekd.distill.data import (
    Example,
    collate,
    common_prefix,
    expand_cache,
    prefill,
)
from edgekd.distill.losses import LossSpec, TeacherTargets, fused_head_loss, hidden_state_loss
from edgekd.distill.run import CONFIG_TOML, DISTILL_JSON, StudentRun
from edgekd.models import decoder_of
from edgekd.quant import bake_fake_quantize


class StudentLoss(torch.nn.Module):
    """The student plus its loss, as one module, so DDP sees the whole forward.

    ``forward(input_ids, attention_mask (B, S), loss_mask (B, S) bool, labels (B, S), teacher)``
    -> ``(loss_sum, n_agree)`` over the positions where ``loss_mask`` is set.

    ``prefix_len = P > 0``: every row starts with the same P tokens and none of them carries loss
    (a task's chat template, system prompt and instruction): they are run once, as one row, and
    their keys and values are shared by the batch, so a batch costs B x (S - P) + P tokens, not
    B x S. Exact: the same loss and gradients (``tests/test_distill.py``).

    ``matched``: indices into the student's hidden states (``output_hidden_states``) whose outputs
    ``hidden_state_loss`` pulls toward ``teacher.states``, in the same order (``matched_layers``).
    """

    def __init__(self, model, spec: LossSpec, chunk_size: int, prefix_len: int = 0, matched: tuple[int, ...] = ()):
        super().__init__()
        self.model, self.spec, self.chunk_size, self.prefix_len, self.matched = model, spec, chunk_size, prefix_len, matched

    def forward(self, input_ids, attention_mask, loss_mask, labels, teacher: TeacherTargets):
        states = bool(self.matched) and teacher.states is not None and self.spec.hidden_weight > 0
        out = decoder_forward(decoder_of(self.model), input_ids, attention_mask, self.prefix_len, states)
        if self.prefix_len:
            loss_mask, labels = loss_mask[:, self.prefix_len :], labels[:, self.prefix_len :]
        head = self.model.get_output_embeddings()
        loss, agree = fused_head_loss(out.last_hidden_state[loss_mask], head.weight, labels[loss_mask], teacher, self.spec,
                                      self.chunk_size, head.bias)
        if states:
            mine = torch.stack([out.hidden_states[i][loss_mask] for i in self.matched])
            loss = loss + self.spec.hidden_weight * hidden_state_loss(mine, teacher.states).sum()
        return loss, agree


def decoder_forward(decoder, input_ids, attention_mask, P: int = 0, hidden_states: bool = False):
    """The decoder's output for every row; ``P > 0``: for positions P.. only, the first P tokens
    (the same in every row) run once and their key/value cache expanded to the batch.
    ``hidden_states``: also every layer's output (``output.hidden_states``, as Hugging Face orders
    them: the embeddings, then layer i's output at i + 1, the last one after the final norm)."""
    if not P:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states)
    B, S = input_ids.shape
    shared = expand_cache(prefill(decoder, input_ids[:1, :P]), B)
    positions = torch.arange(P, S, device=input_ids.device)[None].expand(B, -1)
    return decoder(input_ids=input_ids[:, P:], attention_mask=attention_mask, past_key_values=shared,
                   position_ids=positions, use_cache=True, output_hidden_states=hidden_states)


def matched_layers(teacher_layers: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which hidden states intermediate-state KD compares, for a student made of ``teacher_layers``
    (student layer j is teacher layer ``teacher_layers[j]``): the output of student layer j, for
    every layer but the last, stands for the teacher's stream where the next kept layer reads it,
    the input of teacher layer ``teacher_layers[j + 1]``. -> (student indices, teacher indices) into
    ``output_hidden_states``. The last layer's output is what the logits already score.

    ``matched_layers([0, 1, 8, 29]) == ((1, 2, 3), (1, 8, 29))``."""
    student = tuple(range(1, len(teacher_layers)))
    return student, tuple(teacher_layers[1:])


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


# ---------------------------------------------------------------------------------------------
# Helpers the trainer calls, in the order it calls them
# ---------------------------------------------------------------------------------------------


def prepare_out_dir(out: Path, cfg: DistillConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``--overwrite`` (ours only) or ``--resume``; write the config.

    ``--overwrite`` never deletes a folder that edgekd did not write (no ``distill.toml``): it
    removes our checkpoints, metrics and ``distill.json``, and keeps ``data/`` and ``cache/``,
    which are reused only when their keys match."""
    from edgekd.device.outputs import refuse_unsafe_out
    from edgekd.distill.config_io import write_config_toml
    from edgekd.models import resolve_source

    teacher = resolve_source(cfg.teacher).path
    refuse_unsafe_out(out, tuple(p for p in (teacher, Path(cfg.task) if cfg.task and Path(cfg.task).is_dir() else None) if p))
    non_empty = out.is_dir() and any(out.iterdir())
    run = StudentRun(out)
    if resume:
        if not run.is_ours():
            raise UsageError(f"--resume: {out} holds no distill run (no {CONFIG_TOML}); start without --resume")
        if run.is_complete():
            raise UsageError(f"--resume: the run in {out} is already complete ({DISTILL_JSON}); pass --overwrite to run it again")
    elif non_empty:
        if not overwrite:
            raise UsageError(f"{out} exists and is not empty: pass --overwrite to replace the run, --resume to continue it, or choose another --out")
        if not run.is_ours():
            raise UsageError(f"{out} is not an edgekd distill folder (no {CONFIG_TOML}): refusing to overwrite files edgekd did not write; choose another --out")
        run.result_json.unlink(missing_ok=True)
        run.metrics.unlink(missing_ok=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_config_toml(run.config_toml, cfg)


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
    if "heads" in d:
        line += f"; {d['heads']['attention_heads']} query heads ({d['heads']['heads_share']:.0%})"
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


def cat_parts(parts: list[torch.Tensor], dummy: bool) -> torch.Tensor:
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


def trim_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from."""
    if path.is_file():
        rows = [(line, _row(line)) for line in jsonl_lines(path.read_text(encoding="utf-8")) if line.strip()]
        kept = [line for line, row in rows if row is not None and row.get("step", 0) <= step]  # a torn last line goes
        from edgekd.device.io import atomic_write_bytes

        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def logged_eval(path: Path, step: int) -> dict | None:
    """The evaluation logged at ``step`` (the "before" metrics of a resumed run)."""
    if not path.is_file():
        return None
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        row = _row(line)
        if row is not None and row.get("step") == step and "eval" in row:
            return row["eval"]
    return None


def _row(line: str) -> dict | None:
    """One metrics line, or None for a blank or damaged one (a kill or a full disk mid-write)."""
    try:
        row = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def log_row(path: Path, main: bool, row: dict) -> None:
    if main:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json_line(row) + "\n")


def sayer(console, main: bool):
    def say(msg: str, style: str | None = None) -> None:
        if main and console is not None:
            console.print(msg, style=style, markup=False, highlight=False)

    return say


def progress_bar(main: bool, console, tokens: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if not tokens:
        cols.append(TextColumn("loss {task.fields[loss]:.4f}"))
    cols += [TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if console is None:  # progress is not output: stderr, so that stdout stays the command's result
        from rich.console import Console

        console = Console(stderr=True)
    return Progress(*cols, disable=not main, console=console, transient=False)
