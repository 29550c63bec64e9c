"""Distillation quality and speed on the real teacher: same data, same steps, one row per recipe.

    python benchmarks/distill_quality.py [--prompts 96] [--new-tokens 64] [--epochs 3] [--out /tmp/edgekd-bench]

The teacher (SmolLM2-135M-Instruct) answers the shipped prompts once; every row then trains a
fresh 6-layer student (teacher layers 0,6,12,18,24,29) on exactly those answers and is evaluated on
the same held-out teacher answers. Rows: no training, SFT (cross-entropy on the teacher's text),
forward KL, reverse KL, JSD (beta 0.5), skew KL, forward KL with the teacher-logit cache, and
that with quantization-aware training (edgekd's defaults).
Prints a Markdown table (top-1 agreement with the teacher, KL(teacher||student), perplexity ratio
student/teacher, training tokens/s, time of the first and of later epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from edgekd.distill.config import DistillConfig
from edgekd.distill.trainer import distill
from edgekd.models import load_model

ROWS = [  # name, settings that differ from the forward-KL baseline
    ("SFT (cross-entropy on teacher text)", {"alpha": 0.0, "cache_teacher": False}),
    ("forward KL (Hinton)", {"loss": "fkl", "cache_teacher": False}),
    ("reverse KL (MiniLLM)", {"loss": "rkl", "cache_teacher": False}),
    ("JSD beta=0.5 (GKD)", {"loss": "jsd", "cache_teacher": False}),
    ("skew KL a=0.1 (DistiLLM)", {"loss": "skl", "cache_teacher": False}),
    ("forward KL + teacher cache (top-64)", {"loss": "fkl", "cache_teacher": True}),
    ("forward KL + cache + QAT 4-bit, int8 head (the defaults)", {"loss": "fkl", "cache_teacher": True, "qat_bits": 4, "qat_head_bits": 8}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--student", default="layers:6")
    ap.add_argument("--out", default="/tmp/edgekd-bench-distill")
    ap.add_argument("--only", default="", help="comma-separated row numbers (1-based) to run")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    teacher = load_model("smollm2-135m-instruct")
    load_s = time.time() - t0

    base = DistillConfig(student=args.student, max_prompts=args.prompts, max_heldout=args.heldout,
                         max_new_tokens=args.new_tokens, epochs=args.epochs, checkpoint_every=0,
                         qat_bits=0)  # rows compare losses in full precision; the last row adds QAT
    # The teacher writes the answers once (this run is also the "forward KL + cache" row's twin).
    first = distill(dataclasses.replace(base, out=str(root / "answers"), max_steps=1), preloaded=teacher)
    train = root / "answers" / "data" / "train.jsonl"
    held = root / "answers" / "data" / "heldout.jsonl"
    results = [("no training (pruned teacher layers)", first["metrics"]["before"], None)]
    only = {int(x) for x in args.only.split(",") if x}
    for n, (name, change) in enumerate(ROWS, 1):
        if only and n not in only:
            continue
        cfg = dataclasses.replace(base, out=str(root / f"row{n}"), data=(str(train),), heldout=str(held), **change)
        r = distill(cfg, preloaded=teacher)
        results.append((name, r["metrics"]["after"], r))
        print(f"{name}: {json.dumps(r['metrics']['after'])} {json.dumps(r['timing'])}", flush=True)

    print()
    print(f"Teacher SmolLM2-135M-Instruct (fp32, loaded in {load_s:.0f} s); student {args.student} "
          f"({first['student']['parameters'] / 1e6:.1f}M params); {first['data']['train']['examples']} teacher answers "
          f"(<= {args.new_tokens} new tokens, {first['data']['train']['tokens']} tokens), {args.epochs} epochs, "
          f"{results[-1][2]['steps'] if results[-1][2] else '?'} steps of batch {base.batch_size}, lr {base.lr}; "
          f"held-out: {first['metrics']['before']['positions']} answer positions of {args.heldout} prompts. "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads.")
    print()
    print("| recipe | held-out top-1 | KL(teacher‖student) | ppl ratio | train tok/s | epoch 1 s | later epochs s | teacher pass s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, r in results:
        if r is None:
            print(f"| {name} | {m['top1_agreement']:.3f} | {m['kl']:.3f} | {m['ppl_ratio']:.2f} | – | – | – | – |")
            continue
        ep = r["timing"]["epoch_s"]
        later = sum(ep[1:]) / max(len(ep) - 1, 1) if len(ep) > 1 else float("nan")
        print(f"| {name} | {m['top1_agreement']:.3f} | {m['kl']:.3f} | {m['ppl_ratio']:.2f} | "
              f"{r['timing']['train_tokens_per_s']:.0f} | {ep[0]:.0f} | {later:.0f} | {r['timing'].get('teacher_cache_s', 0):.0f} |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
