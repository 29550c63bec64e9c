"""The commands that take a bundle: ``generate``, ``validate``, ``check``, ``bench`` (registered on
the app in ``cli_base.py``; ``cli.py`` imports this module)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from edgekd.cli_base import Prepared, SessionConfig, Threads, _progress, command, console, err_console
from edgekd.device.errors import UsageError


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
    session_config: SessionConfig = None,
    prepared: Prepared = None,
) -> None:
    """Answer a prompt with a bundle (onnxruntime, KV cache), streaming the text, then print tokens/s."""
    from edgekd.device.runtime import Runtime
    from edgekd.device.sampling import Sampling
    from edgekd.device.session import parse_session_config

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    rt = Runtime(bundle, threads=threads, session_config=parse_session_config(session_config or []), prepared=prepared)
    for note in rt.warnings:
        err_console.print(Text.assemble(("warning:", "yellow"), f" {note}"), soft_wrap=True)
    if rt.answer_prefix and not raw:  # the task's answers open with given words: the model continues them
        console.out(rt.answer_prefix, end="", highlight=False)
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

    from edgekd.device.gates import GateFailed
    from edgekd.device.report import rich_tables
    from edgekd.validate import ValidateConfig, failed_gates
    from edgekd.validate import validate as run_validate

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
    for table in rich_tables([r.to_json() for r in reports]):
        console.print(table)
    console.print(f"report: {out_dir}/report.md, report.json, plots")
    from edgekd.device.gates import verdict_lines

    lines = [line for r in reports for line in verdict_lines(r)]
    for line in lines:
        console.print(line, highlight=False, markup=False)
    failed = failed_gates(reports)
    if failed:
        raise GateFailed(f"{len(failed)} gate(s) failed: " + "; ".join(failed))
    n_gates = sum(len(r.gates) for r in reports)
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
    session_config: SessionConfig = None,
    prepared: Prepared = None,
) -> None:
    """Check a bundle on the machine that ships it, without torch or the teacher: replay the golden
    reference export wrote into it (the unquantized model's answers and top-k log-probs) and apply
    the target's gates. Exit 0 when every gate passes, 1 when one fails, 2 for bad input."""
    from edgekd.device.check import CheckConfig, check_bundle
    from edgekd.device.gates import GateFailed
    from edgekd.device.io import write_json
    from edgekd.device.outputs import check_writable

    if json_out is not None:  # before the check runs, not after it
        if json_out.is_dir():
            raise UsageError(f"--json {json_out} is a folder: give a file name, e.g. {json_out / 'check.json'}")
        check_writable(json_out.parent)
    from edgekd.device.session import parse_session_config

    config = CheckConfig(num_prompts=num_prompts, speed=speed, threads=threads, target=target,
                         session_config=tuple(parse_session_config(session_config or []).items()), prepared=prepared)
    with console.status("checking ...") as status:
        report = check_bundle(bundle, config, log=_progress(status))
    if json_out is not None:
        write_json(json_out, report.to_json())
    env, fid, cost, golden = report.environment, report.fidelity["reference"], report.cost, report.details["golden"]
    table = Table(title=f"{bundle} on {env['cpu']} ({env['machine']}, onnxruntime {env['onnxruntime']}, {', '.join(env['providers'])})")
    for col in ("vs the reference", "value"):
        table.add_column(col)
    rows = [("golden prompts / answer positions", f"{golden['prompts']} / {fid['positions']}"),
            ("top-1 agreement", f"{fid['top1']:.3f}"), ("KL on the top-k (lower bound), nats", f"{fid['kl_mean']:.4f}"),
            ("perplexity ratio", f"{fid['ppl_ratio']:.3f}"), ("greedy answers identical", f"{fid['greedy_exact']:.2f}"),
            ("greedy common prefix, tokens", f"{fid['greedy_prefix_tokens']:.1f} of {golden['answer_tokens']}"),
            ("model size", f"{cost['size_mb']:.1f} MB")]
    if report.task:
        rows.append(("label agreement", f"{report.task['label_agreement_vs_reference']:.3f}"))
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
    if "memory" in cost:
        from edgekd.device.speed import memory_line

        console.print(memory_line(cost["memory"]), highlight=False, markup=False)
    for g in report.gates:
        console.print(("PASS " if g.passed else "FAIL ") + g.line(), highlight=False, markup=False)
    if report.not_checked:
        console.print(f"not checked on the device (edgekd validate measures them): {', '.join(report.not_checked)}", highlight=False)
    failed = [g.line() for g in report.failed] + report.problems
    if failed:
        raise GateFailed(f"{len(failed)} check(s) failed: " + "; ".join(failed))
    console.print(Text.assemble(("all gates pass", "green"), f" ({len(report.gates)}, from {report.gates_from})") if report.gates
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
