"""Decode speed of edgekd bundles against onnxruntime-genai, side by side in one run.

    python benchmarks/genai_side_by_side.py --edgekd runs/bench-s7b/smollm2-135m-instruct-cpu \\
        --genai runs/genai-int4-acc4,runs/genai-int4-acc0 --tokens 96 --rounds 7 \\
        --golden runs/bundle-cpu-g50/golden.json

Each ``--edgekd`` bundle is timed twice: in edgekd's own runtime (``edgekd.device.runtime.Runtime``) and
in onnxruntime-genai (every edgekd bundle carries a ``genai_config.json``). Each ``--genai`` folder
is a bundle written by onnxruntime-genai's model builder, timed in onnxruntime-genai. The builder
needs transformers 5 and so runs in a venv of its own (its own requirement, incompatible with optimum-onnx's transformers<4.58), e.g.:

    python -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install torch==2.13.0 "transformers>=5" onnxruntime-genai onnx
    /tmp/genai-venv/bin/python -m onnxruntime_genai.models.builder -i runs/teacher-hf -o runs/genai-int4-acc4 -p int4 -e cpu \\
        --extra_options accuracy_level=4 int4_block_size=32

(onnxruntime-genai 0.18 reads ``accuracy_level``; an ``int4_accuracy_level`` option is ignored and
the CPU default, 4 (int8 activations), is used: check the MatMulNBits attributes of what it wrote.)

(``runs/teacher-hf``: the packaged teacher saved as a Hugging Face folder.) Same prompt (the chat
template around ``SPEED_PROMPT``), greedy, batch 1, engines interleaved round by round; decode
tokens/s excludes the prefill, which is reported apart.

``--golden BUNDLE/golden.json`` (e.g. a bundle exported with ``--golden-prompts 50 --golden-data
benchmarks/data/general-unseen.jsonl``) adds the fidelity of every row: each engine decodes the
golden prompts greedily (up to the golden's answer length) and its answers are compared with the
unquantized PyTorch model's, as export's golden replay compares them (``compare_greedy``): the
share of prompts answered identically and the mean common prefix. This puts a builder bundle, which
re-rounds the weights, beside edgekd's on the answers as well as on speed.
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
    from edgekd.device.runtime import Runtime

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


def greedy_edgekd(bundle: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from edgekd.device.fidelity import bundle_greedy
    from edgekd.device.runtime import Runtime

    return bundle_greedy(Runtime(bundle, verify=False), prompts, tokens)


def greedy_genai(folder: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy answers in onnxruntime-genai, each ending at its eos (included) or after ``tokens``."""
    import json

    import onnxruntime_genai as og

    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    model, out = og.Model(str(folder)), []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        answer: list[int] = []
        while len(answer) < tokens and not gen.is_done():
            gen.generate_next_token()
            answer.append(int(gen.get_next_tokens()[0]))
            if answer[-1] in eos:
                break
        out.append(answer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edgekd", default="", help="comma-separated edgekd bundles")
    ap.add_argument("--genai", default="", help="comma-separated onnxruntime-genai builder folders")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--edgekd-runtime-only", action="store_true", help="time the --edgekd bundles in edgekd's runtime only")
    ap.add_argument("--golden", type=Path, help="a bundle's golden.json: add each row's greedy answers against PyTorch's")
    args = ap.parse_args()

    from edgekd.device.runtime import Runtime
    from edgekd.device.speed import SPEED_PROMPT

    edgekd_bundles = [Path(p) for p in args.edgekd.split(",") if p]
    genai_folders = [Path(p) for p in args.genai.split(",") if p]
    if not edgekd_bundles:
        sys.exit("give at least one --edgekd bundle (its tokenizer encodes the prompt for every engine)")
    prompt_ids = Runtime(edgekd_bundles[0], verify=False).encode_prompt(SPEED_PROMPT)
    engines = [(f"{b.name}", "edgekd runtime", b, time_edgekd) for b in edgekd_bundles]
    if not args.edgekd_runtime_only:
        engines += [(f"{b.name}", "onnxruntime-genai", b, time_genai) for b in edgekd_bundles]
    engines += [(f"{f.name} (builder)", "onnxruntime-genai", f, time_genai) for f in genai_folders]
    results: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(engines))}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for i, (_, _, path, fn) in enumerate(engines):
            results[i].append(fn(path, prompt_ids, args.tokens))
    import onnxruntime

    versions = f"onnxruntime {onnxruntime.__version__}"
    if any(fn is time_genai for *_, fn in engines):
        import onnxruntime_genai

        versions += f", onnxruntime-genai {onnxruntime_genai.__version__}"
    print(f"\nDecode at batch 1, greedy, {args.tokens} tokens after a {len(prompt_ids)}-token chat prompt; median of "
          f"{args.rounds} rounds, engines interleaved; {versions}.\n")
    fidelity = {}
    if args.golden:
        import json

        from edgekd.device.fidelity import compare_greedy

        golden = json.loads(args.golden.read_text(encoding="utf-8"))
        prompts = [ex["prompt_ids"] for ex in golden["examples"]]
        want = [ex["answer_ids"] for ex in golden["examples"]]
        for i, (name, engine, path, fn) in enumerate(engines):
            print(f"greedy answers: {name} in {engine}", file=sys.stderr, flush=True)
            got = (greedy_edgekd if fn is time_edgekd else greedy_genai)(path, prompts, golden["answer_tokens"])
            fidelity[i] = compare_greedy(got, want, golden["answer_tokens"])
        print(f"Fidelity: greedy answers on the {len(prompts)} prompts of {args.golden} ({golden['prompts_from']}), "
              f"first {golden['answer_tokens']} tokens, against the unquantized PyTorch model's.\n")
    extra = " greedy identical (95% CI) | mean common prefix |" if fidelity else ""
    print("| bundle | engine | model MB | decode tok/s | prefill ms |" + extra)
    print("|---|---|---|---|---|" + ("---|---|" if fidelity else ""))
    for i, (name, engine, path, _) in enumerate(engines):
        tps = statistics.median(x for x, _ in results[i])
        pre = statistics.median(y for _, y in results[i])
        row = f"| {name} | {engine} | {model_mb(path):.0f} | {tps:.1f} | {pre:.0f} |"
        if i in fidelity:
            f = fidelity[i]
            lo, hi = f["greedy_exact_ci95"]
            row += f" {f['greedy_exact']:.2f} ({lo:.2f}-{hi:.2f}) | {f['greedy_prefix_tokens']:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
