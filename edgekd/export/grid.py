"""Weights that already lie on a 4-bit grid are stored on it, exactly.

Two kinds of model reach export with every linear weight on a 4-bit block grid:

- a student distilled with ``--qat-bits 4``: onnxruntime's symmetric grid, ``w = s * q`` with
  ``q`` in ``[-8, 7]`` (``edgekd/quant.py``);
- a teacher read from a GGUF file quantized to Q4_0 or Q4_1 (llama.cpp, ``ggml-quants.c``:
  ``w = d * q + m`` with ``q`` in ``[0, 15]``, ``d`` and ``m`` per block of 32). transformers
  dequantizes it to fp32, but the values are still those 16 levels per block.

Re-quantizing such a weight to another grid (8-bit RTN, 4-bit RTN or HQQ's fitted one) only adds
error; storing its own grid is exact and 4 bits a weight. :func:`find_grid` recovers the grid from
the fp32 values (each block of ``block_size`` input features holds at most 16 values on one
arithmetic progression) and checks the round trip; a weight that fails anywhere is left to the
profile's quantizer.

``MatMulNBits`` stores ``w = scale * (q - 8)`` (``q`` in ``[0, 15]``, the implied zero point of a
symmetric 4-bit weight, the format with onnxruntime's fast kernels). A block whose levels run
through zero fits it as it is. A block with an offset (Q4_1's ``m``) is stored as
``scale * (q - 8) + offset``: the offsets of a weight (one per block and output) multiply the block
sums of the input, ``x @ W = MatMulNBits(x) + (x @ E) @ offsets`` with ``E`` the (K, K/block)
indicator of the blocks, which is how llama.cpp computes a Q4_1 dot product (``d * sum(q x) +
m * sum(x)``). It costs one small fp32 MatMul per weight (1/32 of its rows) and one block sum per
distinct input; float zero points (HQQ's format) would avoid it but have no fast kernel in
onnxruntime 1.32 (RESULTS-export.md: 7.9 against 47 tokens/s).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LEVELS = 16  # 4 bits
ZERO = 8     # MatMulNBits' implied zero point for 4-bit weights
RTOL = 1e-5  # round trip tolerance, relative to the block's largest magnitude


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit values (uint8, last axis even) two per byte, low nibble first: MatMulNBits' and
    GatherBlockQuantized's layout."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@dataclasses.dataclass
class Grid:
    """One weight on its 4-bit grid, in MatMulNBits' layout (rows = output features N)."""

    q: np.ndarray                # uint8 (N, K/block, block), values in [0, 15]
    scales: np.ndarray           # float32 (N, K/block), signed
    offsets: np.ndarray | None   # float32 (N, K/block), or None where every block runs through zero

    def dequantized(self) -> np.ndarray:
        w = (self.q.astype(np.float32) - ZERO) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(w.shape[0], -1)

    def packed(self) -> np.ndarray:
        """MatMulNBits' ``B``."""
        return pack_nibbles(self.q)


