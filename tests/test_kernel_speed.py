"""benchmarks/kernel_speed.py times the MatMulNBits it means to: its graph computes the dequantized
weights' product (so a row of its table is that kernel's speed, not a broken model's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_speed.py"


def _script():
    spec = importlib.util.spec_from_file_location("kernel_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", [4, 8])
def test_the_timed_graph_is_the_dequantized_product(bits):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    blob = _script().matmul_nbits_model(64, 48, bits, 0, copies=2)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(blob).graph.initializer}
    q = inits["B1"]
    if bits == 4:  # two levels a byte, low nibble first
        q = np.stack([q & 15, q >> 4], -1).reshape(48, 2, 32)
    w = (q.astype(np.float64) - 2 ** (bits - 1)) * inits["S1"].reshape(48, 2, 1)
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    got = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(["y1"], {"x": x})[0]
    want = x.astype(np.float64) @ w.reshape(48, 64).T
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    us, gbs = _script().time_node(64, 48, bits, 4, threads=1, runs=2)
    assert us > 0 and gbs > 0
