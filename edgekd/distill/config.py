"""``DistillConfig``: every setting of ``edgekd distill``, its default, the reason for it, and its help.

Filled the same way from a TOML file, CLI flags (which override the file) or Python, through
``edgekd.device.config.from_mapping``. Each field is also a flag of ``edgekd distill`` (``flag_fields``:
``--name-with-dashes``, a switch ``--name/--no-name``, unless the field names its own flags), its
``help`` metadata what ``--help`` shows: a new setting is written once, here (CONFIG_ONLY: the few
read only from a TOML).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Literal

from edgekd.device.errors import UsageError

Loss = Literal["fkl", "rkl", "jsd", "skl"]
Calibrate = Literal["auto", "off", "prior", "labels"]
DType = Literal["auto", "fp32", "bf16", "fp16"]


def _f(default, help: str, flags: tuple[str, ...] = ()):
    """A setting: its default, its help (``edgekd distill --help``) and, where they are not the
    field's name (``--name-with-dashes``, ``--name/--no-name`` for a switch), its CLI flags."""
    meta = {"help": help, "flags": flags}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # --- what to distill -----------------------------------------------------------------
    out: str = _f("", "Output folder: the student (Hugging Face format), distill.json, metrics, checkpoints.", flags=("--out", "-o"))
    teacher: str = _f("smollm2-135m-instruct", "Teacher: a known name, a Hugging Face folder, a .gguf file or a cached hub id.")
    task: str = _f("", "A task to distill for: a shipped one (sentiment, summary, grammar; see `edgekd tasks`) or a task folder. Its train/held-out prompts are the data and its task.toml's [distill] table the defaults; flags still override.")
    # The 21 of SmolLM2's 30 layers of highest block influence on the run's own data (ShortGPT): a
    # general chat student a CPU can heal in minutes (benchmarks/RESULTS-students.md); evenly spaced
    # layers throw away the ones that matter (20 layers zero-shot: top-1 0.015 evenly spaced, 0.21 by importance).
    student: str = _f("layers:21", "Student: layers:N (the N teacher layers of highest block influence, measured on the run's data), layers-kl:N (removed one at a time by KL to the teacher), even:N (evenly spaced), layers:0,6,... (exactly these), any of them +mlp:F and/or +heads:F (keep a share F of MLP channels / query heads by activation), budget:F (the lowest zero-shot KL within a share F of the teacher's parameters), a model folder sharing the teacher's tokenizer, or an architecture .toml.")
    # --- data ----------------------------------------------------------------------------
    data: tuple[str, ...] = _f((), "Training files: .txt, or .jsonl with text / messages / prompt+response records.")
    prompts: str = _f("", "A .jsonl of {\"prompt\"} records (or a .txt, one prompt a line): the teacher writes the answers. Default with no --data: the shipped prompt set.")
    heldout: str = _f("", "A .jsonl of held-out prompts (answered by the teacher) or prompt/response records. Default: the shipped held-out prompts.")
    # 128 shipped prompts x 64 tokens keeps the default 21-layer run (teacher answers + 3 epochs) under 15 minutes on 2 CPU cores.
    max_prompts: int = _f(128, "How many prompts the teacher answers for training (0 = all of them).")
    max_heldout: int = _f(32, "How many held-out prompts to evaluate on (0 = all of them).")
    max_new_tokens: int = _f(64, "Longest teacher answer, in tokens, when the teacher writes the answers.")
    # Sampling (not greedy) keeps answers varied and stops a 135M teacher from looping.
    gen_temperature: float = _f(0.7, "Sampling temperature for teacher answers (0 = greedy).")
    gen_top_p: float = _f(0.9, "Nucleus sampling for teacher answers.")
    gen_batch_size: int = _f(32, "Prompts answered together (batched sampling: ~100 tokens/s at 32 on 2 CPU cores).")
    max_length: int = _f(512, "Longest training sequence in tokens; longer ones are truncated (and counted).")
    # Off by default: the prompt is the user's words. On for a task whose pruned student must read
    # its input as the teacher does (sentiment: label agreement 0.69 -> 0.80, RESULTS-students.md).
    train_on_prompt: bool = _f(False, "Also distill the teacher's predictions on the prompt's own tokens (not the template and instruction every prompt shares): heals how a pruned student reads its input; costs a teacher pass over the prompts.")
    # --- loss ----------------------------------------------------------------------------
    loss: Loss = _f("fkl", "Distillation loss: fkl (forward KL, Hinton), rkl (reverse KL, MiniLLM), jsd (generalized JSD, GKD), skl (skew KL, DistiLLM).")
    # Pure KD: with teacher-written data the labels are teacher samples, so CE only adds sampling noise.
    alpha: float = _f(1.0, "Weight of the distillation loss; 1 - alpha goes to cross-entropy on the labels (0 = plain SFT).")
    temperature: float = _f(1.0, "Softmax temperature of both models in the distillation loss (scaled back by T^2).")
    beta: float = _f(0.5, "jsd only: mixture weight of the teacher, M = beta*P + (1-beta)*Q.")
    skew: float = _f(0.1, "skl only: skew alpha, KL(P || a*P + (1-a)*Q).")
    # Off by default until measured better (benchmarks/RESULTS-students.md): the sentiment teacher
    # calls 71% of the balanced training reviews positive, and its student learned that lean.
    balance_labels: bool = _f(False, "Labelled tasks: draw the training prompts so that each label the teacher answers with is seen as often as its most common one (the rarer ones repeat within an epoch): the student learns to read the input, not the teacher's prior.")
    # On by default for a labelled task that can be calibrated: the SmolLM2 teacher says "positive"
    # on ~70% of balanced reviews; its score cut at the balance point is right far more often
    # (docs/students.md has the measurements on real, human-labelled sets).
    calibrate: Calibrate = _f("auto", "Labelled tasks: take the teacher's lean out of its labels before they become targets (edgekd/distill/calibrate.py): a bias per label on the logits of the tokens that name it. labels = fit on records that carry a person's 'label' (--calibration-data, else the training prompts when they carry labels); prior = with no labels, so that the teacher's decisions on the training prompts split as the task's label_prior says; auto = labels where there are labels, else prior where the task declares one, else off. It moves the teacher's cut, not its ranking: it cannot help a teacher that orders the inputs badly (validate reports the teacher's AUC).")
    calibration_data: str = _f("", "A .jsonl of {\"prompt\", \"label\"} records (a few hundred at most, never your evaluation set) that the calibration is fit on.")
    calibration_records: int = _f(320, "At most this many records the calibration is fit on (the teacher answers each once, greedily).")
    label_loss: float = _f(0.0, "Labelled tasks: weight of an extra KL on the teacher's choice among the task's labels, renormalised over them, at the positions where it names one (0 = off).")
    label_hard: bool = _f(False, "With --label-loss: cross-entropy on the label the teacher picks (its greedy decision) instead of the KL on its label probabilities: a near-tie is taught as the decision the teacher makes.", flags=("--label-hard/--label-soft",))
    # Off by default: on the sentiment task it did not beat the hard label (mean accuracy on six labelled
    # sets 0.780 beside it at weight 1, 0.796 in its place at weight 2, against 0.801; docs/students.md).
    label_margin: float = _f(0.0, "Labelled tasks: weight of a squared error between the student's and the (calibrated) teacher's label score margins, log P(label i) - log P(label j), where the teacher names a label: the teacher's order of the inputs taught as numbers (logit matching), beside --label-loss's decision (0 = off; on the sentiment task it did not beat --label-loss alone, docs/students.md).")
    # Off by default: it needs the teacher in the loop (no top-k cache), a cost when epochs > 1.
    hidden_loss: float = _f(0.0, "Weight of intermediate-state KD (Minitron): each layer of a pruned student is pulled toward the teacher's residual stream at the depth it stands for (normalised squared error). Runs the teacher in the loop instead of the top-k cache (0 = off).")
    # Off by default: each on-policy step costs a student generation and a teacher pass in the loop.
    on_policy: float = _f(0.0, "On-policy distillation (GKD, Agarwal et al. 2024): in the second half of the run, this share of the optimizer steps trains on answers the student writes itself (greedy, or sampled at gen_temperature), scored by the teacher in the loop (0 = off; teacher-written answers only).")
    # --- optimisation --------------------------------------------------------------------
    epochs: int = _f(3, "Passes over the training data (ignored when --max-steps is set).")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = use --epochs).")
    # 5e-4: a pruned student starts close to a good model (benchmarks/RESULTS-distill.md has the learning-rate runs).
    lr: float = _f(5e-4, "Peak learning rate of AdamW.")
    # No decay: short runs, and decaying the tied 49k-token embedding hurts rare tokens.
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup: float = _f(0.05, "Warmup, as a fraction of the total steps, before the cosine decay.")
    min_lr_ratio: float = _f(0.1, "The cosine schedule ends at lr * min_lr_ratio.")
    batch_size: int = _f(4, "Sequences per micro-batch per process (the global batch is this x grad_accum x processes).")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    seed: int = _f(0, "Seed for student init, data order and teacher sampling.")
    # --- teacher-logit cache -------------------------------------------------------------
    # On by default: from epoch 2 on, the 30-layer teacher forward is skipped.
    cache_teacher: bool = _f(True, "Store the teacher's top-k log-probs per position in OUT/cache and reuse them (epochs 2+ and reruns skip the teacher).")
    top_k: int = _f(64, "How many teacher log-probs per position the cache keeps (the rest is one tail bucket).")
    # 1024 positions x 49k vocab x 4 B = 200 MB per tensor: bounded whatever the batch.
    chunk_size: int = _f(1024, "Positions per chunk in the loss: bounds the (positions x vocab) memory.")
    # --- quantization-aware distillation (edgekd/quant.py) ---------------------------------
    # On by default: measured free (default run: top-1 vs teacher 0.194 with, 0.190 without, same time),
    # and it makes the cpu (8-bit) and mobile (4-bit) exports reproduce the student's linear layers
    # exactly. Without it, 4-bit export of a pruned student fell to 0.74 (RTN) / 0.22 (HQQ) top-1 vs
    # the student (benchmarks/RESULTS-export.md). Use 0 for a student meant to stay fp16/fp32 (cuda).
    qat_bits: int = _f(4, "Train the student's linear layers through onnxruntime's symmetric 4- or 8-bit block-wise grid and save them on it, so an export with matmul_nbits (rtn, symmetric, same bits and block size) reproduces the student exactly (0 = off).")
    qat_block_size: int = _f(32, "Block size of the --qat-bits grid: the target profile's matmul_nbits.block_size.")
    # 8: the head/embedding int8 matrix that the cpu and mobile profiles ship is then exact too.
    qat_head_bits: int = _f(8, "With --qat-bits: also train the tied head and embedding on export's quantize_head_embedding grid, 8 or 4 bits, block --qat-block-size (0 = leave them fp32).")
    # --- evaluation, logging, checkpoints ------------------------------------------------
    eval_every: int = _f(0, "Evaluate on the held-out set every N steps (0 = only at start and end).")
    checkpoint_every: int = _f(50, "Write a checkpoint every N optimizer steps (0 = never) for --resume.")
    keep_checkpoints: int = _f(2, "How many recent checkpoints to keep.")
    # --- devices -------------------------------------------------------------------------
    teacher_dtype: DType = _f("auto", "Teacher weights: auto = fp32 on CPU, bf16 on CUDA.")
    student_dtype: DType = _f("auto", "Student compute: auto = fp32 on CPU, bf16 autocast over fp32 master weights on CUDA.")
    gradient_checkpointing: bool = _f(False, "Recompute student activations in backward to save memory (GPU, long sequences).", flags=("--gradient-checkpointing",))
    trust_remote_code: bool = _f(False, "Run model code shipped in a model folder (off: it can run anything).", flags=("--trust-remote-code",))
    allow_pickle: bool = _f(False, "Load pickle-only *.bin weights (off: unpickling can run code).", flags=("--allow-pickle",))

    def __post_init__(self):
        positive = ["epochs", "batch_size", "grad_accum", "top_k", "chunk_size", "max_length", "max_new_tokens",
                    "gen_batch_size", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in ["max_steps", "max_prompts", "max_heldout", "eval_every", "checkpoint_every", "weight_decay",
                     "max_grad_norm", "gen_temperature", "label_loss", "label_margin", "hidden_loss", "calibration_records"]:
            if getattr(self, name) < 0:
                raise UsageError(f"{name} = {getattr(self, name)} must not be negative")
        if self.temperature <= 0:
            raise UsageError(f"temperature = {self.temperature} must be > 0")
        if self.lr <= 0:
            raise UsageError(f"lr = {self.lr} must be > 0")
        for name in ["alpha", "warmup", "min_lr_ratio", "gen_top_p", "on_policy"]:
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} = {getattr(self, name)} must be between 0 and 1")
        for name in ["beta", "skew"]:
            if not 0 < getattr(self, name) < 1:
                raise UsageError(f"{name} = {getattr(self, name)} must be strictly between 0 and 1")
        if self.qat_bits not in (0, 4, 8):
            raise UsageError(f"qat_bits = {self.qat_bits}: use 4 or 8 (the bit widths MatMulNBits runs), or 0 for off")
        if self.qat_head_bits not in (0, 4, 8):
            raise UsageError(f"qat_head_bits = {self.qat_head_bits}: use 8 or 4 (quantize_head_embedding's int8 / int4), or 0 for off")
        if self.qat_block_size < 16 or self.qat_block_size & (self.qat_block_size - 1):
            raise UsageError(f"qat_block_size = {self.qat_block_size} must be a power of two >= 16 (MatMulNBits' block sizes)")
        if self.data and self.prompts:
            raise UsageError("pass either --data (text the student learns from) or --prompts (the teacher answers them), not both")


