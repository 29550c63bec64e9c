"""edgekd's bundles beside llama.cpp on the same GGUF: decode and prefill speed, memory, answers.

    python benchmarks/llamacpp_side_by_side.py --gguf smollm2-135m-instruct \\
        --bundle runs/bench/teacher-cpu [--bundle runs/bench/teacher-mobile] --threads 2 --rounds 5

``--gguf``: a GGUF file, or a teacher edgekd knows by name (its packaged file). Each ``--bundle``
must come from that GGUF, and the first must carry a golden reference of unseen prompts, e.g.
``edgekd export smollm2-135m-instruct --target cpu --out runs/bench/teacher-cpu --golden-prompts 50
--golden-data benchmarks/data/general-unseen.jsonl``. Its golden answers are PyTorch's greedy
answers on the GGUF's weights (dequantized to fp32). Each engine decodes the same prompt token ids
greedily, and its answers are compared with those token for token (``compare_greedy``, as
``edgekd check`` compares them). The figures are the share of prompts answered identically and
the mean common prefix.

llama.cpp is built once by ``benchmarks/llamacpp/build.sh``, from source, as a benchmark only. Its
side has two programs:
- ``llama-bench``, llama.cpp's own timer: prefill ("pp") and decode ("tg") tokens/s;
- ``greedy_ids``: the answers, the decode time of each, and the peak resident memory.

edgekd's bundles are timed by ``edgekd.device.speed.measure_speed``, in a fresh process per round,
as ``edgekd validate`` times them. The engines alternate round by round on the same threads (the
machine is noisy: the medians are compared, never runs from different times). Decode tokens/s are
also put against the machine's read bandwidth: the weight bytes a decode step reads (the bundle's
initializers, the GGUF's tensors), times tokens/s, over the best read bandwidth measured in the
same run (``edgekd.device.speed.read_bandwidth`` once a round: a ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.device.fidelity import compare_greedy
from edgekd.device.speed import PREFILL_TOKENS, measure_speed

HERE = Path(__file__).resolve().parent


def llamacpp_bin() -> Path:
    out = subprocess.run(["bash", str(HERE / "llamacpp" / "build.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def gguf_path(spec: str) -> Path:
    from edgekd.models import KNOWN_TEACHERS

    if spec in KNOWN_TEACHERS:
        path = KNOWN_TEACHERS[spec].path()
        if path is None:
            sys.exit(f"{spec} is not installed: {KNOWN_TEACHERS[spec].install}")
        return path
    return Path(spec)


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors: what llama.cpp reads a decode step (a tied head reads the embedding too)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def llama_bench(binary: Path, gguf: Path, threads: int, prefill: int, decode: int) -> dict[str, float]:
    out = subprocess.run([str(binary / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prefill), "-n", str(decode),
                          "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    by = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return {"prefill_tokens_per_s": by["pp"], "decode_tokens_per_s": by["tg"]}


def llama_greedy(binary: Path, gguf: Path, threads: int, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], float, int]:
    """Greedy answers (each ending at its end-of-generation token), decode tokens/s over all
    prompts, and the peak resident bytes of the process."""
    proc = subprocess.run([str(binary / "greedy_ids"), str(gguf), str(tokens), str(threads)], check=True, capture_output=True, text=True,
                          input="\n".join(" ".join(map(str, p)) for p in prompts) + "\n")
    answers, seconds, steps = [], 0.0, 0
    for line in proc.stdout.splitlines():
        ids, secs = line.split("\t")
        answers.append([int(x) for x in ids.split()])
        seconds += float(secs)
        steps += max(len(answers[-1]) - 1, 0)  # the first token comes from the prefill
    peak = next(int(x.split()[1]) * 1024 for x in proc.stderr.splitlines() if x.startswith("VmHWM:"))
    return answers, steps / max(seconds, 1e-9), peak


def bundle_greedy_answers(bundle: Path, prompts: list[list[int]], tokens: int, threads: int) -> list[list[int]]:
    from edgekd.device.fidelity import bundle_greedy
    from edgekd.device.runtime import Runtime

    return bundle_greedy(Runtime(bundle, verify=False, threads=threads), prompts, tokens)


def bundle_sizes(bundle: Path) -> tuple[float, int]:
    """The model's MB (``Manifest.model_bytes``) and the weight bytes a decode step reads."""
    from edgekd.device.bundle import Manifest, bundle_decode_weight_bytes, read_manifest

    manifest = Manifest(read_manifest(bundle, verify=False))
    return manifest.model_bytes / 1e6, bundle_decode_weight_bytes(bundle, manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="a GGUF file, or a known teacher's name")
    ap.add_argument("--bundle", action="append", default=[], type=Path, help="an edgekd bundle exported from that GGUF (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    gguf = gguf_path(args.gguf)
    binary = llamacpp_bin()
    golden = json.loads((args.bundle[0] / "golden.json").read_text())
    prompts = [e["prompt_ids"] for e in golden["examples"]]
    reference = [e["answer_ids"] for e in golden["examples"]]
    n = golden["answer_tokens"]
    print(f"{len(prompts)} golden prompts of {args.bundle[0]}, {n} answer tokens; llama.cpp from {binary}", flush=True)

    rows: dict[str, dict] = {"llama.cpp": {"file": gguf.name, "size_mb": gguf.stat().st_size / 1e6, "bytes_per_token": gguf_tensor_bytes(gguf)}}
    answers, rows["llama.cpp"]["greedy_decode_tokens_per_s"], rows["llama.cpp"]["peak_rss_mb"] = llama_greedy(binary, gguf, args.threads, prompts, n)
    rows["llama.cpp"]["peak_rss_mb"] /= 1e6
    rows["llama.cpp"].update(compare_greedy(answers, reference, n))
    for b in args.bundle:
        name = f"edgekd {b.name}"
        size_mb, weight_bytes = bundle_sizes(b)
        rows[name] = {"file": b.name, "size_mb": size_mb, "bytes_per_token": weight_bytes}
        rows[name].update(compare_greedy(bundle_greedy_answers(b, prompts, n, args.threads), reference, n))
    print("answers done", flush=True)

    from edgekd.device.speed import read_bandwidth

    bandwidth = []
    speeds: dict[str, list[dict]] = {k: [] for k in rows}
    for r in range(args.rounds):  # interleaved: each round times every engine once
        bandwidth.append(read_bandwidth(args.threads))
        speeds["llama.cpp"].append(llama_bench(binary, gguf, args.threads, PREFILL_TOKENS, args.decode_tokens))
        for b in args.bundle:
            m = measure_speed(b, threads=args.threads)
            speeds[f"edgekd {b.name}"].append({"prefill_tokens_per_s": m["prefill_tokens"] / (m["prefill_ms"] / 1e3),
                                               "decode_tokens_per_s": m["decode_tokens_per_s"], "peak_rss_mb": m["peak_rss_bytes"] / 1e6})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['decode_tokens_per_s']:.0f} tok/s" for k, v in speeds.items()), flush=True)
    bw = max(bandwidth)  # a ceiling: the best the machine read in this run
    for k, v in speeds.items():
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            rows[k][key] = statistics.median(x[key] for x in v)
        if "peak_rss_mb" in v[0]:
            rows[k]["peak_rss_mb"] = max(x["peak_rss_mb"] for x in v)
        rows[k]["roofline_share"] = rows[k]["decode_tokens_per_s"] * rows[k]["bytes_per_token"] / bw

    print(f"\n{len(prompts)} unseen prompts, greedy, {n} tokens; {args.threads} threads, {args.rounds} rounds interleaved (medians); "
          f"read bandwidth {bw / 1e9:.1f} GB/s (the best of {len(bandwidth)} rounds; median {statistics.median(bandwidth) / 1e9:.1f})\n")
    cols = ["engine", "file", "size (MB)", f"prefill tok/s ({PREFILL_TOKENS} tokens)", f"decode tok/s ({args.decode_tokens})",
            "weights read a token (MB)", "share of the bandwidth roofline", "peak RSS (MB)",
            f"greedy identical to PyTorch (of {len(prompts)})", "mean common prefix (tokens)"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for k, r in rows.items():
        print(f"| {k} | {r['file']} | {r['size_mb']:.1f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
              f"{r['bytes_per_token'] / 1e6:.1f} | {r['roofline_share']:.2f} | {r['peak_rss_mb']:.0f} | {r['greedy_exact']:.2f} | "
              f"{r['greedy_prefix_tokens']:.1f} |")
    print(f"\nllama.cpp's decode in greedy_ids, over the answers (a prompt before each): {rows['llama.cpp']['greedy_decode_tokens_per_s']:.0f} tok/s")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_bytes_per_s": bw, "bandwidth_rounds": bandwidth, "rows": rows, "rounds": speeds}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
