"""Where the cpu bundle's answers drift from PyTorch's: export one model with several profiles and
print, side by side, the figures export measures on its golden reference (the model's greedy
answers on unseen prompts): top-1, KL on the top-20, greedy answers identical (first N tokens),
mean common prefix, size and decode speed.

    python benchmarks/answer_fidelity.py smollm2-135m-instruct \
        --prompts benchmarks/data/general-unseen.jsonl --num-prompts 50 \
        --profiles cpu,benchmarks/profiles/cpu-head-fp32-activations.toml,...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from edgekd.device.runtime import Runtime
    from edgekd.device.speed import time_runtime
    from edgekd.export import export_bundle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompts", type=Path, required=True, help="unseen prompts (jsonl of {\"prompt\"})")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--profiles", required=True, help="comma-separated shipped names or .toml paths")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)

    rows, golden = [], None
    with tempfile.TemporaryDirectory(prefix="answer-fidelity-") as work:
        for i, prof in enumerate(args.profiles.split(",")):
            t0 = time.time()
            out = Path(work) / f"b{i}"
            m = export_bundle(args.model, prof, out, golden_prompts=args.num_prompts, golden_data=args.prompts, golden=golden,
                              log=lambda msg: print(f"  {msg}", file=sys.stderr))
            golden = golden or json.loads((out / "golden.json").read_text(encoding="utf-8"))  # the same reference for every row
            g, c = m["export_check"]["golden"], m["export_check"]
            speed = time_runtime(Runtime(out, verify=False))
            rows.append({"profile": prof, "mb": c["model_bytes"] / 1e6, "of_fp32": c["size_ratio_vs_fp32"], **g,
                         "decode_tokens_per_s": speed["decode_tokens_per_s"], "seconds": round(time.time() - t0)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            for p in out.iterdir():  # keep the disk small: one bundle at a time
                p.unlink()

    n = golden["answer_tokens"] if golden else 0
    print(f"\n{rows[0]['prompts'] if rows else 0} prompts from {args.prompts}, greedy, first {n} tokens; {args.model}\n")
    print("| profile | MB (of fp32) | top-1 | KL top-20 | greedy identical (95% CI) | mean common prefix | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["greedy_exact_ci95"]
        print(f"| {r['profile']} | {r['mb']:.1f} ({r['of_fp32']:.0%}) | {r['top1']:.3f} | {r['kl_mean']:.4f} | "
              f"{r['greedy_exact']:.2f} ({lo:.2f}-{hi:.2f}) | {r['greedy_prefix_tokens']:.1f} | {r['decode_tokens_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
