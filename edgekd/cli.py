"""The one Typer app. Commands parse their options and call the library; nothing else lives here.

Every library error is an ``EdgekdError``: it is printed as one red line and the command exits
with its code (1 failure, 2 bad input). Set EDGEKD_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgekd import __version__
from edgekd.errors import EXIT_CODES, INTERNAL_ERROR, EdgekdError, UsageError, first_line

if TYPE_CHECKING:
    from rich.status import Status

app = typer.Typer(
    name="edgekd",
    help=(
        "Ship a small, fast, faithful copy of a teacher LLM to the edge.\n\n"
        "The road: distill a student from the teacher -> export it to ONNX "
        "for a target profile (cpu, mobile, cuda, web) -> validate the bundle against the "
        "teacher and pass or fail the target's gates -> generate with it.\n\n"
        "Start with `edgekd teachers`, `edgekd tasks` and `edgekd inspect smollm2-135m-instruct`.\n\n"
        "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    # Help and usage errors as plain text: a help text's [gates] or a path's [/dim] is text, not
    # markup, and a usage error is one line (main() below), not a box.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Text is text: nothing edgekd prints is parsed as Rich markup (paths and prompts hold brackets);
# colour is given as a style.
console = Console(markup=False, highlight=False)
# What `pip install edgekd` leaves out and `pip install 'edgekd[toolchain]'` brings (pyproject.toml).
TOOLCHAIN_MODULES = {"torch", "transformers", "optimum", "onnx", "onnx_ir", "accelerate", "safetensors", "gguf",
                     "huggingface_hub", "matplotlib"}
err_console = Console(stderr=True, markup=False, highlight=False)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line (no file, line number or source line from deep inside a library)."""
    return f"warning: {first_line(str(message), 10**6)}\n"


# click's (typer's vendored copy) base error: a usage error, printed as one line by main()
_CLICK_ERROR: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def command(*args, **kwargs) -> Callable:
    """Register a command whose ``EdgekdError`` becomes one red line and an exit code."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if not os.environ.get("EDGEKD_DEBUG"):
                warnings.formatwarning = _one_line_warning
            try:
                _check_numbers(k)
                return fn(*a, **k)
            except EdgekdError as e:
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                _error_line(str(e))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (main() makes them this)
                err_console.print("interrupted" if not isinstance(e, Terminated) else f"stopped by signal {e.signum}", style="yellow")
                raise typer.Exit(128 + getattr(e, "signum", 2)) from None
            except (typer.Exit, typer.Abort, SystemExit, _CLICK_ERROR):  # a usage error: one line in main()
                raise
            except ModuleNotFoundError as e:  # a runtime-only install (pip install edgekd) running a toolchain command
                if os.environ.get("EDGEKD_DEBUG") or (e.name or "").split(".")[0] not in TOOLCHAIN_MODULES:
                    raise
                _error_line(f"`edgekd {fn.__name__}` needs the toolchain ({e.name} is not installed): "
                            "pip install 'edgekd[toolchain]' (a device needs only `edgekd check` and `edgekd generate`)")
                raise typer.Exit(2) from None
            except OSError as e:  # a full disk, a read-only folder, a missing permission: the user's to fix
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                where = e.filename or next((k[o] for o in ("out", "json_out", "bundle") if k.get(o)), None)
                where = f" {where}" if where else ""
                _error_line(f"cannot use{where}: {e.strerror or e} (free some space, or choose a writable folder)")
                raise typer.Exit(2) from None
            except Exception as e:  # a bug or an unforeseen failure: still one line, its own exit code
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                machine = machine_error(e)  # a library's words for a full disk or a read-only folder
                if machine is not None:
                    _error_line(machine)
                    raise typer.Exit(2) from None
                first = first_line(str(e))
                _error_line(f"internal error, {type(e).__name__}: {first} (set EDGEKD_DEBUG=1 for the traceback)")
                raise typer.Exit(INTERNAL_ERROR) from None

        app.command(*args, **kwargs)(wrapper)
        return fn

    return deco


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that every ``finally`` and context
    manager cleans up as for Ctrl-C (the lock, the ``.partial`` folder, temporary work)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _check_numbers(options: dict) -> None:
    """Every number a flag gives is finite: ``--lr nan`` or ``--temperature inf`` is bad input,
    named here, not a late failure deep in a library (``nan <= 0`` is false, so range checks pass it)."""
    import math

    for name, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"--{name.replace('_', '-')} = {v}: give a finite number")


def machine_error(e: BaseException) -> str | None:
    """One line for an error a library raises about the machine rather than the code (safetensors
    reports a full disk as a bare Exception), or None when it is not one."""
    text = str(e)
    for words, what in (("No space left", "the disk is full"), ("Read-only file system", "the folder is read-only"),
                        ("Permission denied", "permission denied"), ("Disk quota exceeded", "the disk quota is exceeded")):
        if words in text:
            return f"cannot write: {what} ({first_line(e)}): free some space, or choose a writable folder"
    return None


_LINE_BREAKS = set("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines (and a terminal) breaks at


def _error_line(message: str) -> None:
    """``error: message`` in red, on one line: text, never markup (paths may hold brackets), with
    line breaks inside it (a path or a prompt may hold one) shown escaped."""
    one = "".join(ascii(c)[1:-1] if c in _LINE_BREAKS else c for c in message)
    err_console.print(Text("error: ", style="bold red") + Text(one), soft_wrap=True)


def _progress(status: Status, soft_wrap: bool | None = None) -> Callable[[str], None]:
    """A ``log`` callback: each progress line replaces the spinner's text and is kept, dimmed, on stderr."""

    def log(msg: str) -> None:
        status.update(Text(msg))  # a spinner parses markup whatever the console says: text only
        err_console.print(msg, style="dim", soft_wrap=soft_wrap)

    return log


