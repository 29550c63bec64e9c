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

A GGUF file says which llama.cpp type each weight was stored as (``gguf_weight_types``, written into
the exported graph's metadata under ``GGUF_TYPES``), and :data:`GGUF_GRIDS` says how MatMulNBits holds
each type exactly: the 4-bit types (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K) at 4 bits with their own block
size, the 5-, 6- and 8-bit symmetric ones (Q5_0, Q6_K, Q8_0) at 8 bits, each block's scale its own
(:func:`find_symmetric`; Q6_K's scale changes every 16 values, so it is stored in blocks of 16).
Every weight is still recovered from its values and its round trip checked; a type with no exact
home here (Q5_1, Q5_K, the IQ types) goes to the profile's quantizer, and the recipe names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LEVELS = 16  # 4 bits
ZERO = 8     # MatMulNBits' implied zero point for 4-bit weights
RTOL = 1e-5  # round trip tolerance, relative to the block's largest magnitude
GGUF_TYPES = "edgekd.gguf_types"  # ONNX metadata: Hugging Face module -> the GGUF type its weight was stored as


@dataclasses.dataclass(frozen=True)
class GridKind:
    """How MatMulNBits holds one llama.cpp weight type exactly: the ``bits`` it is stored at, the
    type's scale ``block``, and for a symmetric type (``w = s * level``) the largest ``|level|`` a block
    may have (tried in turn, per block); None: 16 levels with or without an offset (:func:`find_grid`)."""

    bits: int
    block: int
    symmetric: tuple[int, ...] | None = None


# ggml-quants.c's dequantization, type by type (d, dmin: per 256 or 32 values; sc, m: per 16 or 32)
GGUF_GRIDS = {
    "Q4_0": GridKind(4, 32),                       # d * (q - 8), q in [0, 15]
    "Q4_1": GridKind(4, 32),                       # d * q + m
    "Q4_K": GridKind(4, 32),                       # (d * sc) * q - dmin * m: a scale and an offset per 32
    "Q3_K": GridKind(4, 16),                       # (d * sc) * (q - 4), q in [0, 7]
    "Q2_K": GridKind(4, 16),                       # (d * sc) * q - dmin * m, q in [0, 3]
    "Q5_0": GridKind(8, 32, (16,)),                # d * (q - 16), d = max / -16: a block's largest |w| is 16 |d|
    "Q8_0": GridKind(8, 32, (127,)),               # d * q, d = max |w| / 127
    "Q6_K": GridKind(8, 16, tuple(range(1, 33))),  # (d * sc) * (q - 32): any largest |level| up to 32
}


def gguf_weight_types(path, model) -> dict[str, str]:
    """Each of ``model``'s modules -> the llama.cpp type of its weight in the GGUF file at ``path``
    (gguf's own tensor name map, as transformers uses it to load the file); {} for an architecture
    gguf does not name."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    name = field.contents() if field is not None else None
    arch = {v: k for k, v in MODEL_ARCH_NAMES.items()}.get(name) if isinstance(name, str) else None
    if arch is None:
        return {}
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    types = {}
    for module, _ in model.named_modules():
        base = names.get_name(module) if module else None
        if base and f"{base}.weight" in stored:
            types[module] = stored[f"{base}.weight"]
    return types


def module_of(node_name: str) -> str:
    """The Hugging Face module an exported node belongs to: ``/model/layers.0/mlp/up_proj/MatMul``
    -> ``model.layers.0.mlp.up_proj``."""
    return node_name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def node_types(model) -> dict[str, list[str]] | None:
    """Each MatMul node -> the GGUF types of the weights it holds (a packed q/k/v projection holds
    three), from the graph's metadata; None when the graph was not exported from a GGUF."""
    from edgekd.export.graph import read_notes

    types = read_notes(model, GGUF_TYPES)
    if types is None:
        return None
    out = {}
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        module = module_of(n.name)
        parts = [module] if module in types else [module[: -len("qkv_proj")] + p for p in ("q_proj", "k_proj", "v_proj")] \
            if module.endswith("qkv_proj") else []
        if parts and all(p in types for p in parts):
            out[n.name] = [types[p] for p in parts]
    return out


def grid_kind(types: list[str] | None, block_size: int) -> GridKind | None:
    """How to keep a weight of these GGUF types (several for a packed matrix) exactly; a weight of
    no GGUF (``types`` None) is tried on the 4-bit grid at the profile's block size (a
    ``--qat-bits 4`` student, a GGUF exported before types were recorded). None: no exact home."""
    if types is None:
        return GridKind(4, block_size)
    if not types or any(t not in GGUF_GRIDS for t in types):
        return None
    kinds = [GGUF_GRIDS[t] for t in types]
    bits = {k.bits for k in kinds}
    if len(bits) != 1:
        return None
    if bits == {4}:
        return GridKind(4, min(k.block for k in kinds))
    largest = [k.symmetric for k in kinds if k.symmetric is not None]
    if len(largest) != len(kinds):
        return None
    return GridKind(8, min(k.block for k in kinds), tuple(sorted({c for s in largest for c in s})))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit values (uint8, last axis even) two per byte, low nibble first: MatMulNBits' and
    GatherBlockQuantized's layout."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@dataclasses.dataclass
class Grid:
    """One weight on its grid, in MatMulNBits' layout (rows = output features N)."""

    q: np.ndarray                # uint8 (N, K/block, block), values in [0, 2**bits - 1]
    scales: np.ndarray           # float32 (N, K/block), signed
    offsets: np.ndarray | None   # float32 (N, K/block), or None where every block runs through zero
    bits: int = 4

    def dequantized(self) -> np.ndarray:
        w = (self.q.astype(np.float32) - 2 ** (self.bits - 1)) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(w.shape[0], -1)

    def packed(self) -> np.ndarray:
        """MatMulNBits' ``B``."""
        return pack_nibbles(self.q) if self.bits == 4 else self.q


def find_symmetric(w: np.ndarray, block_size: int, largest: tuple[int, ...]) -> Grid | None:
    """``w`` (N, K) as an 8-bit :class:`Grid` of a symmetric type: every block ``s * level`` with
    integer levels, ``s = max|block| / L`` for the first ``L`` in ``largest`` that reproduces the
    block; ``None`` when some block fits none."""
    rows, k = w.shape
    if k % block_size:
        return None
    blocks = w.reshape(rows, k // block_size, block_size).astype(np.float64)
    amax = np.abs(blocks).max(-1)
    chosen = np.zeros(amax.shape)
    for top in largest:
        open_ = chosen == 0
        if not open_.any():
            break
        scale = np.where(amax > 0, amax / top, 1.0)[..., None]
        levels = blocks / scale
        fits = (np.abs(levels - np.rint(levels)) * scale <= RTOL * amax[..., None]).all(-1)
        chosen = np.where(open_ & fits, top, chosen)
    if (chosen == 0).any():
        return None
    scale = np.where(amax > 0, amax / chosen, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]) + 128, 0, 255).astype(np.uint8)
    grid = Grid(q, scale, None, bits=8)
    err = np.abs(grid.dequantized() - w.astype(np.float64)).reshape(blocks.shape)
    return grid if (err <= RTOL * amax[..., None] + 1e-12).all() else None


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
    # a constant block (Q4_K's scale 0 leaves -dmin * m) is one level through zero: its scale, its value
    d = np.where(flat | (span == 0), np.where(lo != 0, np.abs(lo), 1.0), (hi - lo) / np.where(span == 0, 1, span))
    # Levels through zero (lo a whole number of steps) fit scale * (q - 8) with no offset, with the
    # scale's sign chosen so the levels land in [-8, 7].
    first = lo / d
    whole = np.abs(first - np.rint(first)) * np.abs(d) <= tol[..., 0] / 2  # dropping the offset stays within the round trip
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


def exact_half(array: np.ndarray, name: str) -> tuple[list, list]:
    """``array`` (float32) as the tensor ``name``: an initializer stored float16 and cast back by a
    node when float16 holds every value exactly (a GGUF's Q8_0 and Q5_0 block scales are fp16 in the
    file: half the bytes, the same numbers; onnxruntime folds the cast when it loads the model), else
    the float32 initializer. Returns (initializers, nodes)."""
    from onnx import TensorProto, helper, numpy_helper

    half = array.astype(np.float16)
    if np.isfinite(half).all() and np.array_equal(half.astype(np.float32), array):
        return [numpy_helper.from_array(half, name + ".f16")], [helper.make_node("Cast", [name + ".f16"], [name], to=TensorProto.FLOAT,
                                                                                  name=name + "/Cast")]
    return [numpy_helper.from_array(array, name)], []


def store_on_grid(model, names: set[str], block_size: int, accuracy_level: int, offsets_dtype: str = "float32") -> dict[str, Any]:
    """Replace each MatMul named in ``names`` whose constant weight lies on its grid by MatMulNBits
    (plus the offsets' correction where the grid has them): the GGUF type's grid where the graph
    records one (:func:`node_types`), else the 4-bit grid at ``block_size``, at ``accuracy_level``.
    An 8-bit grid at fp32 activations (level 0) is stored as two 4-bit halves (:func:`split_nodes`):
    onnxruntime 1.32's 8-bit kernel is fast only with int8 activations (level 4: 20 us for a 640 x
    2048 weight, against 900 us at fp32, and 2 x 50 us for the halves). Returns the names of the
    MatMuls kept (``matmuls``), how many of them have offsets, how many store them float16, the
    GGUF types kept (``types``, a count per type), those that are not (``not_kept``: node ->
    types) and how many 8-bit grids were split (``split``).

    ``offsets_dtype = "float16"`` stores the offsets at half the bytes, cast to fp32 in the graph;
    a weight whose offsets float16 would move by more than 1/100 of a grid step keeps them fp32
    (a Q4_1 offset is ``m + 8 d`` with ``m`` the block's minimum: typically well under a step)."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    types = node_types(model)
    w = _GridWriter(block_size, accuracy_level, offsets_dtype)
    replace: list[tuple[Any, list]] = []
    kept: list[str] = []
    kept_types: dict[str, int] = {}
    not_kept: dict[str, list[str]] = {}
    for n in g.node:
        if n.op_type != "MatMul" or n.name not in names or n.input[1] not in inits:
            continue
        b = numpy_helper.to_array(inits[n.input[1]])
        if b.ndim != 2:
            continue
        node_type = types.get(n.name) if types is not None else None
        if types is not None and node_type is None:
            continue  # not a weight the GGUF holds (an unfused projection the exporter made)
        kind = grid_kind(node_type, block_size)
        wt = np.ascontiguousarray(b.T)
        grid = None
        if kind is not None:
            grid = find_grid(wt, kind.block) if kind.symmetric is None else find_symmetric(wt, kind.block, kind.symmetric)
        if grid is None or kind is None:
            if node_type is not None:
                not_kept[n.name] = node_type
            continue
        replace.append((n, w.nodes(n, grid, kind.block, *b.shape)))
        kept.append(n.name)
        for t in node_type or ():
            kept_types[t] = kept_types.get(t, 0) + 1
    if replace:
        splice(g, replace)
        g.initializer.extend(w.inits)
    return {"matmuls": kept, "with_offsets": w.with_offsets, "float16_offsets": w.half_offsets, "types": kept_types,
            "not_kept": not_kept, "split": w.split}


class _GridWriter:
    """The nodes and initializers that store weights on their grids, and what several weights share:
    an input's block sums (computed once per input) and the (K, K/block) block indicator."""

    def __init__(self, block_size: int, accuracy_level: int, offsets_dtype: str):
        self.block_size, self.accuracy_level, self.offsets_dtype = block_size, accuracy_level, offsets_dtype
        self.inits: list = []
        self.block_sums: dict[tuple[str, int], str] = {}  # (input, block) -> its block sums
        self.indicators: dict[tuple[int, int], str] = {}  # (K, block) -> the block indicator
        self.split = self.with_offsets = self.half_offsets = 0

    def nodes(self, n, grid, block: int, k: int, cols: int) -> list:
        """The nodes replacing MatMul ``n`` (weight ``(k, cols)``): MatMulNBits (or two 4-bit halves
        of an 8-bit grid at fp32 activations), plus the offsets' correction where the grid has them."""
        from onnx import helper, numpy_helper

        base = n.name + "_Q"
        bits = grid.bits
        qn, sn = f"{n.input[1]}.grid_q{bits}", f"{n.input[1]}.grid_scales"
        scale_inits, nodes = exact_half(grid.scales.reshape(-1), sn)
        self.inits += scale_inits
        out = n.output[0] if grid.offsets is None else n.output[0] + ".grid"
        if bits == 8 and self.accuracy_level == 0:
            halves, half_inits = split_nodes(n.input[0], grid, sn, out, base, block)
            self.inits += half_inits
            nodes += halves
            self.split += 1
        else:
            self.inits.append(numpy_helper.from_array(grid.packed(), qn))
            nodes += [helper.make_node("MatMulNBits", [n.input[0], qn, sn], [out], name=base, domain="com.microsoft",
                                       K=int(k), N=int(cols), bits=bits, block_size=block, accuracy_level=self.accuracy_level)]
        if grid.offsets is not None:
            nodes += self._offset_nodes(n, grid, block, k, out, base)
        return nodes

    def _offset_nodes(self, n, grid, block: int, k: int, out: str, base: str) -> list:
        """``out + block_sums(x) @ offsets``: the grid's offsets (Q4_1's ``m + 8 d``), float16 where
        that moves none by more than 1/100 of a grid step."""
        from onnx import helper, numpy_helper

        self.with_offsets += 1
        x, nodes = n.input[0], []
        suffix = f"_{block}" if block != self.block_size else ""
        if (k, block) not in self.indicators:
            e = np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32))
            self.indicators[k, block] = f"grid_block_indicator_{k}" + suffix
            self.inits.append(numpy_helper.from_array(e, self.indicators[k, block]))
        if (x, block) not in self.block_sums:
            self.block_sums[x, block] = f"{x}.grid_block_sums" + suffix
            nodes.append(helper.make_node("MatMul", [x, self.indicators[k, block]], [self.block_sums[x, block]],
                                          name=f"{base}_block_sums"))
        on = f"{n.input[1]}.grid_offsets"
        offsets = np.ascontiguousarray(grid.offsets.T)  # (K/block, N)
        half = offsets.astype(np.float16) if self.offsets_dtype == "float16" else None
        if half is not None and np.all(np.abs(half.astype(np.float32) - offsets) <= 1e-2 * np.abs(grid.scales.T)):
            self.half_offsets += 1
            self.inits.append(numpy_helper.from_array(half, on + ".f16"))
            nodes.append(helper.make_node("Cast", [on + ".f16"], [on], name=f"{base}_offsets_cast", to=1))
        else:
            self.inits.append(numpy_helper.from_array(offsets, on))
        return nodes + [helper.make_node("MatMul", [self.block_sums[x, block], on], [out + ".offsets"], name=f"{base}_offsets"),
                        helper.make_node("Add", [out, out + ".offsets"], [n.output[0]], name=f"{base}_add")]