def find_grid(w: np.ndarray, block_size: int) -> Grid | None:
    """``w`` (N, K) as a :class:`Grid`, or ``None`` when some block is not on a 16-level progression."""
    rows, k = w.shape
    if k % block_size:
        return None
    blocks = w.reshape(rows, k // block_size, block_size).astype(np.float64)
    srt = np.sort(blocks, axis=-1)
    lo, hi = srt[..., 0], srt[..., -1]
    tol = RTOL * np.maximum(np.abs(lo), np.abs(hi))[..., None]
    gaps = np.diff(srt, axis=-1)
    distinct = gaps > tol
    if (distinct.sum(-1) + 1 > LEVELS).any():
        return None  # more than 16 values in a block: a float weight (the common case, cheap to reject)
    step = np.where(distinct, gaps, np.inf).min(-1)  # inf: a constant block
    flat = ~np.isfinite(step)
    step = np.where(flat, 1.0, step)
    # The smallest gap is the grid's step or a multiple of it (levels left unused): try its divisors.
    for divisor in (1, 2, 3, 4, 5):
        d = step / divisor
        span = np.rint((hi - lo) / d)
        q = np.rint((blocks - lo[..., None]) / d[..., None])
        if (span <= LEVELS - 1).all() and (np.abs(q * d[..., None] + lo[..., None] - blocks) <= tol).all():
            break
    else:
        return None
    d = np.where(flat | (span == 0), 1.0, (hi - lo) / np.where(span == 0, 1, span))
    # Levels through zero (lo a whole number of steps) fit scale * (q - 8) with no offset, with the
    # scale's sign chosen so the levels land in [-8, 7].
    first = lo / d
    whole = np.abs(first - np.rint(first)) <= 1e-4
    top = np.rint(first) + span
    up = whole & (np.rint(first) >= -ZERO) & (top <= ZERO - 1)
    down = whole & ~up & (-top >= -ZERO) & (-np.rint(first) <= ZERO - 1)
    scale = np.where(down, -d, d)
    offset = np.where(up | down, 0.0, lo + ZERO * d)
    levels = np.where((up | down)[..., None], blocks / scale[..., None] + ZERO, q)
    levels = np.clip(np.rint(levels), 0, LEVELS - 1).astype(np.uint8)
    grid = Grid(levels, scale.astype(np.float32), offset.astype(np.float32) if (offset != 0).any() else None)
    err = np.abs(grid.dequantized() - w.astype(np.float64)).reshape(blocks.shape)
    return grid if (err <= tol + 1e-12).all() else None


def store_on_grid(model, names: set[str], block_size: int, accuracy_level: int, offsets_dtype: str = "float32") -> dict[str, Any]:
    """Replace each MatMul named in ``names`` whose constant weight lies on a 4-bit grid by
    MatMulNBits (plus the offsets' correction where the grid has them). Returns the names of the
    MatMuls kept (``matmuls``), how many of them have offsets, and how many store them float16.

    ``offsets_dtype = "float16"`` stores the offsets at half the bytes, cast to fp32 in the graph;
    a weight whose offsets float16 would move by more than 1/100 of a grid step keeps them fp32
    (a Q4_1 offset is ``m + 8 d`` with ``m`` the block's minimum: typically well under a step)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    replace: list[tuple[Any, list]] = []
    new_inits: list = []
    block_sums: dict[str, str] = {}  # input name -> its block sums (computed once per input)
    indicators: dict[int, str] = {}  # K -> the (K, K/block) block indicator
    kept, with_offsets, half_offsets = [], 0, 0
    for n in g.node:
        if n.op_type != "MatMul" or n.name not in names or n.input[1] not in inits:
            continue
        b = numpy_helper.to_array(inits[n.input[1]])
        if b.ndim != 2:
            continue
        k, cols = b.shape
        grid = find_grid(np.ascontiguousarray(b.T), block_size)
        if grid is None:
            continue
        base = n.name + "_Q"
        qn, sn = f"{n.input[1]}.grid_q4", f"{n.input[1]}.grid_scales"
        new_inits += [numpy_helper.from_array(grid.packed(), qn), numpy_helper.from_array(grid.scales.reshape(-1), sn)]
        out = n.output[0] if grid.offsets is None else n.output[0] + ".grid"
        nodes = [helper.make_node("MatMulNBits", [n.input[0], qn, sn], [out], name=base, domain="com.microsoft",
                                  K=int(k), N=int(cols), bits=4, block_size=block_size, accuracy_level=accuracy_level)]
        if grid.offsets is not None:
            with_offsets += 1
            x = n.input[0]
            if k not in indicators:
                e = np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
                indicators[k] = f"grid_block_indicator_{k}"
                new_inits.append(numpy_helper.from_array(e, indicators[k]))
            if x not in block_sums:
                block_sums[x] = f"{x}.grid_block_sums"
                nodes.append(helper.make_node("MatMul", [x, indicators[k]], [block_sums[x]], name=f"{base}_block_sums"))
            on = f"{n.input[1]}.grid_offsets"
            offsets = np.ascontiguousarray(grid.offsets.T)  # (K/block, N)
            half = offsets.astype(np.float16) if offsets_dtype == "float16" else None
            if half is not None and np.all(np.abs(half.astype(np.float32) - offsets) <= 1e-2 * np.abs(grid.scales.T)):
                half_offsets += 1
                new_inits.append(numpy_helper.from_array(half, on + ".f16"))
                nodes.append(helper.make_node("Cast", [on + ".f16"], [on], name=f"{base}_offsets_cast", to=1))
            else:
                new_inits.append(numpy_helper.from_array(offsets, on))
            nodes += [helper.make_node("MatMul", [block_sums[x], on], [out + ".offsets"], name=f"{base}_offsets"),
                      helper.make_node("Add", [out, out + ".offsets"], [n.output[0]], name=f"{base}_add")]
        replace.append((n, nodes))
        kept.append(n.name)
    if replace:
        splice(g, replace)
        g.initializer.extend(new_inits)
    return {"matmuls": kept, "with_offsets": with_offsets, "float16_offsets": half_offsets}


def splice(graph, replace: list[tuple[Any, list]], drop: tuple = ()) -> None:
    """Replace each ``(old node, new nodes)`` in place, keeping topological order (an old node's new
    nodes run in the order given), remove the nodes in ``drop``, and drop initializers nothing
    reads. (Nodes are matched by identity: the pairs hold the old nodes, so their ids stay valid.)"""
    new = {id(old): nodes for old, nodes in replace}
    gone = {id(n) for n in drop}
    nodes = []
    for n in graph.node:
        if id(n) not in gone:
            nodes.extend(new.get(id(n), [n]))
    set_nodes(graph, nodes)


def set_nodes(graph, nodes: list) -> None:
    """Make ``nodes`` the graph's nodes (in that order) and drop the initializers none of them reads."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
