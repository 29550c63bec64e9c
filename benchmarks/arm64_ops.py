"""One operator kind at a time, on x86 and on aarch64: which onnxruntime kernel makes a bundle
answer differently on ARM (issue 28, item 1). Used by ``benchmarks/arm64_check.sh`` where a bundle's
figures differ between the machines; alone:

    python benchmarks/arm64_ops.py build runs/arm64/ops            # here (needs onnx): the models + inputs
    python benchmarks/arm64_ops.py run runs/arm64/ops x86.npz      # on each machine (onnxruntime, numpy)
    python benchmarks/arm64_ops.py compare runs/arm64/ops x86.npz arm64.npz   # (arm64_check.sh runs all three)

Each model is one contrib operator a bundle uses, at SmolLM2-135M's shapes (hidden 576, MLP 1536,
9 heads / 3 KV heads of 64), with random weights on the operator's grid and activations with a few
outlier channels, as a transformer's have. ``compare`` prints, per model, each machine's largest
error against an exact float64 reference where one is computed here (MatMulNBits: dequantized
weights times the input), and the largest difference between the machines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

K, N, BLOCK, TOKENS = 576, 1536, 32, 8


def _activations(rng, rows: int, k: int) -> np.ndarray:
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    x[..., rng.choice(k, 4, replace=False)] *= 40.0  # outlier channels
    return x


def _matmul_nbits(bits: int, accuracy_level: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    kb = K // BLOCK
    levels = rng.integers(0, 2**bits, size=(N, kb, BLOCK), dtype=np.uint8)
    scales = (rng.random((N, kb), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    packed = levels if bits == 8 else (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=BLOCK, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, N])],
                              [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales.reshape(-1), "s")])
    w = (levels.astype(np.float64) - 2 ** (bits - 1)) * scales[..., None].astype(np.float64)  # (N, kb, block)
    return graph, w.reshape(N, K)


def _gather_block_quantized(rng):
    from onnx import TensorProto, helper, numpy_helper

    vocab, kb = 4096, K // BLOCK
    levels = rng.integers(0, 16, size=(vocab, kb, BLOCK), dtype=np.uint8)
    packed = (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)
    scales = (rng.random((vocab, kb, 1), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    node = helper.make_node("GatherBlockQuantized", ["w", "ids", "s"], ["y"], domain="com.microsoft", bits=4,
                            block_size=BLOCK, gather_axis=0, quantize_axis=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")])
    return graph


def _group_query_attention():
    from onnx import TensorProto, helper

    heads, kv, d = 9, 3, 64
    f = TensorProto.FLOAT
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_len", "cos", "sin"]
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0)
    inputs = [helper.make_tensor_value_info("query", f, [1, None, heads * d]),
              helper.make_tensor_value_info("key", f, [1, None, kv * d]),
              helper.make_tensor_value_info("value", f, [1, None, kv * d]),
              helper.make_tensor_value_info("past_key", f, [1, kv, None, d]),
              helper.make_tensor_value_info("past_value", f, [1, kv, None, d]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_len", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos", f, [None, d // 2]),
              helper.make_tensor_value_info("sin", f, [None, d // 2])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_key", "present_value")]
    return helper.make_graph([node], "g", inputs, outputs)


def build(folder: Path) -> None:
    import onnx
    from onnx import helper

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    x = _activations(rng, TOKENS, K)
    refs, feeds = {}, {}
    for bits, level in ((4, 0), (4, 4), (8, 4)):
        name = f"matmul_nbits_{bits}bit_level{level}"
        graph, w = _matmul_nbits(bits, level, rng)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
                  folder / f"{name}.onnx")
        feeds[name] = {"x": x}
        refs[name] = (x[0].astype(np.float64) @ w.T)[None]
    onnx.save(helper.make_model(_gather_block_quantized(rng), opset_imports=[helper.make_opsetid("", 17),
                                                                              helper.make_opsetid("com.microsoft", 1)]),
              folder / "gather_block_quantized.onnx")
    feeds["gather_block_quantized"] = {"ids": rng.integers(0, 4096, size=(1, TOKENS), dtype=np.int64)}
    onnx.save(helper.make_model(_group_query_attention(), opset_imports=[helper.make_opsetid("", 17),
                                                                          helper.make_opsetid("com.microsoft", 1)]),
              folder / "group_query_attention.onnx")
    past = 24
    pos = np.arange(4096, dtype=np.float64)[:, None] / 10000 ** (np.arange(0, 64, 2) / 64)
    feeds["group_query_attention"] = {
        "query": rng.standard_normal((1, 1, 9 * 64)).astype(np.float32),
        "key": rng.standard_normal((1, 1, 3 * 64)).astype(np.float32),
        "value": rng.standard_normal((1, 1, 3 * 64)).astype(np.float32),
        "past_key": rng.standard_normal((1, 3, past, 64)).astype(np.float32),
        "past_value": rng.standard_normal((1, 3, past, 64)).astype(np.float32),
        "seqlens_k": np.array([past], np.int32), "total_len": np.array(past + 1, np.int32),
        "cos": np.cos(pos).astype(np.float32), "sin": np.sin(pos).astype(np.float32)}
    np.savez(folder / "feeds.npz", **{f"{m}/{k}": v for m, f in feeds.items() for k, v in f.items()})
    np.savez(folder / "reference.npz", **refs)
    print(f"{len(feeds)} models in {folder}")


def run(folder: Path, out: Path, configs: list[str]) -> None:
    import onnxruntime as ort

    data = np.load(folder / "feeds.npz")
    feeds: dict[str, dict] = {}
    for key in data.files:
        model, name = key.split("/")
        feeds.setdefault(model, {})[name] = data[key]
    results = {}
    for model, feed in feeds.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        for c in configs:
            k, v = c.split("=", 1)
            so.add_session_config_entry(k, v)
        sess = ort.InferenceSession(str(folder / f"{model}.onnx"), so, providers=["CPUExecutionProvider"])
        results[model] = sess.run(None, feed)[0]
    np.savez(out, **results)
    print(f"{len(results)} outputs -> {out}")


def compare(folder: Path, files: list[Path]) -> None:
    ref = np.load(folder / "reference.npz")
    runs = {f.stem: np.load(f) for f in files}
    names = list(next(iter(runs.values())).files)
    head = " | ".join(f"{m}: max error vs float64" for m in runs)
    print(f"| operator | {head} | largest difference between them |")
    print("|---|" + "---|" * len(runs) + "---|")
    for name in names:
        outs = [r[name].astype(np.float64) for r in runs.values()]
        scale = np.abs(ref[name]).max() if name in ref.files else None
        errs = [f"{np.abs(o - ref[name]).max() / scale:.2e} (relative)" if scale else "-" for o in outs]
        diff = max(np.abs(o - outs[0]).max() for o in outs) / (np.abs(outs[0]).max() or 1)
        print(f"| {name} | " + " | ".join(errs) + f" | {diff:.2e} (relative) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").add_argument("folder", type=Path)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--config", action="append", default=[], help="a session config entry KEY=VALUE (e.g. mlas.disable_kleidiai=1)")
    c = sub.add_parser("compare")
    c.add_argument("folder", type=Path)
    c.add_argument("runs", type=Path, nargs="+")
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.folder)
    elif a.cmd == "run":
        run(a.folder, a.out, a.config)
    else:
        compare(a.folder, a.runs)


if __name__ == "__main__":
    main()
