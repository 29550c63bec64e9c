"""The ``edgekd`` command: the road's commands (teachers, targets, tasks, inspect, distill, export,
run) here, the bundle's (generate, validate, check, bench) in ``cli_bundle.py``, the app and how a
command fails in ``cli_base.py``. Commands parse their options and call the library; nothing else
lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from edgekd import cli_bundle  # noqa: F401  (registers generate, validate, check, bench)
from edgekd.cli_base import (
    _CLICK_ERROR,
    Terminated,
    _error_line,
    _progress,
    _terminate,
    _version,
    app,
    command,
    console,
    err_console,
)
from edgekd.device.errors import UsageError

__all__ = ["app", "main"]


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
    from edgekd.device.paths import resource
    from edgekd.device.targets import SHIPPED
    from edgekd.export.profile import load_target

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
    from edgekd.device.io import iter_jsonl
    from edgekd.device.tasks import shipped_tasks

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


def with_distill_flags(fn: Callable) -> Callable:
    """Give ``fn`` (which takes ``**flags``) one option per DistillConfig setting: its flags, type
    and help come from the field (config.py), so a new setting is written there once."""
    from edgekd.distill.config import flag_fields, help_of

    def option(name: str, kind: type, flags: tuple[str, ...]) -> Parameter:
        info = typer.Option(*flags, help=help_of(name), show_default=False, metavar="" if kind is bool else None)
        return Parameter(name, Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], info])

    own = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in signature(fn, eval_str=True).parameters.values()
           if p.kind is not Parameter.VAR_KEYWORD]
    fn.__signature__ = Signature([*(option(*f) for f in flag_fields()), *own])  # type: ignore[attr-defined]
    return fn


@command("distill")
@with_distill_flags
def distill(
    config: Annotated[Optional[Path], typer.Option("--config", help="A TOML file of settings (the same names as the flags, with _); flags override it.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last complete checkpoint.", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier distill run in --out (its data/ and cache/ are reused when they match).", metavar="")] = False,
    **flags,
) -> None:
    """Distill a small student from a teacher: the teacher answers prompts (or you give data), the
    student learns its token distributions, and --out gets a Hugging Face folder + distill.json.

    With no flags but --out: SmolLM2-135M-Instruct teaches a copy of its 21 most influential layers
    on the shipped prompts (about 14 minutes on 2 CPU cores); --task NAME (see `edgekd tasks`)
    distills a student for one job. Runs unchanged under `accelerate launch`. Set only in a --config
    TOML: gen_top_p, gen_batch_size, weight_decay, warmup, min_lr_ratio,
    max_grad_norm, keep_checkpoints.
    """
    from edgekd.distill.config_io import resolve
    from edgekd.distill.trainer import distill as run_distill

    if flags.get("data") is not None:
        flags["data"] = tuple(flags["data"])
    out = flags.get("out")
    resume_from = Path(out) if resume and out else None
    cfg = resolve(config, flags, resume_from=resume_from)
    result = run_distill(cfg, resume=resume, overwrite=overwrite, console=err_console)
    after, timing, steps = result["metrics"]["after"], result["timing"], result.get("steps") or 0
    per_step = (f"; {steps} step{'s' if steps != 1 else ''}, {(timing.get('train_s') or 0) / steps:.1f} s a step"
                if steps else "")
    console.print(Text.assemble(
        ("done", "green"), f" in {timing['wall_s']:.0f} s{per_step}: {cfg.out} (held-out top-1 agreement "
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
    from edgekd.export.summary import summary

    lines, warnings = summary(manifest, out)
    for line in lines:
        console.print(line, highlight=False, markup=False)
    for line in warnings:
        err_console.print(f"warning: {line}", highlight=False, markup=False)


def _export_search(model: str, target: str, out: Path, overwrite: bool, trust_remote_code: bool) -> None:
    """`edgekd export --search`: the search, then its table (also when no candidate passes)."""
    from edgekd.device.report import verdict_text
    from edgekd.search import NoCandidatePasses, search_export, table_rows

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
    from edgekd.device.gates import GateFailed
    from edgekd.pipeline import run_pipeline

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