def nibble_halves(q: np.ndarray, scales: str, tag: str) -> tuple[list, list, list[tuple[str, str, bool]]]:
    """8-bit levels ``q`` (uint8 ``B`` in [0, 255], (rows, K/block, block)) with scales ``s`` (the
    tensor ``scales``) as two 4-bit matrices whose sum is exact: ``B = 16 hi + lo``, so ``s (B - 128)
    = 16 s (hi - 8) + s lo``. The file holds the two nibble matrices (the 8-bit one's bytes) and ``s``
    once; ``16 s`` is a node on it, folded when onnxruntime loads the model. Returns
    (initializers, nodes, parts): each part ``(data, scales, whether it needs zero points 0)``, the
    high nibbles at the implied zero point 8, the low ones at 0 (:func:`zero_points`)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(pack_nibbles(q >> 4), f"{tag}.hi_q4"),
             numpy_helper.from_array(pack_nibbles(q & 15), f"{tag}.lo_q4"),
             numpy_helper.from_array(np.array(16.0, np.float32), f"{tag}.sixteen")]
    nodes = [helper.make_node("Mul", [scales, f"{tag}.sixteen"], [f"{scales}.hi"], name=f"{tag}_hi_scales")]
    return inits, nodes, [(f"{tag}.hi_q4", f"{scales}.hi", False), (f"{tag}.lo_q4", scales, True)]


def zero_points(name: str, shape: list[int]) -> tuple[list, list]:
    """uint8 zero points of ``shape``, all 0 (packed 4-bit zeros are zero bytes), as a node on a
    constant shape: folded when onnxruntime loads the model. Returns (initializers, nodes)."""
    from onnx import TensorProto, helper, numpy_helper

    return ([numpy_helper.from_array(np.array(shape, np.int64), f"{name}.shape")],
            [helper.make_node("ConstantOfShape", [f"{name}.shape"], [name], name=f"{name}_zeros",
                              value=helper.make_tensor("zero", TensorProto.UINT8, [1], [0]))])


def split_nodes(x: str, grid: Grid, scales: str, out: str, base: str, block: int) -> tuple[list, list]:
    """An 8-bit grid as two 4-bit MatMulNBits on ``x`` (:func:`nibble_halves`) and their sum.
    Returns (nodes, initializers)."""
    from onnx import helper

    rows, blocks, _ = grid.q.shape
    inits, nodes, parts = nibble_halves(grid.q, scales, base)
    zp_inits, zp_nodes = zero_points(f"{base}.lo_zero_points", [rows * ((blocks + 1) // 2)])
    attrs = dict(domain="com.microsoft", K=blocks * block, N=rows, bits=4, block_size=block, accuracy_level=0)
    for (data, part_scales, zero), half in zip(parts, ("hi", "lo")):
        nodes.append(helper.make_node("MatMulNBits", [x, data, part_scales] + ([zp_nodes[0].output[0]] if zero else []),
                                      [f"{out}.{half}"], name=f"{base}_{half}", **attrs))
    nodes.append(helper.make_node("Add", [f"{out}.hi", f"{out}.lo"], [out], name=f"{base}_halves"))
    return [*zp_nodes, *nodes], [*inits, *zp_inits]


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
