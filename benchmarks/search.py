"""What does the search pick, against the target's fixed default recipe and the naive anchor?

    python benchmarks/search.py smollm2-135m-instruct --targets mobile,cpu --json teacher.json
    python benchmarks/search.py runs/smollm2/student --targets mobile,cpu --json student.json

For each target: ``edgekd.search.search_export`` (every ``[[candidates]]`` recipe exported and
validated against the target's gates on the held-out set, mixed precision included), plus the
naive anchor (the same model through onnxruntime's ``quantize_dynamic``, int8 MatMul+Gather,
per-channel) validated the same way. Every number is what ``edgekd validate`` measured: model
size, decode tokens/s (edgekd runtime, batch 1), top-1 agreement and mean KL against the
unquantized model. Prints one Markdown table per target and a summary line: the size of what the
search kept against the smallest fixed recipe (a candidate without mixed precision, or the anchor)
that passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path


def fmt(v, f="{:.3f}"):
    return "–" if v is None else f.format(v)


def run_target(model: str, target: str, work: Path, vcfg) -> dict:
    from edgekd.device.config import to_dict
    from edgekd.export import export_bundle
    from edgekd.export.profile import load_target
    from edgekd.search import NoCandidatePasses, Tried, resolve_candidates, search_export
    from edgekd.validate import validate

    profile = load_target(target)
    default = dataclasses.replace(profile, candidates=()).to_dict()
    cands = {c.name: c for c in resolve_candidates(profile)}
    t0 = time.time()
    try:
        result = search_export(model, profile, work / f"{target}-search", validate_config=vcfg,
                               log=lambda m: print(f"  [{target}] {m}", flush=True))
    except NoCandidatePasses as e:
        result = e.result
    search_s = time.time() - t0

    anchor_profile = dataclasses.replace(profile, steps=("quantize_dynamic",), candidates=())
    anchor_dir = work / f"{target}-dynamic"
    export_bundle(model, anchor_profile, anchor_dir)
    [anchor], _ = validate([anchor_dir], vcfg, out=work / f"{target}-dynamic-report")

    rows = []
    for i, t in enumerate(result.tried):
        c = cands[t.name]
        rows.append({
            **t.record(),
            "name": t.name + (f" ({len(t.int8_layers)} of {len(result.sensitivity[t.name]['order'])} layers int8)"
                              if t.int8_layers is not None else ""),
            "kind": "mixed" if c.mixed_precision else "fixed",
            "default": not c.mixed_precision and c.profile.to_dict() == default,
            "kept": i == result.chosen_index,
        })
    anchor_row = Tried("quantize_dynamic (anchor)", "onnxruntime's dynamic int8", {"steps": ["quantize_dynamic"]}, anchor_dir,
                       report=anchor).record()
    rows.append({**anchor_row, "kind": "anchor", "default": False, "kept": False})
    return {"model": model, "target": target, "gates": to_dict(profile.gates), "rows": rows,
            "sensitivity": result.sensitivity, "search_seconds": round(search_s, 1), "chosen": result.chosen}


def markdown(res: dict) -> str:
    gates = ", ".join(f"{k} {v:g}" for k, v in res["gates"].items() if v is not None)
    lines = [f"### {res['model']}, target `{res['target']}` (gates: {gates})", "",
             "| candidate | size MB | decode tok/s | top-1 vs ref | KL vs ref | top-1 vs teacher | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tags = [t for t, on in (("default recipe", r["default"]), ("kept by the search", r["kept"])) if on]
        if r.get("skipped"):
            verdict = f"skipped: {r['skipped'][:90]}"
        elif r.get("error"):
            verdict = f"export failed: {r['error'][:80]}"
        else:
            failed = [g["name"] for g in r["gates"] if not g["passed"]]
            verdict = "PASS" if r["passed"] else "FAIL " + ", ".join(failed)
        name = r["name"] + (f" ({'; '.join(tags)})" if tags else "")
        lines.append(f"| {name} | {fmt(r['size_mb'], '{:.1f}')} | {fmt(r['decode_tokens_per_s'], '{:.1f}')} | "
                     f"{fmt(r['top1_vs_reference'])} | {fmt(r['kl_vs_reference'], '{:.4f}')} | "
                     f"{fmt(r['top1_vs_teacher'])} | {verdict} |")
    kept = next((r for r in res["rows"] if r["kept"]), None)
    fixed = [r for r in res["rows"] if r["kind"] == "fixed" and r["passed"]]
    anchor = next(r for r in res["rows"] if r["kind"] == "anchor")
    smallest = min(fixed, key=lambda r: r["size_mb"]) if fixed else None
    default = next((r for r in res["rows"] if r["default"]), None)
    lines.append("")
    if kept is None:
        lines.append("No candidate passes: the search exits 1.")
    elif smallest is None:
        lines.append(f"The search kept {kept['name']} ({kept['size_mb']:.1f} MB); no fixed recipe passes.")
    else:
        saved = 1 - kept["size_mb"] / smallest["size_mb"]
        lines.append(f"The search kept **{kept['name']}** ({kept['size_mb']:.1f} MB): {saved:.0%} smaller than the "
                     f"smallest fixed candidate recipe that passes ({smallest['name']}, {smallest['size_mb']:.1f} MB); "
                     f"the quantize_dynamic anchor {'passes' if anchor['passed'] else 'fails'} at {anchor['size_mb']:.1f} MB. "
                     f"Search time {res['search_seconds']:.0f} s.")
        if default is not None and default["passed"] and default is not kept:
            lines.append(f"Against the profile's own default recipe ({default['name']}, {default['size_mb']:.1f} MB, passes): "
                         f"{1 - kept['size_mb'] / default['size_mb']:.0%} smaller.")
    return "\n".join(lines)


def main() -> None:
    from edgekd.validate import ValidateConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--targets", default="mobile,cpu")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    vcfg = ValidateConfig(num_prompts=args.num_prompts, answer_tokens=args.answer_tokens)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-search-") as d:
        for target in args.targets.split(","):
            results.append(run_target(args.model, target, Path(d), vcfg))
            print(markdown(results[-1]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print("\n\n".join(markdown(r) for r in results))


if __name__ == "__main__":
    main()
