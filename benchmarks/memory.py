"""A bundle's resident memory by stage and by lever, beside llama.cpp on the same GGUF.

    python benchmarks/memory.py --bundle cpu=runs/mem/teacher-cpu --bundle mobile=runs/mem/teacher-mobile \\
        [--bundle "cpu, all logits=runs/mem/teacher-cpu-all"] [--gguf smollm2-135m-instruct] --threads 2

The first bundle runs once as an app would run it, then once per lever (an onnxruntime session
setting, ``--session-config`` of ``edgekd check``, or ``--prepared``), each lever alone; each further
bundle is a lever of its own (exported without a step, say) and runs as shipped. A row is ``edgekd check`` on the bundle
with that setting: the peak resident memory by stage (``edgekd.device.speed.memory_by_stage``: a
fresh process, a prompt of 480 tokens and 16 new ones; the stages' peaks are taken apart with
``/proc/self/clear_refs``), the greedy answers against the bundle's golden reference (the PyTorch
model's own answers), and decode tokens/s. The levers a bundle cannot use (the .ort file's bytes
for a .onnx bundle) are skipped. The rows of one bundle run one after another in one invocation:
the machine is noisy, so compare decode speeds within a table only.

``--gguf``: llama.cpp (``benchmarks/llamacpp/build.sh``) answers the same 480 token ids with 16 new
tokens; its peak resident memory is its process's (``VmHWM``), with the bare process it starts
from (the same program on an empty prompt list) beside it.

The KV cache's one buffer (``past_present_share_buffer`` in the manifest) is measured alone by a copy
of the bundle whose manifest says false (the runtime then swaps two buffers, as before).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.device.check import CheckConfig, check_bundle
from edgekd.device.speed import MEMORY_NEW_TOKENS, MEMORY_PROMPT_TOKENS, mapped_mb, synthetic_ids

LEVERS = {
    "as shipped": {},
    "arena off": {"enable_cpu_mem_arena": "0"},
    "no memory pattern": {"enable_mem_pattern": "0"},
    "the .ort bytes used in place": {"session.use_ort_model_bytes_directly": "1", "session.use_ort_model_bytes_for_initializers": "1"},
    "prepared for this machine (--prepared)": {"prepared": "1"},  # edgekd.device.prepared: packed weights mapped from disk
}
# asked for by name only: a 4-bit weight unpacked is dequantized to fp32 at every run (the 16 golden
# prompts take minutes a row)
SLOW_LEVERS = {"no prepacking": {"session.disable_prepacking": "1"}}


def bundle_rows(name: str, bundle: Path, levers: list[str], threads: int | None, prompts: int) -> list[dict]:
    rows = []
    for lever in levers:
        config = {**LEVERS, **SLOW_LEVERS}[lever]
        onnx = not (bundle / "model.ort").is_file()
        if ("session.use_ort_model_bytes_directly" in config and onnx) or ("prepared" in config and not onnx):
            continue
        prepared = None
        if "prepared" in config:
            config, prepared = {}, Path(tempfile.mkdtemp(prefix="edgekd-prepared-"))
        report = check_bundle(bundle, CheckConfig(num_prompts=prompts, threads=threads, session_config=tuple(config.items()),
                                                  prepared=prepared))
        if prepared is not None:
            shutil.rmtree(prepared, ignore_errors=True)
        mem, fid = report.cost["memory"], report.fidelity["reference"]
        rows.append({"bundle": name, "lever": lever, "model_mb": mem["model_mb"], "interpreter_mb": mem["interpreter_mb"],
                     **{f"{stage}_mb": v["peak_mb"] - mem["interpreter_mb"] for stage, v in mem["stages"].items()},
                     "bundle_peak_mb": mem["bundle_peak_mb"], "mapped_mb": mapped_mb(mem), "peak_rss_mb": mem["peak_rss_mb"],
                     "ratio": mem["peak_over_model"], "kv_buffers": mem["kv_buffers"],
                     "greedy_exact": fid["greedy_exact"], "top1": fid["top1"], "decode_tokens_per_s": report.cost["decode_tokens_per_s"],
                     "prompt_tokens": mem["prompt_tokens"]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def llamacpp_row(gguf_spec: str, bundle: Path, threads: int) -> dict:
    """llama.cpp's peak on the same prompt ids the bundles answered (the first bundle's tokenizer)."""
    from llamacpp_side_by_side import gguf_path, llama_greedy, llamacpp_bin

    from edgekd.device.runtime import Runtime

    binary, gguf = llamacpp_bin(), gguf_path(gguf_spec)
    ids = synthetic_ids(Runtime(bundle, verify=False), MEMORY_PROMPT_TOKENS)
    _, _, peak = llama_greedy(binary, gguf, threads, [ids], MEMORY_NEW_TOKENS)
    bare = subprocess.run([str(binary / "greedy_ids"), str(gguf), "1", str(threads)], input="", capture_output=True, text=True)
    loaded = next(int(x.split()[1]) * 1024 for x in bare.stderr.splitlines() if x.startswith("VmHWM:"))
    return {"bundle": f"llama.cpp, {gguf.name}", "lever": "n_ctx 2048, f16 KV cache (session: loaded, the whole process)", "model_mb": gguf.stat().st_size / 1e6,
            "session_mb": loaded / 1e6, "peak_rss_mb": peak / 1e6, "prompt_tokens": len(ids)}


def decode_speeds(bundles: list[tuple[str, Path]], rounds: int, threads: int) -> str:
    """Decode tokens/s of each bundle as shipped, the bundles alternating round by round in fresh
    processes (``measure_speed``, as validate times them): the medians, one table."""
    import statistics

    from edgekd.device.speed import measure_speed

    runs: dict[str, list[float]] = {name: [] for name, _ in bundles}
    prefill: dict[str, list[float]] = {name: [] for name, _ in bundles}
    for _ in range(rounds):
        for name, path in bundles:
            speed = measure_speed(path, threads=threads)
            runs[name].append(speed["decode_tokens_per_s"])
            prefill[name].append(speed["prefill_ms"])
    out = [f"decode tokens/s and prefill ms (128 tokens), median of {rounds} interleaved rounds", "",
           "| bundle | decode tok/s | prefill ms |", "|---|---|---|"]
    out += [f"| {name} | {statistics.median(runs[name]):.1f} | {statistics.median(prefill[name]):.0f} |" for name, _ in bundles]
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    head = ["bundle", "lever", "model MB", "tokenizer", "session", "prefill", "decode", "peak above the interpreter", "of it mapped files",
            "x model file", "process peak", "greedy identical", "top-1", "decode tok/s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(r, k, fmt):
        return fmt.format(r[k]) if r.get(k) is not None else "-"

    for r in rows:
        out.append("| " + " | ".join([r["bundle"], r["lever"], f(r, "model_mb", "{:.1f}"), f(r, "tokenizer_mb", "{:.0f}"),
                                      f(r, "session_mb", "{:.0f}"),
                                      f(r, "prefill_mb", "{:.0f}"), f(r, "decode_mb", "{:.0f}"), f(r, "bundle_peak_mb", "**{:.0f}**"),
                                      f(r, "mapped_mb", "{:.0f}"),
                                      f(r, "ratio", "{:.2f}"), f(r, "peak_rss_mb", "{:.0f}"), f(r, "greedy_exact", "{:.2f}"),
                                      f(r, "top1", "{:.3f}"), f(r, "decode_tokens_per_s", "{:.1f}")]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="NAME=PATH of a bundle (repeatable)")
    ap.add_argument("--lever", action="append", choices=sorted([*LEVERS, *SLOW_LEVERS]),
                    help=f"levers to measure (default: all but {', '.join(SLOW_LEVERS)})")
    ap.add_argument("--gguf", help="the GGUF the bundles came from (a file or a known teacher): llama.cpp's row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16, help="golden prompts whose greedy answers are compared")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    ap.add_argument("--speed-rounds", type=int, default=0, help="then time each bundle's decode, interleaved, this many rounds")
    args = ap.parse_args()
    levers = args.lever or list(LEVERS)
    rows = []
    for k, item in enumerate(args.bundle):  # the first bundle with every lever; the others (a lever each) as shipped
        name, _, path = item.rpartition("=")
        rows += bundle_rows(name or path, Path(path), levers if k == 0 else ["as shipped"], args.threads, args.prompts)
    if args.gguf:
        rows.append(llamacpp_row(args.gguf, Path(args.bundle[0].rpartition("=")[2]), args.threads))
    print(f"peak resident memory, MB (1e6 bytes), by stage: above the bare interpreter (Python with onnxruntime, "
          f"tokenizers, numpy and edgekd's runtime), a {MEMORY_PROMPT_TOKENS}-token prompt and {MEMORY_NEW_TOKENS} new tokens, "
          f"{args.threads} threads")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if args.speed_rounds:
        named = [(name or path, Path(path)) for name, _, path in (b.rpartition("=") for b in args.bundle)]
        print()
        print(decode_speeds(named, args.speed_rounds, args.threads))


if __name__ == "__main__":
    main()
