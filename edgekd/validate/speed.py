"""How fast and how heavy is the bundle in an app: load time, prefill ms, decode tokens/s, peak RSS.

``measure_speed`` runs the measurement in a fresh Python process that imports only the runtime
(no torch), so its peak resident memory is what an app using the bundle would need, and the
PyTorch models loaded for fidelity do not count. ``bench`` compares decode speed with PyTorch
eager ``generate`` of the reference in one process, as a ratio.

Run by hand: ``python -m edgekd.validate.speed BUNDLE`` prints the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekd.errors import EdgekdError, UsageError
from edgekd.io import proc_kib_field

PREFILL_TOKENS = 128  # the prompt length prefill is timed at (issue 5)
DECODE_TOKENS = 64  # decode steps timed (batch 1, greedy, eos ignored)
BANDWIDTH_MIB = 256  # the array the read bandwidth is measured on: larger than the caches
SPEED_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def synthetic_ids(rt, n: int) -> list[int]:
    """``n`` ordinary token ids: the encoded text of a fixed passage, repeated."""
    base = rt.tokenizer.encode(SPEED_PROMPT * 4, add_special_tokens=False).ids or [0]
    return [base[i % len(base)] for i in range(n)]


def time_runtime(rt, prefill_tokens: int = PREFILL_TOKENS, decode_tokens: int = DECODE_TOKENS, repeats: int = 3) -> dict[str, float]:
    """Prefill ms (median of ``repeats``) and decode tokens/s of a loaded ``Runtime``."""
    n = prefill_tokens
    if rt.context_length:
        n = min(n, rt.context_length - decode_tokens - 1)
    ids = synthetic_ids(rt, n)
    rt.prefill_logits(ids[:8])  # warm up: first-run allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        rt.prefill_logits(ids)
        times.append(time.perf_counter() - t)
    prompt = rt.encode_prompt(SPEED_PROMPT)
    for _ in rt.generate_ids(prompt, 4, stop_at_eos=False):  # warm up the decode path
        pass
    for _ in rt.generate_ids(prompt, decode_tokens + 1, stop_at_eos=False):
        pass
    return {
        "prefill_tokens": n,
        "prefill_ms": 1000 * sorted(times)[len(times) // 2],
        "decode_tokens_per_s": rt.last.decode_tokens_per_s,
        "decode_steps": rt.last.decode_steps,
    }


def read_bandwidth(threads: int | None = None, mib: int = BANDWIDTH_MIB, repeats: int = 3) -> float:
    """The machine's read bandwidth, bytes/s: ``threads`` numpy reductions (which release the GIL)
    over disjoint parts of one ``mib`` MiB array, best of ``repeats``. ``threads`` None: one per CPU."""
    import threading

    import numpy as np

    threads = threads or os.cpu_count() or 1
    a = np.ones(mib << 18, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.max, args=(part,)) for part in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def roofline(decode_tokens_per_s: float, weight_bytes: int | None, bandwidth: float) -> dict[str, float]:
    """Decode against its bandwidth limit: a decode step reads every weight once (``weight_bytes``,
    the manifest's ``model.decode_weight_bytes``), so tokens/s cannot pass bandwidth / weight bytes.
    Empty when the weight bytes are unknown (a bundle from before they were recorded)."""
    if not weight_bytes or bandwidth <= 0:
        return {}
    return {"decode_weight_mb": weight_bytes / 1e6, "read_bandwidth_gb_s": bandwidth / 1e9,
            "decode_roofline_tokens_per_s": bandwidth / weight_bytes,
            "decode_roofline_share": decode_tokens_per_s * weight_bytes / bandwidth}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. On Linux from ``VmHWM``: ``ru_maxrss`` would
    include the parent's resident memory at fork (the kernel carries it across exec)."""
    peak = proc_kib_field("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _measure_here(bundle: str, providers: list[str] | None, threads: int | None) -> dict[str, Any]:
    from edgekd.runtime import Runtime

    rt = Runtime(bundle, providers=providers, threads=threads, verify=False)
    result = {"load_s": rt.load_s, "providers": rt.session.get_providers(), "warnings": rt.warnings}
    result.update(time_runtime(rt))
    result["peak_rss_bytes"] = peak_rss_bytes()  # before the bandwidth's array
    result["read_bandwidth_bytes_per_s"] = read_bandwidth(threads)
    return result


def measure_speed(bundle: Path, providers: list[str] | None = None, threads: int | None = None, timeout: float = 900) -> dict[str, Any]:
    """Speed and memory of ``bundle`` measured in a fresh process (see the module docstring)."""
    cmd = [sys.executable, "-m", "edgekd.validate.speed", str(bundle)]
    if providers:
        cmd += ["--providers", ",".join(providers)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EdgekdError(f"the speed measurement of {bundle} took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgekdError(f"the speed measurement of {bundle} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(bundle: Path, reference: str | None = None, max_new_tokens: int = DECODE_TOKENS, threads: int | None = None) -> dict[str, Any]:
    """Decode tokens/s of the bundle (edgekd runtime) against PyTorch eager ``generate`` of its
    reference model, same prompt, same process, greedy, batch 1, eos ignored."""
    import torch

    from edgekd.models import load_model
    from edgekd.runtime import Runtime

    rt = Runtime(bundle, threads=threads)
    spec = reference or rt.manifest.source.spec
    if not spec:
        raise UsageError(f"{bundle}'s manifest names no source model: pass --reference")
    ours = time_runtime(rt, decode_tokens=max_new_tokens)
    try:
        model, _ = load_model(spec)
    except UsageError as e:
        raise UsageError(f"the reference {spec!r} could not be loaded ({e}): pass --reference") from None
    if threads:
        torch.set_num_threads(threads)
    ids = torch.tensor([rt.encode_prompt(SPEED_PROMPT)])
    kwargs = dict(do_sample=False, min_new_tokens=None, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **kwargs)  # warm up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        first = time.perf_counter() - t  # prefill + one token: subtracted below to time decode only
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens + 1, **kwargs)
        total = time.perf_counter() - t
    steps = out.shape[1] - ids.shape[1] - 1
    torch_tps = steps / max(total - first, 1e-9)
    return {
        "bundle": str(bundle),
        "reference": spec,
        "providers": rt.session.get_providers(),
        "edgekd_decode_tokens_per_s": ours["decode_tokens_per_s"],
        "torch_decode_tokens_per_s": torch_tps,
        "speedup": ours["decode_tokens_per_s"] / torch_tps,
        "edgekd_prefill_ms": ours["prefill_ms"],
        "prefill_tokens": ours["prefill_tokens"],
        "decode_tokens": max_new_tokens,
    }


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgekd.validate.speed", description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--providers", default=None, help="comma-separated execution providers")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        result = _measure_here(args.bundle, args.providers.split(",") if args.providers else None, args.threads)
    except EdgekdError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    result["torch_imported"] = "torch" in sys.modules  # the runtime must not need it
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
