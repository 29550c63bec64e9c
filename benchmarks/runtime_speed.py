"""Decode and prefill speed of edgekd bundles: the edgekd runtime against `ORTModelForCausalLM.generate`
and PyTorch eager `generate`, side by side in one process, plus the memory-bandwidth ceiling.

    python benchmarks/runtime_speed.py                       # SmolLM2 teacher + 6-layer student, cpu and mobile
    python benchmarks/runtime_speed.py --student runs/demo/student --targets cpu

Prints a Markdown table. Batch 1, greedy, eos ignored; every engine decodes the same prompt.
Each number is the median of ``--rounds`` rounds; every engine of every model (teacher and student)
runs once in each round, so that the load from other processes falls on all of them alike and a
ratio between two rows is one run's.

The ceiling: decode at batch 1 reads every weight once per token, so tokens/s <= bandwidth /
bytes read per token. Bytes read per token = the bundle's initializers except those read only
through an embedding lookup (one row per token), plus the KV cache at the mean context length.
Bandwidth is measured here: every core takes the max of its share of a 1 GiB array (numpy, GIL released).

The 6-layer student by default is teacher layers [0, 6, 12, 18, 24, 29], pruned and not trained:
speed does not depend on the weights' values (a distilled student of the same shape runs alike).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.device.runtime import Runtime
from edgekd.device.speed import SPEED_PROMPT, synthetic_ids, time_runtime

STUDENT_LAYERS = "layers:0,6,12,18,24,29"


def measure_bandwidth(threads: int | None = None) -> float:
    """Read bandwidth in bytes/s, as validate measures it (``edgekd.device.speed.read_bandwidth``), on 1 GiB."""
    from edgekd.device.speed import read_bandwidth

    return read_bandwidth(threads, mib=1024)


def bytes_read_per_token(bundle: Path) -> tuple[int, str]:
    """Weight bytes a decode step reads (``edgekd.device.bundle.bundle_decode_weight_bytes``) and how they were counted."""
    from edgekd.device.bundle import bundle_decode_weight_bytes

    rt = Runtime(bundle, verify=False)
    how = "file size (.ort)" if rt.model_path.suffix != ".onnx" else "initializers not read only by Gather"
    return bundle_decode_weight_bytes(bundle, rt.manifest), how


def kv_bytes(rt: Runtime, context: int) -> int:
    return 2 * rt.num_layers * rt.num_kv_heads * rt.head_dim * context * np.dtype(rt.kv_dtype).itemsize


def torch_times(model, ids: list[int], prefill_ids: list[int], tokens: int) -> dict[str, float]:
    """PyTorch eager ``generate``: decode tokens/s (prefill subtracted) and prefill ms."""
    import torch

    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    x = torch.tensor([ids])
    kwargs["attention_mask"] = torch.ones_like(x)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(x, max_new_tokens=1, **kwargs)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=tokens + 1, **kwargs)
        total = time.perf_counter() - t
        t = time.perf_counter()
        pre = torch.tensor([prefill_ids])
        model(input_ids=pre, attention_mask=torch.ones_like(pre))
        prefill = time.perf_counter() - t
    return {"decode": (out.shape[1] - x.shape[1] - 1) / (total - first), "prefill_ms": 1000 * prefill}


def ort_generate_times(ort_model, ids: list[int], prefill_ids: list[int], tokens: int) -> dict[str, float]:
    """``ORTModelForCausalLM.generate`` (optimum-onnx), timed as PyTorch is."""
    return torch_times(ort_model, ids, prefill_ids, tokens)


def load_ort_model(bundle: Path):
    from optimum.onnxruntime import ORTModelForCausalLM

    return ORTModelForCausalLM.from_pretrained(str(bundle), file_name="model.onnx", use_cache=True, local_files_only=True)


def prepare_models(args) -> list[tuple[str, str]]:
    """``(label, model spec)`` for the teacher and the student (pruned and saved when asked)."""
    models = [("teacher", args.teacher)]
    if args.student and args.student != "none":
        spec = args.student
        if spec.startswith("layers:"):
            folder = args.work / "student-pruned"
            if not (folder / "config.json").is_file():
                from edgekd.distill.students import depth_pruned, parse_layers
                from edgekd.models import load_model

                teacher, tok = load_model(args.teacher)
                layers = parse_layers(spec, teacher.config.num_hidden_layers)
                student = depth_pruned(teacher, layers)
                student.save_pretrained(folder, safe_serialization=True)
                tok.save_pretrained(folder)
                del teacher, student
            spec = str(folder)
            label = f"student ({len(spec_layers(args.student))} layers, pruned)"
        else:
            label = f"student ({Path(spec).name})"
        models.append((label, spec))
    return models


def spec_layers(spec: str) -> list[str]:
    return spec.split(":", 1)[1].split(",")


def relaxed_profile(target: str, folder: Path) -> str:
    """A copy of the profile whose export drift check cannot refuse (speed only)."""
    from edgekd.device.paths import resource

    src = Path(target) if Path(target).is_file() else resource(f"targets/{target}.toml")
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if not line.strip().startswith("max_abs_logit_diff")]
    heads = [i for i, line in enumerate(lines) if line.strip().startswith("[check]")]
    if not heads:
        lines.append("[check]")
        heads = [len(lines) - 1]
    lines.insert(heads[0] + 1, "max_abs_logit_diff = 1e9")
    path = folder / f"{src.stem}-relaxed.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def ensure_bundle(spec: str, target: str, out: Path, relax_check: bool) -> Path | None:
    """Export once (reused on later runs); None, with the reason printed, when export refuses."""
    from edgekd.device.errors import EdgekdError
    from edgekd.export import export_bundle

    if not (out / "manifest.json").is_file():
        print(f"exporting {spec} for {target} -> {out}", file=sys.stderr, flush=True)
        if relax_check:
            target = relaxed_profile(target, out.parent)
        try:
            export_bundle(spec, target, out, overwrite=out.exists())
        except EdgekdError as e:
            print(f"export of {spec} for {target} refused: {e}", file=sys.stderr, flush=True)
            return None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--student", default=STUDENT_LAYERS, help="a student folder, layers:i,j,... of the teacher (pruned), or none")
    p.add_argument("--targets", default="cpu,mobile", help="comma-separated shipped targets or profile files")
    p.add_argument("--work", type=Path, default=Path("runs/bench-runtime"), help="bundles are exported here once and reused")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens for the prefill timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--relax-export-check", action="store_true",
                   help="export with the profile's drift check off (speed only: fidelity is validate's job)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import torch

    from edgekd.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth(threads=args.threads)
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    models = []  # (label, PyTorch model, [(target, bundle, Runtime, ORTModel or None)])
    for label, spec in prepare_models(args):
        bundles = [(t, ensure_bundle(spec, t, args.work / f"{Path(spec).name}-{Path(t).stem}", args.relax_export_check))
                   for t in args.targets.split(",")]
        bundles = [(t, b) for t, b in bundles if b is not None]
        if not bundles:
            continue
        model, _ = load_model(spec)
        engines = []
        for target, bundle in bundles:
            rt = Runtime(bundle, threads=args.threads)
            try:
                ort_model = load_ort_model(bundle) if rt.model_path.suffix == ".onnx" else None
            except Exception as e:  # optimum cannot load every graph edgekd ships
                print(f"ORTModelForCausalLM could not load {bundle}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                ort_model = None
            engines.append((target, bundle, rt, ort_model))
        rt0 = engines[0][2]  # each model's prompt through its own bundle's tokenizer
        models.append((label, model, engines, rt0.encode_prompt(SPEED_PROMPT), synthetic_ids(rt0, args.prefill)))
    if not models:
        sys.exit("no bundle to time: every export was refused")
    # Every engine of every model runs once per round (teacher and student alike), so a ratio
    # between any two rows is measured under the same load.
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for label, model, engines, ids, prefill_ids in models:
            t = torch_times(model, ids, prefill_ids, args.tokens)
            results.setdefault((label, "torch"), {}).setdefault("decode", []).append(t["decode"])
            results[(label, "torch")].setdefault("prefill_ms", []).append(t["prefill_ms"])
            for target, bundle, rt, ort_model in engines:
                ours = time_runtime(rt, prefill_tokens=args.prefill, decode_tokens=args.tokens, repeats=1)
                res = results.setdefault((label, target), {})
                res.setdefault("decode", []).append(ours["decode_tokens_per_s"])
                res.setdefault("prefill_ms", []).append(ours["prefill_ms"])
                if ort_model is not None:
                    o = ort_generate_times(ort_model, ids, prefill_ids, args.tokens)
                    res.setdefault("ort_decode", []).append(o["decode"])
                    res.setdefault("ort_prefill_ms", []).append(o["prefill_ms"])
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    rows = []
    for label, _, engines, ids, _ in models:
        torch_med = med[(label, "torch")]
        for target, bundle, rt, ort_model in engines:
            weights, how = bytes_read_per_token(bundle)
            per_token = weights + kv_bytes(rt, len(ids) + args.tokens // 2)
            ceiling = bandwidth / per_token
            m = med[(label, target)]
            size = sum(f.stat().st_size for f in bundle.glob(rt.model_path.name + "*"))
            rows.append({
                "model": label, "target": Path(target).stem, "size_mb": size / 1e6,
                "edgekd": m["decode"], "ort": m.get("ort_decode"), "torch": torch_med["decode"],
                "pre_edgekd": m["prefill_ms"], "pre_ort": m.get("ort_prefill_ms"), "pre_torch": torch_med["prefill_ms"],
                "mb_per_token": per_token / 1e6, "ceiling": ceiling, "how": how,
            })
            print(f"{label} {target}: {rows[-1]}", file=sys.stderr, flush=True)

    def f(x, fmt="{:.1f}"):
        return "n/a" if x is None else fmt.format(x)

    print()
    print(f"Decode at batch 1 (greedy, {args.tokens} tokens after a {len(models[0][3])}-token chat prompt) and prefill of "
          f"{args.prefill} tokens; {os.cpu_count()} cores, threads {args.threads or 'default'}, median of {args.rounds} "
          f"rounds; measured read bandwidth {bandwidth / 1e9:.1f} GB/s.")
    print()
    print("| model | target | model MB | edgekd tok/s | ORT generate tok/s | PyTorch tok/s | edgekd / PyTorch | edgekd / ORT "
          "| MB read / token | ceiling tok/s | % of ceiling | prefill ms edgekd / ORT / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['target']} | {r['size_mb']:.0f} | {r['edgekd']:.1f} | {f(r['ort'])} | {r['torch']:.1f} "
            f"| {r['edgekd'] / r['torch']:.2f}x | {f(r['ort'] and r['edgekd'] / r['ort'], '{:.2f}x')} "
            f"| {r['mb_per_token']:.0f} | {r['ceiling']:.0f} | {100 * r['edgekd'] / r['ceiling']:.0f}% "
            f"| {r['pre_edgekd']:.0f} / {f(r['pre_ort'], '{:.0f}')} / {r['pre_torch']:.0f} |"
        )
    print()
    print("MB read / token: " + "; ".join(sorted({f"{r['target']}: {r['how']}" for r in rows})) + ", plus the KV cache.")


if __name__ == "__main__":
    main()