def _version(value: bool) -> None:
    if value:
        console.print(f"edgekd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar="")
    ] = None,
) -> None:
    pass


# Options shared by the commands that load a model.
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the model's own Python code from its folder (off: it can run anything).", metavar="")
]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Load pickle-only *.bin weights (off: unpickling can run code).", metavar="")
]


@command("teachers")
def teachers() -> None:
    """List the teachers edgekd knows by name and whether each is installed."""
    from edgekd.models import KNOWN_TEACHERS

    table = Table(title="Known teachers")
    table.add_column("name", no_wrap=True)
    table.add_column("installed", no_wrap=True)
    table.add_column("what / where", overflow="fold")
    for t in KNOWN_TEACHERS.values():
        path = t.path()
        where = f"installed at {path}" if path else f"install with: {t.install}"
        table.add_row(t.name, Text("yes", style="green") if path else Text("no", style="red"), f"{t.description}\n{where}")
    console.print(table)
    console.print("Any Hugging Face folder, cached hub id (org/name) or .gguf file works too.")


@command("targets")
def targets() -> None:
    """List the shipped target profiles (`edgekd export --target NAME`) with their descriptions."""
    from edgekd.paths import resource
    from edgekd.targets import SHIPPED, load_target

    table = Table(title="Shipped target profiles (a profile .toml of your own works too: --target FILE)")
    for col in ("name", "what", "steps", "providers", "file"):
        table.add_column(col, overflow="fold")
    for name in SHIPPED:
        t = load_target(name)
        table.add_row(name, t.description, ", ".join(t.steps), ", ".join(t.execution_providers), str(resource(f"targets/{name}.toml")))
    console.print(table)


@command("tasks")
def tasks() -> None:
    """List the shipped tasks (`edgekd distill --task NAME`): what each is, its data and its defaults."""
    from edgekd.io import iter_jsonl
    from edgekd.tasks import shipped_tasks

    table = Table(title="Shipped tasks (a task folder of your own works too: --task DIR)")
    for col in ("name", "what", "scored by", "train / held-out", "student", "gates"):
        table.add_column(col, overflow="fold")
    for t in shipped_tasks():
        counts = [sum(1 for _ in iter_jsonl(p)) for p in (t.train, t.heldout)]
        scored = f"label ({', '.join(t.labels)})" if t.labels else "ROUGE-L, exact match"
        gates = ", ".join(f"{k} {v:g}" for k, v in vars(t.spec.gates).items() if v is not None) or "–"
        table.add_row(t.name, t.spec.description, scored, f"{counts[0]} / {counts[1]}", t.spec.distill.get("student", "–"), gates)
    console.print(table)
    console.print("Distill one: edgekd distill --task sentiment --out runs/sentiment")


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


