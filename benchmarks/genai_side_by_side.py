"""Decode speed of edgekd bundles against onnxruntime-genai, side by side in one run.

    python benchmarks/genai_side_by_side.py --edgekd runs/bench-s7b/smollm2-135m-instruct-cpu \\
        --genai runs/genai-int4-acc4,runs/genai-int4-acc0 --tokens 96 --rounds 7

Each ``--edgekd`` bundle is timed twice: in edgekd's own runtime (``edgekd.runtime.Runtime``) and
in onnxruntime-genai (every edgekd bundle carries a ``genai_config.json``). Each ``--genai`` folder
is a bundle written by onnxruntime-genai's model builder, timed in onnxruntime-genai. The builder
needs transformers 5 and so runs in a venv of its own (FACTS.md), e.g.:

    python -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install torch==2.13.0 "transformers>=5" onnxruntime-genai onnx
    /tmp/genai-venv/bin/python -m onnxruntime_genai.models.builder -i runs/teacher-hf -o runs/genai-int4-acc4 -p int4 -e cpu \\
        --extra_options int4_accuracy_level=4 int4_block_size=32

(``runs/teacher-hf``: the packaged teacher saved as a Hugging Face folder.) Same prompt (the chat
template around ``SPEED_PROMPT``), greedy, batch 1, engines interleaved round by round; decode
tokens/s excludes the prefill, which is reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".ort", ".data") or p.name.endswith(".onnx.data")) / 1e6


def time_edgekd(bundle: Path, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    from edgekd.runtime import Runtime

    rt = Runtime(bundle, verify=False)
    for _ in rt.generate_ids(prompt_ids, tokens + 1, stop_at_eos=False):
        pass
    return rt.last.decode_tokens_per_s, rt.last.prefill_s * 1e3


def time_genai(folder: Path, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + tokens + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt_ids)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(tokens):
        gen.generate_next_token()
    return tokens / (time.perf_counter() - t1), prefill * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edgekd", default="", help="comma-separated edgekd bundles")
    ap.add_argument("--genai", default="", help="comma-separated onnxruntime-genai builder folders")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from edgekd.runtime import Runtime
    from edgekd.validate.speed import SPEED_PROMPT

    edgekd_bundles = [Path(p) for p in args.edgekd.split(",") if p]
    genai_folders = [Path(p) for p in args.genai.split(",") if p]
    if not edgekd_bundles:
        sys.exit("give at least one --edgekd bundle (its tokenizer encodes the prompt for every engine)")
    prompt_ids = Runtime(edgekd_bundles[0], verify=False).encode_prompt(SPEED_PROMPT)
    engines = [(f"{b.name}", "edgekd runtime", b, time_edgekd) for b in edgekd_bundles]
    engines += [(f"{b.name}", "onnxruntime-genai", b, time_genai) for b in edgekd_bundles]
    engines += [(f"{f.name} (builder)", "onnxruntime-genai", f, time_genai) for f in genai_folders]
    results: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(engines))}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for i, (_, _, path, fn) in enumerate(engines):
            results[i].append(fn(path, prompt_ids, args.tokens))
    import onnxruntime
    import onnxruntime_genai

    print(f"\nDecode at batch 1, greedy, {args.tokens} tokens after a {len(prompt_ids)}-token chat prompt; median of "
          f"{args.rounds} rounds, engines interleaved; onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
          f"{onnxruntime_genai.__version__}.\n")
    print("| bundle | engine | model MB | decode tok/s | prefill ms |")
    print("|---|---|---|---|---|")
    for i, (name, engine, path, _) in enumerate(engines):
        tps = statistics.median(x for x, _ in results[i])
        pre = statistics.median(y for _, y in results[i])
        print(f"| {name} | {engine} | {model_mb(path):.0f} | {tps:.1f} | {pre:.0f} |")


if __name__ == "__main__":
    main()
