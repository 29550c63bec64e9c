"""How fast and how heavy is the bundle in an app: load time, prefill ms, decode tokens/s, peak RSS.

``measure_speed`` runs the measurement in a fresh Python process that imports only the runtime
(no torch), so its peak resident memory is what an app using the bundle would need, and the
PyTorch models loaded for fidelity do not count (``edgekd.validate.speed.bench`` compares decode
speed with PyTorch eager ``generate`` in one process).

Run by hand: ``python -m edgekd.device.speed BUNDLE`` prints the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekd.device.errors import EdgekdError
from edgekd.device.io import cpuinfo_field, proc_kib_field

PREFILL_TOKENS = 128  # the prompt length prefill is timed at (issue 5)
DECODE_TOKENS = 64  # decode steps timed (batch 1, greedy, eos ignored)
BANDWIDTH_MIB = 256  # the array the read bandwidth is measured on: larger than the caches
MEMORY_PROMPT_TOKENS = 480  # memory is measured at a long prompt: what a prefill holds grows with it
MEMORY_NEW_TOKENS = 16
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
    """Peak resident memory of this process (since the last ``reset_peak``). On Linux from
    ``VmHWM``: ``ru_maxrss`` would include the parent's resident memory at fork (the kernel carries
    it across exec)."""
    peak = proc_kib_field("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux; None elsewhere)."""
    return proc_kib_field("/proc/self/status", "VmRSS")