# Settings read only from a --config TOML (or a pipeline file), not flags: rarely changed, each
# documented on its field above. Every other field is a `edgekd distill` flag (tests/test_cli.py).
CONFIG_ONLY = ("gen_top_p", "gen_batch_size", "weight_decay", "warmup", "min_lr_ratio",
               "max_grad_norm", "keep_checkpoints")


def flag_fields() -> list[tuple[str, type, tuple[str, ...]]]:
    """``(name, type, flags)`` of every setting that is an ``edgekd distill`` flag, in the order
    they are declared: the type as the CLI reads it (a choice as text, a list as repeated flags)."""
    import typing

    hints = typing.get_type_hints(DistillConfig)
    out = []
    for f in dataclasses.fields(DistillConfig):
        if f.name in CONFIG_ONLY:
            continue
        kind = hints[f.name]
        origin = typing.get_origin(kind)
        kind = list[str] if origin is tuple else str if origin is Literal else kind
        dashed = "--" + f.name.replace("_", "-")
        flags = f.metadata["flags"] or ((f"{dashed}/--no-{dashed[2:]}",) if kind is bool else (dashed,))
        out.append((f.name, kind, flags))
    return out


def help_of(name: str) -> str:
    """The help text of a ``DistillConfig`` field, for the CLI (said once, here)."""
    for f in dataclasses.fields(DistillConfig):
        if f.name == name:
            default = f.default if f.default is not dataclasses.MISSING else ()
            return f"{f.metadata['help']} (default: {default!r})" if default not in ("", ()) else f.metadata["help"]
    raise KeyError(name)
