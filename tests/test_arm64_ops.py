"""benchmarks/arm64_ops.py, the one-operator-at-a-time comparison arm64_check.sh runs on ARM: it
builds, runs and compares here, and its MatMulNBits reference is the dequantized weights' product."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "arm64_ops.py"


def test_arm64_ops_builds_runs_and_compares(tmp_path):
    ops = tmp_path / "ops"
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("build", str(ops)).returncode == 0
    assert run("run", str(ops), str(tmp_path / "a.npz")).returncode == 0
    r = run("run", str(ops), str(tmp_path / "b.npz"), "--config", "session.intra_op.allow_spinning=0")
    assert r.returncode == 0, r.stderr
    r = run("compare", str(ops), str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ") and "operator" not in line}
    assert set(rows) == {"matmul_nbits_4bit_level0", "matmul_nbits_4bit_level4", "matmul_nbits_8bit_level4",
                         "gather_block_quantized", "group_query_attention"}
    ref = np.load(ops / "reference.npz")
    out = np.load(tmp_path / "a.npz")
    exact = out["matmul_nbits_4bit_level0"].astype(np.float64)  # fp32 activations: the reference to float32 rounding
    assert np.abs(exact - ref["matmul_nbits_4bit_level0"]).max() <= 1e-5 * np.abs(ref["matmul_nbits_4bit_level0"]).max()
    int8 = out["matmul_nbits_4bit_level4"].astype(np.float64)  # int8 activations: close, not exact
    assert 1e-4 < np.abs(int8 - ref["matmul_nbits_4bit_level4"]).max() / np.abs(ref["matmul_nbits_4bit_level4"]).max() < 0.05
