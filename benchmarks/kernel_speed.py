"""How fast onnxruntime's MatMulNBits kernels read their weights, by bits and activation precision.

    python benchmarks/kernel_speed.py [--threads 2] [--runs 200]

A decode step at batch 1 multiplies one activation row by every weight once, so a bandwidth-bound
kernel reads its weights at the machine's read bandwidth. Each graph holds about 100 MB of weights
(as many copies of the shape as that takes), what a SmolLM2 token reads, so the caches do not hold
them between runs (printed beside the table, measured as
`edgekd validate` measures it). Each row times one MatMulNBits shape from the models edgekd ships
(SmolLM2's layers and head, Gemma 3's head), 4 or 8 bits, block 32, at fp32 activations
(accuracy_level 0) and int8 activations (accuracy_level 4), and gives the weight bytes it reads a
second. Where the fp32-activation rows read far below the bandwidth the kernel is compute-bound:
no change to the graph around it can bring a bundle that uses it to its roofline
(docs/runtime.md, "Why the cpu bundle is not at its roofline").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [("SmolLM2 gate_proj", 576, 1536), ("SmolLM2 down_proj", 1536, 576), ("SmolLM2 head", 576, 49152),
          ("Gemma 3 head", 640, 262144)]


def matmul_nbits_model(k: int, n: int, bits: int, accuracy_level: int, copies: int, block: int = 32) -> bytes:
    """``copies`` MatMulNBits nodes of random weights on one input (1, k): enough weight bytes per
    run that the timing is the kernels', not the call's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(copies):
        inits += [numpy_helper.from_array(rng.integers(0, 255, size=(n, k // block, block * bits // 8), dtype=np.uint8), f"B{i}"),
                  numpy_helper.from_array((rng.random(n * (k // block), dtype=np.float32) * 0.01), f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"S{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
    graph = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(copies)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def time_node(k: int, n: int, bits: int, level: int, threads: int, runs: int) -> tuple[float, float]:
    """(microseconds per node, weight GB read per second)."""
    import onnxruntime as ort

    copies = max(1, min(512, (100 << 20) // (k * n * bits // 8)))  # about 100 MB of weights a run, as a SmolLM2 token reads
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(matmul_nbits_model(k, n, bits, level, copies), opts, providers=["CPUExecutionProvider"])
    x = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    sess.run(None, x)
    times = []
    for _ in range(runs):  # the best of `runs`: the least disturbed by the rest of the machine
        t = time.perf_counter()
        sess.run(None, x)
        times.append(time.perf_counter() - t)
    per_run = min(times)
    return per_run / copies * 1e6, copies * k * n * bits / 8 / per_run / 1e9


def main(argv: list[str]) -> int:
    from edgekd.device.speed import read_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="timed runs of each graph (the best counts)")
    args = ap.parse_args(argv)
    bandwidth = read_bandwidth(args.threads) / 1e9
    print(f"read bandwidth on {args.threads} threads: {bandwidth:.1f} GB/s\n")
    print("| weight (K x N) | bits | activations | us per node | weight GB/s | share of bandwidth |")
    print("|---|---|---|---|---|---|")
    for name, k, n in SHAPES:
        for bits in (4, 8):
            for level, act in ((0, "fp32"), (4, "int8")):
                if bits == 8 and level == 0 and n > 50_000:
                    print(f"| {name} ({k} x {n}) | {bits} | {act} | (not run: about 100x the int8 row) | | |")
                    continue
                us, gbs = time_node(k, n, bits, level, args.threads, args.runs)
                print(f"| {name} ({k} x {n}) | {bits} | {act} | {us:,.0f} | {gbs:.1f} | {gbs / bandwidth:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
