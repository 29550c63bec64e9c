"""Does onnxruntime's GPTQ beat round-to-nearest? (Why edgekd's matmul_nbits offers no "gptq".)

    python benchmarks/ort_gptq_check.py

GPTQ (Frantar et al. 2023, arXiv 2210.17323) rounds the weight rows of a layer one at a time and
spreads each row's rounding error over the rows not yet rounded, along the inverse Hessian of the
layer's calibration inputs: on correlated activations its output error is well below RTN's. This
script calls onnxruntime's own implementation (``onnxruntime.quantization.neural_compressor.
weight_only.gptq``, what ``GPTQWeightOnlyQuantConfig`` runs) on one synthetic layer with
low-rank correlated inputs, like an LLM's, and prints the output error on held-out inputs of the
same distribution for: RTN (``quant_tensor``), GPTQ's fake-quantized weights, and GPTQ's weights
after the packing into MatMulNBits that ``gptq_quantize`` does (``quant_tensor`` again).

Measured with onnxruntime 1.32.0 (2026-12-02): GPTQ's weights give RTN's error to 7 digits, both
schemes, and the symmetric packing then moves most weights to another grid (output error +25-30 %).
The first: the error is propagated along ``Hinv1[i:, i]``, a column below the diagonal of the
upper-triangular Cholesky factor (all zeros), where the reference implementation reads the row
``Hinv1[i, i:]``; so no error is ever propagated. The second: the packing recomputes each block's
scale from the rounded values' largest magnitude instead of keeping GPTQ's. The last column runs
the same function with those two lines reading rows: the error falls about five-fold, as GPTQ's does.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnxruntime
import onnxruntime.quantization.neural_compressor.weight_only as weight_only
from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor


def gptq_reading_rows():
    """onnxruntime's gptq with the two error-propagation lines reading rows of the factor, as the
    reference implementation does: the diagnosis, checked (not used by edgekd)."""
    src = inspect.getsource(weight_only.gptq)
    fixed = (src.replace("np.expand_dims(Hinv1[i:, i], axis=1)", "np.expand_dims(Hinv1[i, i:], axis=1)")
                .replace("np.matmul(Hinv[i2:, i1:i2], Err1)", "np.matmul(Hinv[i1:i2, i2:].T, Err1)"))
    if fixed == src:
        return None  # this onnxruntime's gptq reads differently: nothing to compare
    namespace = dict(weight_only.__dict__)
    exec(fixed, namespace)
    return namespace["gptq"]


def dequant(w: np.ndarray, scheme: str, k: int, n: int) -> np.ndarray:
    q, scale, zp = quant_tensor(w.T.copy(), 4, 32, scheme, "uint")
    return ((q.astype(np.float32) - zp) * scale).reshape(n, k).T


def main() -> None:
    rng = np.random.default_rng(0)
    k, n, rank = 128, 256, 8
    w = rng.normal(size=(k, n)).astype(np.float32)
    basis = rng.normal(size=(k, rank))

    def activations(count: int) -> np.ndarray:  # low-rank correlated inputs plus a little noise
        return rng.normal(size=(count, rank)) @ basis.T + 0.1 * rng.normal(size=(count, k))

    calib, held = activations(4000), activations(500)
    hessian = 2 * calib.T @ calib / len(calib)
    print(f"onnxruntime {onnxruntime.__version__}: one {k}x{n} layer, 4-bit, blocks of 32; mean |error| of the "
          "layer's output on 500 held-out inputs")
    rows = gptq_reading_rows()
    print("| scheme | RTN | GPTQ weights | GPTQ packed into MatMulNBits | GPTQ weights equal to RTN's | GPTQ reading rows |")
    print("|---|---|---|---|---|---|")
    for scheme in ("sym", "asym"):
        fake = gptq(w.copy(), hessian.copy(), num_bits=4, group_size=32, scheme=scheme, blocksize=128,
                    percdamp=0.01, actorder=False, mse=False, perchannel=True)
        packed, rtn = dequant(fake, scheme, k, n), dequant(w, scheme, k, n)

        def err(m: np.ndarray) -> float:
            return float(np.abs(held @ m - held @ w).mean())

        by_rows = "n/a"
        if rows is not None:
            by_rows = f"{err(rows(w.copy(), hessian.copy(), num_bits=4, group_size=32, scheme=scheme, blocksize=128, percdamp=0.01, actorder=False, mse=False, perchannel=True)):.4f}"
        print(f"| {scheme} | {err(rtn):.4f} | {err(fake):.4f} | {err(packed):.4f} | {np.allclose(fake, rtn, atol=1e-5)} | {by_rows} |")


if __name__ == "__main__":
    main()
