"""What int8 activations on some layers would buy: a bundle and copies of it with the MatMulNBits
nodes whose names contain given substrings set to int8 activations (accuracy_level 4), decode
timed side by side and each replayed against the bundle's own golden answers.

    python benchmarks/activation_tradeoff.py runs/bench/teacher-cpu-rescore \
        --nodes o_proj --nodes down_proj --nodes gate_proj,up_proj --nodes qkv_proj --nodes proj

Each ``--nodes`` is one copy (comma-separated substrings; "proj" is every layer). The head is never
changed. The copies live in a temporary folder. Each is replayed against the bundle's golden.json:
the PyTorch model's greedy answers and top-k, recorded at export (`edgekd check`'s reference), so
the figures are against PyTorch.
With ``--decode-only`` the bundles listed are timed as they are (e.g. two exports of one model).
Decode: batch 1, 64 tokens after validate's speed prompt, 2 threads, the median of ``--rounds``
interleaved rounds (docs/runtime.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def with_int8_activations(bundle: Path, dst: Path, patterns: list[str]) -> int:
    """A copy of ``bundle`` at ``dst`` whose layer MatMulNBits matching ``patterns`` run at int8
    activations; returns how many nodes changed."""
    import onnx

    shutil.copytree(bundle, dst)
    model = onnx.load(str(dst / "model.onnx"))
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and "lm_head" not in node.name and any(p in node.name for p in patterns):
            for a in node.attribute:
                if a.name == "accuracy_level" and a.i != 4:
                    a.i, changed = 4, changed + 1
    onnx.save(model, str(dst / "model.onnx"))
    return changed


def decode_speeds(bundles: list[Path], rounds: int, threads: int) -> list[float]:
    """Each bundle's decode tokens/s (``validate.speed.time_runtime``, as validate times it), the
    median of ``rounds`` rounds in which every bundle runs once."""
    from edgekd.device.runtime import Runtime
    from edgekd.device.speed import time_runtime

    runtimes = [Runtime(b, verify=False, threads=threads) for b in bundles]
    speeds: list[list[float]] = [[] for _ in runtimes]
    for _ in range(rounds):
        for i, rt in enumerate(runtimes):
            speeds[i].append(time_runtime(rt, prefill_tokens=8, decode_tokens=64, repeats=1)["decode_tokens_per_s"])
    return [statistics.median(s) for s in speeds]


def main(argv: list[str]) -> int:
    from edgekd.device.check import replay_golden
    from edgekd.device.runtime import Runtime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, nargs="+", help="the bundle (with --decode-only: every bundle to time)")
    ap.add_argument("--nodes", action="append", default=[], help="comma-separated node-name substrings: one copy each")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-only", action="store_true", help="time the bundles given, nothing else")
    args = ap.parse_args(argv)
    if args.decode_only:
        for b, speed in zip(args.bundle, decode_speeds(args.bundle, args.rounds, args.threads)):
            print(f"{b}: decode {speed:.1f} tok/s (median of {args.rounds} interleaved rounds)")
        return 0
    bundle = args.bundle[0]
    golden = json.loads((bundle / "golden.json").read_text())
    with tempfile.TemporaryDirectory() as work:
        rows = [("none (the bundle)", bundle, 0)]
        for i, spec in enumerate(args.nodes):
            dst = Path(work) / f"variant{i}"
            rows.append((spec, dst, with_int8_activations(bundle, dst, spec.split(","))))
        speeds = decode_speeds([b for _, b, _ in rows], args.rounds, args.threads)
        print(f"\n{bundle}: {len(golden['examples'])} golden prompts, {golden['answer_tokens']} answer tokens; "
              f"decode median of {args.rounds} interleaved rounds, {args.threads} threads\n")
        print("| int8 activations on | nodes changed | decode tok/s | greedy identical | top-1 / mean KL |")
        print("|---|---|---|---|---|")
        for (spec, b, changed), speed in zip(rows, speeds):
            figures, _, _ = replay_golden(Runtime(b, verify=False, threads=args.threads), golden["examples"], golden["answer_tokens"])
            print(f"| {spec} | {changed} | {speed:.1f} | {figures['greedy_exact']:.2f} | "
                  f"{figures['top1']:.3f} / {figures['kl_mean']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
