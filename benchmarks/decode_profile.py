"""Where decode time goes: onnxruntime's own profiler over edgekd's decode loop, by kind of node.

    python benchmarks/decode_profile.py runs/bench-s6/smollm2-135m-instruct-cpu [more bundles ...] --tokens 32

Each bundle is loaded by ``edgekd.device.runtime.Runtime`` (the decode loop a user runs: KV cache bound in
place), with onnxruntime's profiler on. One prompt is prefilled, then ``--tokens`` greedy steps are
decoded; only the decode runs are counted. Nodes are grouped by what they do (the groups below,
matched on op type and node name), and the table gives each group's share of the time spent inside
nodes, the microseconds per decoded token, and the node count per token. "between nodes" is the
rest of each run's wall time (the executor, IO binding, allocations).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = [  # (group, test on (op_type, node name)); the first that matches wins
    ("grid offsets (block sums, offsets, add)", lambda op, name: any(s in name for s in ("_Q_block_sums", "_Q_offsets", "_Q_add"))),
    ("lm_head (MatMulNBits)", lambda op, name: op == "MatMulNBits" and "lm_head" in name),
    ("MatMulNBits (layers)", lambda op, name: op == "MatMulNBits"),
    ("embedding (GatherBlockQuantized)", lambda op, name: op in ("GatherBlockQuantized", "Gather") and "embed" in name),
    ("attention (MatMul, Softmax, GQA, MHA)", lambda op, name: op in ("MatMul", "Softmax", "GroupQueryAttention", "MultiHeadAttention", "Attention")),
    ("KV cache (Concat)", lambda op, name: op == "Concat"),
    ("norms (SimplifiedLayerNorm, Pow/ReduceMean)", lambda op, name: "LayerNorm" in op or op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal")),
    ("rotary (Sin/Cos, Mul, Add, Neg, Slice)", lambda op, name: op in ("Sin", "Cos", "Neg", "RotaryEmbedding") or "rotary" in name),
]


def group_of(op: str, name: str) -> str:
    return next((g for g, test in GROUPS if test(op, name)), f"other: {op}")


def profile_bundle(bundle: Path, tokens: int, work: Path) -> dict:
    import onnxruntime as ort

    from edgekd.device.runtime import Runtime
    from edgekd.device.speed import SPEED_PROMPT

    real = ort.SessionOptions

    def profiled():
        opts = real()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / bundle.name)
        return opts

    ort.SessionOptions = profiled  # Runtime builds its own options: switch the profiler on in them
    try:
        rt = Runtime(bundle, verify=False)
    finally:
        ort.SessionOptions = real
    prompt = rt.encode_prompt(SPEED_PROMPT)
    for _ in rt.generate_ids(prompt, tokens + 1, stop_at_eos=False):
        pass
    steps = rt.last.decode_steps
    events = json.loads(Path(rt.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode = runs[1:]  # the first run is the prefill
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in decode]
    per_group: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in spans):
            continue
        g = group_of(e["args"].get("op_name", ""), e["name"][: -len("_kernel_time")])
        per_group[g] += e["dur"]
        count[g] += 1
    inside = sum(per_group.values())
    wall = sum(b - a for a, b in spans)
    return {"bundle": bundle.name, "steps": len(decode), "decode_steps": steps, "wall_us": wall, "inside_us": inside,
            "groups": {g: (per_group[g], count[g]) for g in sorted(per_group, key=lambda g: -per_group[g])},
            "tokens_per_s": rt.last.decode_tokens_per_s}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps profiled")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as work:
        for b in args.bundles:
            r = profile_bundle(b, args.tokens, Path(work))
            n = r["steps"]
            print(f"\n{r['bundle']}: {n} decode runs profiled, {r['wall_us'] / n / 1000:.2f} ms per token "
                  f"({r['tokens_per_s']:.1f} tokens/s unprofiled-equivalent loop)\n")
            print("| group | share of node time | us per token | nodes per token |")
            print("|---|---|---|---|")
            for g, (us, c) in r["groups"].items():
                print(f"| {g} | {us / r['inside_us']:.1%} | {us / n:.0f} | {c / n:.0f} |")
            print(f"| between nodes (executor, binding) | - | {(r['wall_us'] - r['inside_us']) / n:.0f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
