"""transformers.js on an edgekd web bundle: its greedy answers against PyTorch's, beside edgekd's own.

    edgekd export smollm2-135m-instruct --target web --out runs/bench/teacher-web \\
        --golden-prompts 50 --golden-data benchmarks/data/general-unseen.jsonl
    make js-deps
    python benchmarks/transformersjs_fidelity.py runs/bench/teacher-web [--num-prompts 50] [--backends node,web]

The bundle's golden.json holds PyTorch's greedy answers (its ``answer_tokens`` each) on held-out
prompts. Each engine answers the same prompt token ids greedily: edgekd's runtime (onnxruntime in
Python), and transformers.js v4 loading the folder with ``from_pretrained`` (js/transformersjs_greedy.mjs)
on onnxruntime-node ("node") and on onnxruntime-web's WebAssembly build, single-threaded ("web"). The
figures: answers identical to PyTorch's (with a 95% interval), the mean common prefix, and answers
identical to edgekd's. Tokens/s are each engine's wall time over the tokens it wrote (generation
only, model loading excluded for edgekd, included for transformers.js): a rough figure, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.device.fidelity import bundle_greedy, compare_greedy
from edgekd.device.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


def cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1]
    return ids


def transformersjs_answers(bundle: Path, prompts: list[list[int]], n: int, backend: str, modules: Path) -> list[list[int]]:
    r = subprocess.run(["node", str(ROOT / "js" / "transformersjs_greedy.mjs"), str(bundle), json.dumps(prompts), str(n), backend],
                       env={**os.environ, "NODE_PATH": str(modules)}, capture_output=True, text=True, timeout=7200)
    if r.returncode != 0:
        raise SystemExit(f"transformers.js ({backend}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--num-prompts", type=int, default=0, help="the first N golden prompts (0: all)")
    ap.add_argument("--backends", default="node,web", help="transformers.js backends: node, web (WebAssembly)")
    ap.add_argument("--web-prompts", type=int, default=8, help="WebAssembly is slow here: answer only the first N with it")
    ap.add_argument("--js-modules", type=Path, default=ROOT / ".cache" / "js" / "node_modules")
    args = ap.parse_args()

    rt = Runtime(args.bundle)
    golden = json.loads((args.bundle / "golden.json").read_text())
    examples = golden["examples"][: args.num_prompts or None]
    n = int(golden["answer_tokens"])
    eos = set(rt.eos_token_ids)
    prompts = [ex["prompt_ids"] for ex in examples]
    reference = [ex["answer_ids"] for ex in examples]

    rows = []
    t = time.perf_counter()
    ours = bundle_greedy(rt, prompts, n)
    rows.append(("edgekd runtime (onnxruntime, Python)", ours, time.perf_counter() - t))
    for backend in [b for b in args.backends.split(",") if b]:
        k = len(prompts) if backend == "node" else min(len(prompts), args.web_prompts)
        t = time.perf_counter()
        theirs = [cut_at_eos(a, eos) for a in transformersjs_answers(args.bundle, prompts[:k], n, backend, args.js_modules)]
        rows.append((f"transformers.js 4.3.2 ({'onnxruntime-node' if backend == 'node' else 'onnxruntime-web WebAssembly'})",
                     theirs, time.perf_counter() - t))

    print(f"bundle {args.bundle} ({rt.manifest.model_file}, {rt.manifest.model_bytes / 1e6:.1f} MB); "
          f"{len(prompts)} golden prompts from {golden.get('prompts_from')}, {n} answer tokens; reference: PyTorch's greedy answers\n")
    print("| engine | prompts | greedy identical to PyTorch (95% CI) | common prefix, tokens | identical to edgekd's | tok/s |")
    print("|---|---|---|---|---|---|")
    for name, answers, seconds in rows:
        k = len(answers)
        vs_ref = compare_greedy(answers, reference[:k], n)
        vs_ours = compare_greedy(answers, ours[:k], n)
        lo, hi = vs_ref["greedy_exact_ci95"]
        tokens = sum(len(a) for a in answers)
        print(f"| {name} | {k} | {vs_ref['greedy_exact']:.2f} ({lo:.2f}-{hi:.2f}) | {vs_ref['greedy_prefix_tokens']:.1f} of {n} | "
              f"{vs_ours['greedy_exact']:.2f} | {tokens / seconds:.1f} |")


if __name__ == "__main__":
    main()