def reset_peak() -> bool:
    """Start the peak (``VmHWM``) afresh at the present resident size (Linux >= 4.0: ``5`` into
    ``/proc/self/clear_refs``); False where the system cannot, and the peaks then accumulate."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_by_stage(bundle: str, providers: list[str] | None = None, threads: int | None = None,
                    session_config: dict[str, str] | None = None, prompt_tokens: int = MEMORY_PROMPT_TOKENS,
                    new_tokens: int = MEMORY_NEW_TOKENS, prepared: str | None = None) -> dict[str, Any]:
    """What the bundle costs in resident memory, stage by stage, in this process (run it in a fresh one:
    ``measure_memory``). The bare interpreter is this process with onnxruntime, tokenizers, numpy and
    the runtime imported, before the bundle opens; then the peak while its tokenizer loads (a large
    Unigram vocabulary's is hundreds of MB in the ``tokenizers`` library, ``edgekd.device.tokenizer``), while the session is created, while
    a prompt of ``prompt_tokens`` is prefilled, and while ``new_tokens`` are decoded, and the resident
    size after each, with its part in pages of mapped files (``file_mb``: the weights onnxruntime maps
    from an external data file, and the libraries), which the system can drop and read again, where
    the rest, anonymous memory, stays until freed (what a phone's memory killer counts)."""
    import onnxruntime  # noqa: F401  (what an app has loaded before it opens a bundle)
    import tokenizers  # noqa: F401  (the bare interpreter has it whichever tokenizer the bundle opens)

    from edgekd.device.bundle import read_manifest
    from edgekd.device.runtime import Runtime
    from edgekd.device.tokenizer import open_tokenizer

    mb = 1e6
    base, fresh = rss_bytes() or peak_rss_bytes(), reset_peak()
    base_file = proc_kib_field("/proc/self/status", "RssFile") or 0
    stages: dict[str, dict[str, float]] = {}

    def stage(name: str) -> None:  # the peak since the last stage; the resident size now, and how much of it is mapped files
        stages[name] = {"peak_mb": peak_rss_bytes() / mb, "rss_mb": (rss_bytes() or 0) / mb,
                        "file_mb": (proc_kib_field("/proc/self/status", "RssFile") or 0) / mb}
        reset_peak()

    tokens = open_tokenizer(Path(bundle), read_manifest(Path(bundle), verify=False).get("tokenizer"))
    stage("tokenizer")  # the runtime loads its own below, into the memory this one leaves
    del tokens
    rt = Runtime(bundle, providers=providers, threads=threads, verify=False, session_config=session_config, prepared=prepared)
    stage("session")
    n = min(prompt_tokens, rt.context_length - new_tokens - 1) if rt.context_length else prompt_tokens
    answer = rt.generate_ids(synthetic_ids(rt, n), new_tokens, stop_at_eos=False)
    next(answer)  # the prefill's token
    stage("prefill")
    for _ in answer:
        pass
    stage("decode")
    peak = max(v["peak_mb"] for v in stages.values()) if fresh else stages["decode"]["peak_mb"]
    model_mb = rt.manifest.model_bytes / mb
    return {"prompt_tokens": n, "new_tokens": new_tokens, "interpreter_mb": base / mb, "stages": stages,
            "peak_rss_mb": peak, "bundle_peak_mb": peak - base / mb, "model_mb": model_mb,
            "peak_over_model": (peak - base / mb) / model_mb if model_mb else None, "stage_peaks_apart": fresh,
            "logits_to_keep": rt.keeps_logits, "kv_buffers": len(rt._kv.buffers),
            "interpreter_file_mb": base_file / mb}


def _measure_here(bundle: str, providers: list[str] | None, threads: int | None) -> dict[str, Any]:
    from edgekd.device.runtime import Runtime

    rt = Runtime(bundle, providers=providers, threads=threads, verify=False)
    result = {"load_s": rt.load_s, "providers": rt.session.get_providers(), "warnings": rt.warnings}
    result.update(time_runtime(rt))
    result["peak_rss_bytes"] = peak_rss_bytes()  # before the bandwidth's array
    result["read_bandwidth_bytes_per_s"] = read_bandwidth(threads)
    return result


def memory_cost(memory: dict[str, Any]) -> dict[str, Any]:
    """A report's cost figures from ``memory_by_stage``: the process's peak, the peak above the bare
    interpreter (gate ``max_peak_rss_mb``), its ratio to the model file, and the stages."""
    return {"peak_rss_mb": memory["peak_rss_mb"], "bundle_peak_rss_mb": memory["bundle_peak_mb"],
            "peak_rss_over_model": memory["peak_over_model"], "memory": memory}


def memory_line(memory: dict[str, Any]) -> str:
    """One line a person reads: what the bundle adds to its process, and where."""
    stages = ", ".join(f"{name} {v['peak_mb'] - memory['interpreter_mb']:.0f}" for name, v in memory["stages"].items())
    return (f"peak RSS {memory['bundle_peak_mb']:.0f} MB above the bare interpreter ({memory['interpreter_mb']:.0f} MB), "
            f"{memory['peak_over_model']:.2f}x the model file, answering a {memory['prompt_tokens']}-token prompt "
            f"(peak by stage, MB above the interpreter: {stages}; {mapped_mb(memory):.0f} MB of it pages mapped from files)")


def mapped_mb(memory: dict[str, Any]) -> float:
    """Resident pages of mapped files the bundle added (its external weights), at the stage of the peak."""
    top = max(memory["stages"].values(), key=lambda v: v["peak_mb"])
    return max(top.get("file_mb", 0.0) - memory.get("interpreter_file_mb", 0.0), 0.0)


def measure_speed(bundle: Path, providers: list[str] | None = None, threads: int | None = None, timeout: float = 900) -> dict[str, Any]:
    """Speed and memory of ``bundle`` measured in a fresh process (see the module docstring)."""
    return _fresh_process(bundle, [], providers, threads, timeout, "speed")


def measure_memory(bundle: Path, providers: list[str] | None = None, threads: int | None = None,
                   session_config: dict[str, str] | None = None, prepared: Path | None = None, timeout: float = 900) -> dict[str, Any]:
    """``memory_by_stage`` of ``bundle`` in a fresh process: its peak is the bundle's, nothing else's.
    ``prepared``: the runtime's cache of the model prepared for this machine, made first (in another
    process) where it is missing, so that the figure is a load's, not the preparation's."""
    args = ["--memory"]
    if prepared is not None:
        from edgekd.device.runtime import Runtime

        Runtime(bundle, providers=providers, verify=False, session_config=session_config, prepared=prepared)
        args += ["--prepared", str(prepared)]
    for key, value in (session_config or {}).items():
        args += ["--session-config", f"{key}={value}"]
    return _fresh_process(bundle, args, providers, threads, timeout, "memory")


def _fresh_process(bundle: Path, args: list[str], providers: list[str] | None, threads: int | None, timeout: float,
                   what: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgekd.device.speed", str(bundle), *args]
    if providers:
        cmd += ["--providers", ",".join(providers)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EdgekdError(f"the {what} measurement of {bundle} took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgekdError(f"the {what} measurement of {bundle} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(threads: int | None, providers: list[str]) -> dict[str, Any]:
    """Where a figure was measured: versions, CPU, threads, provider (report.json's ``environment``)."""
    import onnxruntime

    from edgekd.device import __version__

    env = {"edgekd": __version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
           "system": f"{platform.system()} {platform.release()}", "machine": platform.machine(), "cpu": cpuinfo_field("model name", "hardware", "cpu model") or platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "threads": threads or "onnxruntime default (one per physical core)",
           "providers": providers}
    try:
        import torch  # only to say which one, when the machine has it; check itself never uses it

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    return env


def _main(argv: list[str]) -> int:
    import argparse

    from edgekd.device.session import parse_session_config

    parser = argparse.ArgumentParser(prog="python -m edgekd.device.speed", description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--providers", default=None, help="comma-separated execution providers")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="resident memory by stage (memory_by_stage) instead of speed")
    parser.add_argument("--session-config", action="append", default=[], help="KEY=VALUE onnxruntime session config entry")
    parser.add_argument("--prepared", default=None, help="with --memory: the cache of the model prepared for this machine")
    args = parser.parse_args(argv)
    providers = args.providers.split(",") if args.providers else None
    try:
        if args.memory:
            result = memory_by_stage(args.bundle, providers, args.threads, parse_session_config(args.session_config),
                                     prepared=args.prepared)
        else:
            result = _measure_here(args.bundle, providers, args.threads)
    except EdgekdError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    result["torch_imported"] = "torch" in sys.modules  # the runtime must not need it
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