@command("inspect")
def inspect(
    model: Annotated[str, typer.Argument(help="A Hugging Face folder, a .gguf file, a cached hub id, or a known teacher name.")],
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.", metavar="")] = False,
) -> None:
    """Load a model and print its architecture, size, tokenizer and chat template facts."""
    import json

    from edgekd.models import describe, load_model, resolve_source

    source = resolve_source(model)
    with console.status(Text(f"loading {model} ...")):
        m, tok = load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    facts = describe(m, tok, source)
    if json_out:
        print(json.dumps(facts, indent=2))
        return
    table = Table(title=f"{model}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in facts.items():
        if key in ("parameters", "embedding_parameters"):
            value = f"{value / 1e6:.1f}M ({value:,})"
        elif key == "size_on_disk_bytes":
            key, value = "size_on_disk", _fmt_bytes(value)
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def _opt(name: str, *flags: str, **kw):
    """A `distill` option whose help text is the DistillConfig field's (said once, in config.py)."""
    from edgekd.distill.config import help_of

    return typer.Option(*flags, help=help_of(name), show_default=False, **kw)


@command("distill")
def distill(
    out: Annotated[Optional[str], _opt("out", "--out", "-o")] = None,
    teacher: Annotated[Optional[str], _opt("teacher", "--teacher")] = None,
    task: Annotated[Optional[str], _opt("task", "--task")] = None,
    student: Annotated[Optional[str], _opt("student", "--student")] = None,
    data: Annotated[Optional[list[str]], _opt("data", "--data")] = None,
    prompts: Annotated[Optional[str], _opt("prompts", "--prompts")] = None,
    heldout: Annotated[Optional[str], _opt("heldout", "--heldout")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A TOML file of settings (the same names as the flags, with _); flags override it.")] = None,
    loss: Annotated[Optional[str], _opt("loss", "--loss")] = None,
    alpha: Annotated[Optional[float], _opt("alpha", "--alpha")] = None,
    temperature: Annotated[Optional[float], _opt("temperature", "--temperature")] = None,
    beta: Annotated[Optional[float], _opt("beta", "--beta")] = None,
    skew: Annotated[Optional[float], _opt("skew", "--skew")] = None,
    balance_labels: Annotated[Optional[bool], _opt("balance_labels", "--balance-labels/--no-balance-labels", metavar="")] = None,
    label_loss: Annotated[Optional[float], _opt("label_loss", "--label-loss")] = None,
    label_hard: Annotated[Optional[bool], _opt("label_hard", "--label-hard/--label-soft", metavar="")] = None,
    hidden_loss: Annotated[Optional[float], _opt("hidden_loss", "--hidden-loss")] = None,
    on_policy: Annotated[Optional[float], _opt("on_policy", "--on-policy")] = None,
    train_on_prompt: Annotated[Optional[bool], _opt("train_on_prompt", "--train-on-prompt/--no-train-on-prompt", metavar="")] = None,
    epochs: Annotated[Optional[int], _opt("epochs", "--epochs")] = None,
    max_steps: Annotated[Optional[int], _opt("max_steps", "--max-steps")] = None,
    lr: Annotated[Optional[float], _opt("lr", "--lr")] = None,
    batch_size: Annotated[Optional[int], _opt("batch_size", "--batch-size")] = None,
    grad_accum: Annotated[Optional[int], _opt("grad_accum", "--grad-accum")] = None,
    max_length: Annotated[Optional[int], _opt("max_length", "--max-length")] = None,
    max_prompts: Annotated[Optional[int], _opt("max_prompts", "--max-prompts")] = None,
    max_heldout: Annotated[Optional[int], _opt("max_heldout", "--max-heldout")] = None,
    max_new_tokens: Annotated[Optional[int], _opt("max_new_tokens", "--max-new-tokens")] = None,
    gen_temperature: Annotated[Optional[float], _opt("gen_temperature", "--gen-temperature")] = None,
    cache_teacher: Annotated[Optional[bool], _opt("cache_teacher", "--cache-teacher/--no-cache-teacher", metavar="")] = None,
    top_k: Annotated[Optional[int], _opt("top_k", "--top-k")] = None,
    chunk_size: Annotated[Optional[int], _opt("chunk_size", "--chunk-size")] = None,
    qat_bits: Annotated[Optional[int], _opt("qat_bits", "--qat-bits")] = None,
    qat_block_size: Annotated[Optional[int], _opt("qat_block_size", "--qat-block-size")] = None,
    qat_head_bits: Annotated[Optional[int], _opt("qat_head_bits", "--qat-head-bits")] = None,
    eval_every: Annotated[Optional[int], _opt("eval_every", "--eval-every")] = None,
    checkpoint_every: Annotated[Optional[int], _opt("checkpoint_every", "--checkpoint-every")] = None,
    seed: Annotated[Optional[int], _opt("seed", "--seed")] = None,
    teacher_dtype: Annotated[Optional[str], _opt("teacher_dtype", "--teacher-dtype")] = None,
    student_dtype: Annotated[Optional[str], _opt("student_dtype", "--student-dtype")] = None,
    gradient_checkpointing: Annotated[Optional[bool], _opt("gradient_checkpointing", "--gradient-checkpointing", metavar="")] = None,
    trust_remote_code: Annotated[Optional[bool], _opt("trust_remote_code", "--trust-remote-code", metavar="")] = None,
    allow_pickle: Annotated[Optional[bool], _opt("allow_pickle", "--allow-pickle", metavar="")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last complete checkpoint.", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier distill run in --out (its data/ and cache/ are reused when they match).", metavar="")] = False,
) -> None:
    """Distill a small student from a teacher: the teacher answers prompts (or you give data), the
    student learns its token distributions, and --out gets a Hugging Face folder + distill.json.

    With no flags but --out: SmolLM2-135M-Instruct teaches a copy of its 21 most influential layers
    on the shipped prompts (about 14 minutes on 2 CPU cores); --task NAME (see `edgekd tasks`)
    distills a student for one job. Runs unchanged under `accelerate launch`. Set only in a --config
    TOML: gen_top_p, gen_batch_size, weight_decay, warmup, min_lr_ratio,
    max_grad_norm, keep_checkpoints.
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "resume", "overwrite")}
    from edgekd.distill.config_io import resolve
    from edgekd.distill.trainer import distill as run_distill

    if flags["data"] is not None:
        flags["data"] = tuple(flags["data"])
    resume_from = Path(out) if resume and out else None
    cfg = resolve(config, flags, resume_from=resume_from)
    result = run_distill(cfg, resume=resume, overwrite=overwrite, console=err_console)
    after = result["metrics"]["after"]
    console.print(Text.assemble(
        ("done", "green"), f" in {result['timing']['wall_s']:.0f} s: {cfg.out} (held-out top-1 agreement "
        f"{after['top1_agreement']:.3f}, KL {after['kl']:.3f}, perplexity ratio {after['ppl_ratio']:.2f})"))


from edgekd.export import GOLDEN_PROMPTS  # noqa: E402  (light: the flag's default)


@command("export")
def export(
    model: Annotated[str, typer.Argument(help="A Hugging Face folder (e.g. a distilled student), a .gguf file, a cached hub id, or a known teacher name.")],
    target: Annotated[str, typer.Option("--target", "-t", help="A shipped profile (cpu, mobile, cuda, web) or a path to a profile .toml.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle folder to write (must not exist unless --overwrite).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out (only once the new one is complete).", metavar="")] = False,
    trust_remote_code: TrustRemoteCode = False,
    search: Annotated[bool, typer.Option("--search", help="Export and validate each of the target's [[candidates]] recipes; keep the smallest that passes its gates (exit 1 if none does).", metavar="")] = False,
    golden_prompts: Annotated[Optional[int], typer.Option("--golden-prompts", help=f"Held-out prompts whose reference answers and top-k log-probs go into golden.json, for `edgekd check` on the device (0: none; default: {GOLDEN_PROMPTS}).", show_default=False)] = None,
    golden_data: Annotated[Optional[Path], typer.Option("--golden-data", help="A jsonl of {\"prompt\"} records for golden.json (default: the distillation's held-out split, else the shipped held-out prompts).")] = None,
) -> None:
    """Export a model to an ONNX bundle (KV cache, quantized for the target) with tokenizer, manifest
    and a golden reference for `edgekd check`."""
    from edgekd.export import export_bundle

    if golden_prompts is not None and golden_prompts < 0:
        raise UsageError(f"--golden-prompts {golden_prompts}: give 0 (no golden reference) or more")
    if search:
        return _export_search(model, target, out, overwrite, trust_remote_code)

    with console.status("exporting ...") as status:
        manifest = export_bundle(model, target, out, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                 log=lambda msg: status.update(Text(msg)), golden_prompts=golden_prompts, golden_data=golden_data)
    from edgekd.export import summary

    lines, warnings = summary(manifest, out)
    for line in lines:
        console.print(line, highlight=False, markup=False)
    for line in warnings:
        err_console.print(f"warning: {line}", highlight=False, markup=False)


Threads = Annotated[Optional[int], typer.Option("--threads", help="onnxruntime intra-op threads (default: one per physical core).")]


@command("generate")
def generate(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by `edgekd export`.")],
    prompt: Annotated[str, typer.Argument(help="The user message; the bundle's chat template is applied.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many new tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic); > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Sample among the most likely tokens holding this mass (1 = all).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (repeatable answers).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as it is, without the chat template.", metavar="")] = False,
    threads: Threads = None,
) -> None:
    """Answer a prompt with a bundle (onnxruntime, KV cache), streaming the text, then print tokens/s."""
    from edgekd.runtime import Runtime, Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    rt = Runtime(bundle, threads=threads)
    for note in rt.warnings:
        err_console.print(Text.assemble(("warning:", "yellow"), f" {note}"), soft_wrap=True)
    for piece in rt.stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling, chat=not raw):
        console.out(piece, end="", highlight=False)
        console.file.flush()
    t = rt.last
    console.out("")
    err_console.print(
        f"{t.new_tokens} tokens; prefill {t.prompt_tokens} tokens in {1000 * t.prefill_s:.0f} ms; "
        f"decode {t.decode_tokens_per_s:.1f} tokens/s ({', '.join(rt.session.get_providers())})",
        style="dim",
        soft_wrap=True,
    )


@command("validate")
def validate(
    bundles: Annotated[list[Path], typer.Argument(help="One or more bundle folders; several are compared side by side.")],
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="The teacher to compare with (default: from the manifest; else the reference).")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="The unquantized model (default: the manifest's source model).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="A jsonl of {\"prompt\", \"response\"?} (default: the distillation's held-out split, else shipped prompts).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default: <first bundle>-report).")] = None,
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", help="Held-out prompts to compare (default: the task's validate_prompts, else 8).")] = None,
    answer_tokens: Annotated[Optional[int], typer.Option("--answer-tokens", help="Answer tokens scored and generated per prompt (default: the task's, else 32).")] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure load time, prefill, decode tokens/s and peak memory.", metavar="")] = True,
    threads: Threads = None,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Apply this profile's gates (a shipped name or a .toml) whatever the bundle's manifest says; without it the gates come from the bundle itself.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Score the answers as this task does (a shipped name or a task folder: labels, gates, held-out prompts) whatever the manifest says, e.g. the teacher's own bundle on your job.")] = None,
) -> None:
    """Check that a bundle is still the model: fidelity against the reference and the teacher,
    speed and cost, and the target's gates. Exit 0 when every gate passes, 1 when one fails."""
    import shlex

    from edgekd.validate import ValidateConfig, failed_gates
    from edgekd.validate import validate as run_validate
    from edgekd.validate.gates import GateFailed
    from edgekd.validate.report import rich_tables

    config = ValidateConfig(
        teacher=teacher, reference=reference, data=data, num_prompts=num_prompts,
        answer_tokens=answer_tokens, speed=speed, threads=threads, target=target, task=task,
    )
    flags = {"--teacher": teacher, "--reference": reference, "--data": data, "--out": out,
             "--num-prompts": num_prompts,
             "--answer-tokens": answer_tokens, "--threads": threads,
             "--target": target, "--task": task}
    words = ["edgekd", "validate", *map(str, bundles)] + [w for k, v in flags.items() if v is not None for w in (k, str(v))]
    command_line = " ".join(shlex.quote(w) for w in words) + ("" if speed else " --no-speed")
    with console.status("validating ...") as status:
        reports, out_dir = run_validate(
            bundles, config, out, log=_progress(status, soft_wrap=True),
            command=command_line,
        )
    for table in rich_tables(reports):
        console.print(table)
    console.print(f"report: {out_dir}/report.md, report.json, plots")
    from edgekd.validate.gates import verdict_lines

    lines = [line for r in reports for line in verdict_lines(r)]
    for line in lines:
        console.print(line, highlight=False, markup=False)
    failed = failed_gates(reports)
    if failed:
        raise GateFailed(f"{len(failed)} gate(s) failed: " + "; ".join(failed))
    n_gates = sum(len(r["gates"]) for r in reports)
    if not n_gates:
        console.print("no gates in the bundle's target")
    elif any("FAR from the teacher" in line for line in lines):
        console.print(f"all {n_gates} gates pass, but the student is far from its teacher (above)", style="yellow")
    else:
        console.print(Text.assemble(("all gates pass", "green"), f" ({n_gates})"))


@command("check")
def check(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by `edgekd export` (it carries golden.json).")],
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", help="Golden prompts to replay (default: all, 16 unless export was told otherwise).")] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Time prefill and decode tokens/s on this machine.", metavar="")] = True,
    threads: Threads = None,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Apply this profile's [gates] (a shipped name or a .toml) instead of the bundle's own.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report to this JSON file.")] = None,
) -> None:
    """Check a bundle on the machine that ships it, without torch or the teacher: replay the golden
    reference export wrote into it (the unquantized model's answers and top-k log-probs) and apply
    the target's gates. Exit 0 when every gate passes, 1 when one fails, 2 for bad input."""
    from edgekd.check import CheckConfig, check_bundle
    from edgekd.io import check_writable, write_json
    from edgekd.validate.gates import GateFailed, GateResult

    if json_out is not None:  # before the check runs, not after it
        if json_out.is_dir():
            raise UsageError(f"--json {json_out} is a folder: give a file name, e.g. {json_out / 'check.json'}")
        check_writable(json_out.parent)
    config = CheckConfig(num_prompts=num_prompts, speed=speed, threads=threads, target=target)
    with console.status("checking ...") as status:
        report = check_bundle(bundle, config, log=_progress(status))
    if json_out is not None:
        write_json(json_out, report)
    env, fid, cost = report["environment"], report["fidelity"]["reference"], report["cost"]
    table = Table(title=f"{bundle} on {env['cpu']} ({env['machine']}, onnxruntime {env['onnxruntime']}, {', '.join(env['providers'])})")
    for col in ("vs the reference", "value"):
        table.add_column(col)
    rows = [("golden prompts / answer positions", f"{report['golden']['prompts']} / {fid['positions']}"),
            ("top-1 agreement", f"{fid['top1']:.3f}"), ("KL on the top-k (lower bound), nats", f"{fid['kl_mean']:.4f}"),
            ("perplexity ratio", f"{fid['ppl_ratio']:.3f}"), ("greedy answers identical", f"{fid['greedy_exact']:.2f}"),
            ("greedy common prefix, tokens", f"{fid['greedy_prefix_tokens']:.1f} of {report['golden']['answer_tokens']}"),
            ("model size", f"{cost['size_mb']:.1f} MB")]
    if report.get("task"):
        rows.append(("label agreement", f"{report['task']['label_agreement_vs_reference']:.3f}"))
    if "decode_tokens_per_s" in cost:
        rows += [("decode, batch 1", f"{cost['decode_tokens_per_s']:.1f} tokens/s"),
                 (f"prefill, {cost['prefill_tokens']} tokens", f"{cost['prefill_ms']:.1f} ms")]
    if "decode_roofline_share" in cost:
        rows.append(("decode, share of the bandwidth roofline",
                     f"{cost['decode_roofline_share']:.0%} ({cost['decode_weight_mb']:.1f} MB a token at {cost['read_bandwidth_gb_s']:.1f} GB/s: "
                     f"{cost['decode_roofline_tokens_per_s']:.0f} tokens/s at most)"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for g in report["gates"]:
        line = GateResult(**g).line()
        console.print(("PASS " if g["passed"] else "FAIL ") + line, highlight=False, markup=False)
    if report["not_checked"]:
        console.print(f"not checked on the device (edgekd validate measures them): {', '.join(report['not_checked'])}", highlight=False)
    failed = [GateResult(**g).line() for g in report["gates"] if not g["passed"]] + report["problems"]
    if failed:
        raise GateFailed(f"{len(failed)} check(s) failed: " + "; ".join(failed))
    console.print(Text.assemble(("all gates pass", "green"), f" ({len(report['gates'])}, from {report['gates_from']})") if report["gates"]
                  else "no gates in the bundle's target")


@command("bench")
def bench(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by `edgekd export`.")],
    reference: Annotated[Optional[str], typer.Option("--reference", help="The PyTorch model to compare with (default: the manifest's source model).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Decode steps timed.")] = 64,
    threads: Threads = None,
) -> None:
    """Decode tokens/s of the bundle against PyTorch eager `generate` of its model, same process, as a ratio."""
    from edgekd.validate.speed import bench as run_bench

    with console.status("benchmarking ..."):
        r = run_bench(bundle, reference=reference, max_new_tokens=tokens, threads=threads)
    table = Table(title=f"decode, batch 1, greedy, {tokens} tokens")
    for col in ("engine", "decode tokens/s", "ratio"):
        table.add_column(col)
    table.add_row(f"edgekd runtime ({', '.join(r['providers'])})", f"{r['edgekd_decode_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x")
    table.add_row(f"PyTorch eager generate ({r['reference']})", f"{r['torch_decode_tokens_per_s']:.1f}", "1.00x")
    console.print(table)
    console.print(f"prefill {r['prefill_tokens']} tokens: {r['edgekd_prefill_ms']:.1f} ms (edgekd runtime)")


def _export_search(model: str, target: str, out: Path, overwrite: bool, trust_remote_code: bool) -> None:
    """`edgekd export --search`: the search, then its table (also when no candidate passes)."""
    from edgekd.search import NoCandidatePasses, search_export, table_rows
    from edgekd.validate.report import verdict_text

    def show(result) -> None:
        table = Table(title=f"search: target {result.target}")
        for col in ("candidate", "size MB", "decode tok/s", "top-1", "KL", "verdict"):
            table.add_column(col, overflow="fold")
        for row in table_rows(result):
            table.add_row(*row[:5], verdict_text(row[5]))
        console.print(table)

    try:
        with console.status("searching ...") as status:
            result = search_export(model, target, out, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                   log=_progress(status))
    except NoCandidatePasses as e:
        show(e.result)
        raise
    show(result)
    console.print(Text.assemble(("wrote", "green"), f" {out}: candidate {result.chosen!r}, the smallest that passes the gates"))
    console.print(f"next: edgekd validate {out}")


@command("run")
def run(
    pipeline: Annotated[Path, typer.Argument(help="A pipeline .toml: [distill] (or model = ...), [[export]] per target, [validate].")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run and why, and run nothing.", metavar="")] = False,
) -> None:
    """Distill -> export -> validate from one file; each stage is skipped when its output is up to
    date (same config and inputs), so a rerun after a crash or an edit does only what is needed.
    Exit 0 when every validated bundle passes its gates, 1 when one fails."""
    from edgekd.pipeline import run_pipeline
    from edgekd.validate.gates import GateFailed

    results = run_pipeline(pipeline, dry_run=dry_run, log=lambda msg: err_console.print(msg, style="dim", soft_wrap=True))
    colors = {"ran": "green", "up to date": "cyan", "skipped": "yellow", "failed": "red", "would run": "magenta"}
    table = Table(title=f"pipeline {pipeline}" + (" (dry run)" if dry_run else ""))
    for col in ("stage", "output", "status", "verdict", "s", "why"):
        table.add_column(col, overflow="fold")
    for r in results:
        verdict = Text({True: "PASS", False: "FAIL", None: ""}[r.passed], style="green" if r.passed else "red")
        table.add_row(r.stage, r.name, Text(r.status, style=colors[r.status]), verdict,
                      f"{r.seconds:.0f}" if r.seconds else "", r.detail)
    console.print(table)
    failed = [r for r in results if r.passed is False]
    if failed:
        raise GateFailed(f"{len(failed)} stage(s) failed: " + "; ".join(f"{r.stage} {r.name}: {r.detail}" for r in failed))


def main() -> None:
    """The ``edgekd`` command: SIGTERM and SIGHUP stop it as Ctrl-C does (everything cleans up);
    a usage error (an unknown flag, a bad value) is one line, exit 2."""
    import signal
    import sys

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:  # `nohup edgekd ...` keeps ignoring SIGHUP
            signal.signal(sig, _terminate)
    try:
        code = app(standalone_mode=False)
    except _CLICK_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `edgekd` alone: its help, as click prints it
            print(e.format_message())
            sys.exit(e.exit_code)
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        _error_line(e.format_message() + hint)
        sys.exit(e.exit_code)
    except Terminated as e:
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
