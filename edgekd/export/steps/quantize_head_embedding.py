"""The ``quantize_head_embedding`` export step: the lm_head as MatMulNBits, the token embedding as
GatherBlockQuantized (or standard operators, for onnxruntime-web), one quantized matrix where the
two are tied. The largest size win the stock quantizer leaves: it skips a head fed by a
Transpose and refuses 8-bit Gathers.

Sources: MatMulNBits and GatherBlockQuantized are onnxruntime contrib ops (docs/ContribOperators.md).

The step reads as stages: find the pair in the graph (``_find_pair``), decide each one's precision
(``_precisions``), quantize the matrices (``_Parts``), write the head's and the embedding's nodes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from edgekd.device.bundle import QatGrid
from edgekd.device.config import power_of_two, require
from edgekd.device.errors import EdgekdError
from edgekd.export.grid import exact_half, nibble_halves, pack_nibbles, splice, zero_points
from edgekd.export.steps import PROTOBUF_LIMIT, StepSettings, ensure_ms_domain, load_onnx, save_onnx, step

HeadPrecision = Literal["fp32", "int8", "int4"]
BITS = {"int8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class QuantizeHeadEmbedding(StepSettings):
    """Step ``quantize_head_embedding``: the lm_head as ``MatMulNBits`` and the embedding as
    ``GatherBlockQuantized``, symmetric block-wise. A tied pair at the same precision shares one
    quantized matrix (stored once)."""

    head: HeadPrecision = "int8"
    embedding: HeadPrecision = "int8"
    block_size: int = 32
    accuracy_level: int = 0  # the head's MatMulNBits; see MatMulNBits.accuracy_level
    keep_grid: bool = True  # a head/embedding already on the int4 grid (--qat-head-bits 4) is stored at int4, exactly
    # how the embedding reads its rows: "block_quantized" (onnxruntime's GatherBlockQuantized, one node) or
    # "standard" (Gather of the same packed rows and scales, dequantized by standard operators: what
    # onnxruntime-web's WebGPU build runs, which registers no GatherBlockQuantized on WebAssembly)
    gather: Literal["block_quantized", "standard"] = "block_quantized"
    # > 0: the head's k highest logits recomputed exactly (fp32 activations, the same quantized rows)
    # after the head ran as one node at accuracy_level: greedy and top-k answers of an fp32-activation
    # head at the speed of an int8-activation one (docs/export.md, "The head, rescored")
    rescore_top_k: int = 0

    def __post_init__(self):
        require(0 <= self.rescore_top_k <= 1024,
                f"quantize_head_embedding.rescore_top_k = {self.rescore_top_k}: use 0 (off) to 1024 (20 is the usual)")
        require(not self.rescore_top_k or self.accuracy_level not in (0, 1),
                f"quantize_head_embedding.rescore_top_k recomputes a head computed at lower precision: at accuracy_level "
                f"{self.accuracy_level} it already runs at fp32 activations; set accuracy_level = 4 (int8), or rescore_top_k = 0")
        require(self.accuracy_level in (0, 1, 2, 3, 4),
                f"quantize_head_embedding.accuracy_level = {self.accuracy_level}: use 0, 1, 2, 3 or 4")
        require(power_of_two(self.block_size) and self.block_size >= 16,
                f"quantize_head_embedding.block_size = {self.block_size}: use a power of two >= 16 (32 is the usual)")

    def reproduces_qat_grid(self, qat: QatGrid, report: dict[str, Any] | None = None) -> bool:
        """A quantized head or embedding at the trained precision and block size (int4 points are not
        int8 points on that grid), or an int4 one kept on its grid (``keep_grid``); once the step ran,
        an int4-trained head must have come out at int4 (``keep_grid`` decides on the weights: an int8
        setting re-rounds a head it did not find on the grid)."""
        want = f"int{qat.head_bits}"
        kept = self.keep_grid and want == "int4"  # an int8 setting stores an int4-grid head at int4
        if any(p != "fp32" and (p != want and not (kept and p == "int8") or self.block_size != qat.block_size)
               for p in (self.head, self.embedding)):
            return False
        return report is None or qat.head_bits != 4 or all(report.get(k) in ("int4", "fp32") for k in ("head", "embedding"))


def _absmax_levels(w, bits: int, block_size: int):
    """``w`` (rows, K) on the symmetric absmax grid along K: its blocks (rows, K/block, block),
    the signed levels in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` and the float32 scales
    (rows, K/block), ``scale = max|block| / (2**(bits-1) - 1)`` (``edgekd.quant.absmax_grid``)."""
    import numpy as np

    rows, k = w.shape
    blocks = w.reshape(rows, k // block_size, block_size).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1) / qmax
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    return blocks, np.clip(np.rint(blocks / scales[..., None]), -qmax, qmax).astype(np.int32), scales


def _quantize_rows(w, bits: int, block_size: int):
    """Symmetric block-wise quantization of ``w`` (rows, K) along K, MatMulNBits' layout.

    Returns ``packed`` uint8 (rows, K/block, block*bits/8) with the zero point 2**(bits-1) implied
    (the default both MatMulNBits and GatherBlockQuantized assume) and ``scales`` float32
    (rows, K/block). 4-bit values are packed two per byte, low nibble first.
    """
    _, levels, scales = _absmax_levels(w, bits, block_size)
    q = (levels + 2 ** (bits - 1)).astype("uint8")
    if bits == 4:
        q = pack_nibbles(q)
    return q, scales


def _on_int4_grid(w, block_size: int) -> bool:
    """Whether ``w`` (rows, K) already lies on the int4 grid :func:`_quantize_rows` stores at this
    block size (a head distilled with ``--qat-head-bits 4``), so that storing it at int4 is exact.
    The first rows decide cheaply for a float weight."""
    import numpy as np

    def exact(rows) -> bool:
        blocks, levels, scales = _absmax_levels(rows, 4, block_size)
        return bool((np.abs(levels * scales[..., None] - blocks) <= 1e-5 * scales[..., None]).all())

    return w.shape[1] % block_size == 0 and exact(w[:64]) and exact(w)


_SHAPE_ONLY = {"Reshape", "Cast", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def _reads_input_ids(name: str, producers: dict) -> bool:
    """Is ``name`` the graph input ``input_ids``, or that input only reshaped or cast (GPT-2's
    export gathers ``Reshape(input_ids)``)?"""
    for _ in range(8):
        if name == "input_ids":
            return True
        node = producers.get(name)
        if node is None or node.op_type not in _SHAPE_ONLY:
            return False
        name = node.input[0]
    return False


def _standard_gather(data: str, scales3d: str, ids: str, bits: int, zero: bool, out: str, name: str,
                     kb: int, block_size: int, ids_rank: int = 2) -> tuple[list, list]:
    """GatherBlockQuantized's rows ``(*ids.shape, kb, block)`` (``ids`` of rank ``ids_rank``) from
    standard operators: Gather the
    packed rows of ``data`` (vocab, kb, block*bits/8) and of ``scales3d`` (vocab, kb, 1), split 4-bit bytes into their
    nibbles (low first) with Mod and Div, subtract the zero point (0 where ``zero``: a lower half of
    an int8 matrix; else 2**(bits-1)) and scale. Same initializers, so a tied head still shares them."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    P = name
    inits = [numpy_helper.from_array(np.array(0.0 if zero else 2.0 ** (bits - 1), np.float32), f"{P}.zero"),
             numpy_helper.from_array(np.array([0] * ids_rank + [kb, block_size], np.int64), f"{P}.blocks_shape")]
    nodes = [helper.make_node("Gather", [data, ids], [f"{P}.rows"], axis=0, name=f"{P}/Gather")]
    rows = f"{P}.rows"
    if bits == 4:
        inits += [numpy_helper.from_array(np.array(16, np.uint8), f"{P}.sixteen"),
                  numpy_helper.from_array(np.array([-1], np.int64), f"{P}.last")]
        nodes += [helper.make_node("Mod", [rows, f"{P}.sixteen"], [f"{P}.lo"], name=f"{P}/Mod"),
                  helper.make_node("Div", [rows, f"{P}.sixteen"], [f"{P}.hi"], name=f"{P}/Div"),
                  helper.make_node("Unsqueeze", [f"{P}.lo", f"{P}.last"], [f"{P}.lo1"], name=f"{P}/Unsqueeze_lo"),
                  helper.make_node("Unsqueeze", [f"{P}.hi", f"{P}.last"], [f"{P}.hi1"], name=f"{P}/Unsqueeze_hi"),
                  helper.make_node("Concat", [f"{P}.lo1", f"{P}.hi1"], [f"{P}.pairs"], axis=-1, name=f"{P}/Concat")]
        rows = f"{P}.pairs"
    nodes += [helper.make_node("Reshape", [rows, f"{P}.blocks_shape"], [f"{P}.levels_u8"], name=f"{P}/Reshape"),
              helper.make_node("Cast", [f"{P}.levels_u8"], [f"{P}.levels"], to=TensorProto.FLOAT, name=f"{P}/Cast"),
              helper.make_node("Sub", [f"{P}.levels", f"{P}.zero"], [f"{P}.centred"], name=f"{P}/Sub"),
              helper.make_node("Gather", [scales3d, ids], [f"{P}.row_scales"], axis=0, name=f"{P}/Gather_scales"),
              helper.make_node("Mul", [f"{P}.centred", f"{P}.row_scales"], [out], name=f"{P}/Mul")]
    return nodes, inits


@dataclasses.dataclass
class _Pair:
    """The embedding Gather and the head MatMul the graph holds, with their weights as arrays."""

    gather: Any
    emb_name: str
    emb: Any  # (vocab, hidden)
    head: Any = None  # the MatMul, None where the graph has no head on a constant
    head_w: Any = None  # (vocab, hidden)
    transpose: Any = None  # a Transpose(embedding) feeding the head, removed with it
    tied: bool = False

    @property
    def vocab(self) -> int:
        return self.emb.shape[0]

    @property
    def hidden(self) -> int:
        return self.emb.shape[1]


def _find_pair(g, block_size: int) -> _Pair:
    """The Gather on ``input_ids`` from a constant, and the MatMul producing (..., vocab) from a
    constant (K, vocab) or Transpose(embedding); one-line errors for a graph without them."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    gather = next((n for n in g.node if n.op_type == "Gather" and len(n.input) == 2
                   and n.input[0] in inits and _reads_input_ids(n.input[1], producers)), None)
    if gather is None:
        raise EdgekdError("quantize_head_embedding: found no embedding Gather on input_ids in this graph: "
                          "remove the step from the profile's steps for this model")
    emb_name = gather.input[0]
    vocab, hidden = inits[emb_name].dims
    head, head_w_name, transpose = None, None, None
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        b = n.input[1]
        if b in inits and list(inits[b].dims) == [hidden, vocab]:
            head, head_w_name, transpose = n, b, None
        elif b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits \
                and list(inits[producers[b].input[0]].dims) == [vocab, hidden]:
            head, head_w_name, transpose = n, producers[b].input[0], producers[b]
    if hidden % block_size:
        raise EdgekdError(f"quantize_head_embedding: hidden size {hidden} is not a multiple of block_size {block_size}: "
                          "choose a block_size that divides it")
    pair = _Pair(gather, emb_name, numpy_helper.to_array(inits[emb_name]), head, transpose=transpose,
                 tied=head is not None and transpose is not None and head_w_name == emb_name)
    if head is not None:
        pair.head_w = pair.emb if transpose is not None else np.ascontiguousarray(numpy_helper.to_array(inits[head_w_name]).T)
        if not pair.tied and np.array_equal(pair.head_w, pair.emb):  # a tied head the exporter stored as its own transposed copy (Gemma 3)
            pair.tied, pair.head_w = True, pair.emb
    return pair


def _precisions(pair: _Pair, settings) -> tuple[str, str, list[str]]:
    """The head's and the embedding's precision, and which of them are kept at int4: with
    ``keep_grid``, an int8 setting stores a matrix already on the int4 grid (a head distilled with
    ``--qat-head-bits 4``) at int4, exact where re-rounding to int8 would not be."""
    kept: list[str] = []

    def precision(asked: str, w, name: str) -> str:
        if asked == "int8" and settings.keep_grid and w is not None and _on_int4_grid(w, settings.block_size):
            kept.append(name)
            return "int4"
        return asked

    head = precision(settings.head, pair.head_w, "head")
    if pair.tied and settings.embedding == settings.head:
        emb = head  # one matrix: one decision
        if "head" in kept:
            kept.append("embedding")
    else:
        emb = precision(settings.embedding, pair.emb, "embedding")
    return head, emb, kept


class _Parts:
    """The initializers and the nodes on constants (folded at load: fp16 scales cast back, the
    halves' scales and zero points) the step adds, and the quantized matrices they make.

    An int8 matrix the head reads at fp32 activations (accuracy_level 0) is stored as two exact
    4-bit halves, as matmul_nbits stores an 8-bit grid (grid.split_nodes): onnxruntime's 8-bit
    kernel is fast only at int8 activations, and the head's int8 activations were what kept Gemma
    3's bundle from PyTorch's answers (top-1 0.989 -> 0.999, greedy identical 0.66 -> 0.98,
    docs/export.md)."""

    def __init__(self, block_size: int, halves: bool):
        self.block_size, self.halves = block_size, halves
        self.inits: list = []
        self.first: list = []
        self._gather_scales: dict[str, str] = {}  # a matrix's flat scales -> their (vocab, kb, 1) view

    def quantized(self, tag: str, rows_w, bits: int, read_by_head: bool = True) -> list[tuple[str, str, str, int]]:
        """The matrix as parts ``(data, scales, zero points or "", bits)`` whose sum it is (an
        embedding the head does not read stays one part: a Gather has no activations)."""
        import numpy as np
        from onnx import numpy_helper

        q, s = _quantize_rows(rows_w, bits, self.block_size)
        sn = f"{tag}.scales"
        scale_inits, cast = exact_half(np.ascontiguousarray(s.reshape(-1)), sn)
        self.inits.extend(scale_inits)
        self.first.extend(cast)
        if bits != 8 or not self.halves or not read_by_head:
            self.inits.append(numpy_helper.from_array(q, f"{tag}.q{bits}"))
            return [(f"{tag}.q{bits}", sn, "", bits)]
        half_inits, half_nodes, parts = nibble_halves(q, sn, tag)
        self.inits.extend(half_inits)
        self.first.extend(half_nodes)
        return [(data, scales, "zero" if zero else "", 4) for data, scales, zero in parts]

    def gather_scales(self, scales: str, vocab: int, kb: int) -> str:
        """``scales`` reshaped (vocab, kb, 1), as a gather reads them (GatherBlockQuantized or the
        standard operators), by one node on constants however many gathers read it (the
        embedding's and the rescoring's)."""
        import numpy as np
        from onnx import helper, numpy_helper

        if scales not in self._gather_scales:
            out = self._gather_scales[scales] = f"{scales}.gather_shape"
            self.inits.append(numpy_helper.from_array(np.array([vocab, kb, 1], dtype=np.int64), f"{out}.shape"))
            self.first.append(helper.make_node("Reshape", [scales, f"{out}.shape"], [out], name=f"{scales}/gather_shape"))
        return self._gather_scales[scales]

    def zeros(self, name: str, shape: list[int]) -> str:
        zp_inits, zp_nodes = zero_points(name, shape)
        self.inits.extend(zp_inits)
        self.first.extend(zp_nodes)
        return name


def _summed(parts_out: list[str], out: str, name: str) -> list:
    from onnx import helper

    return [] if len(parts_out) == 1 else [helper.make_node("Add", parts_out, [out], name=name)]


def _head_nodes(pair: _Pair, parts: list, w: _Parts, settings) -> list:
    """MatMulNBits for each part of the head's matrix, summed into the head's output (or, with
    ``rescore_top_k``, into the logits :func:`_rescore_nodes` recomputes the highest of)."""
    from onnx import helper

    head, vocab, hidden, bs = pair.head, pair.vocab, pair.hidden, w.block_size
    kb = hidden // bs
    logits = head.output[0] + (".approx" if settings.rescore_top_k else "")  # the rescoring writes the head's output
    outs = [logits] if len(parts) == 1 else [f"{head.output[0]}.part{j}" for j in range(len(parts))]
    nodes = [helper.make_node("MatMulNBits", [head.input[0], data, scales]
                              + ([w.zeros(f"{data}.zero_points", [vocab * ((kb + 1) // 2)])] if zp else []),
                              [o], name=head.name + "_Q" + (f"_{j}" if len(parts) > 1 else ""), domain="com.microsoft",
                              K=int(hidden), N=int(vocab), bits=b, block_size=bs,
                              accuracy_level=0 if len(parts) > 1 else settings.accuracy_level)
             for j, ((data, scales, zp, b), o) in enumerate(zip(parts, outs))]
    nodes += _summed(outs, logits, head.name + "_halves")
    if settings.rescore_top_k:
        nodes += _rescore_nodes(pair, parts[0], logits, w, settings.rescore_top_k, settings.gather)
    return nodes


def _rescore_nodes(pair: _Pair, part: tuple, approx: str, w: _Parts, k: int, gather_kind: str) -> list:
    """The head's ``k`` highest logits recomputed at fp32 activations, written over the approximate
    ones: TopK of the head's output ``approx`` ``(b, s, vocab)``, the quantized rows of those tokens gathered
    and dequantized ``(b, s, k, hidden)``, each dotted with the hidden state (MatMul), scattered
    back (ScatterElements). The answer's token and the top-k a sampler reads are then what an
    fp32-activation head gives (up to the order of the sum); the rest keep the fast head's values."""
    import numpy as np
    from onnx import helper, numpy_helper

    head, vocab, hidden, bs = pair.head, pair.vocab, pair.hidden, w.block_size
    data, scales, _, bits = part
    kb, P = hidden // bs, head.name + "_rescore"
    scales3d = w.gather_scales(scales, vocab, kb)
    w.inits += [numpy_helper.from_array(np.array([k], np.int64), f"{P}.k"),
                numpy_helper.from_array(np.array([0, 0, 0, hidden], np.int64), f"{P}.rows_shape"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{P}.last")]
    if gather_kind == "standard":
        nodes, inits = _standard_gather(data, scales3d, f"{P}.ids", bits, False, f"{P}.blocks", f"{P}/rows", kb, bs, ids_rank=3)
        w.inits += inits
    else:
        nodes = [helper.make_node("GatherBlockQuantized", [data, f"{P}.ids", scales3d], [f"{P}.blocks"],
                                  name=f"{P}/rows", domain="com.microsoft", bits=bits, block_size=bs, gather_axis=0, quantize_axis=2)]
    return [helper.make_node("TopK", [approx, f"{P}.k"], [f"{P}.values", f"{P}.ids"], axis=-1, name=f"{P}/TopK"),
            *nodes,
            helper.make_node("Reshape", [f"{P}.blocks", f"{P}.rows_shape"], [f"{P}.rows"], name=f"{P}/Reshape"),
            helper.make_node("Unsqueeze", [head.input[0], f"{P}.last"], [f"{P}.column"], name=f"{P}/Unsqueeze"),
            helper.make_node("MatMul", [f"{P}.rows", f"{P}.column"], [f"{P}.exact1"], name=f"{P}/MatMul"),
            helper.make_node("Squeeze", [f"{P}.exact1", f"{P}.last"], [f"{P}.exact"], name=f"{P}/Squeeze"),
            helper.make_node("ScatterElements", [approx, f"{P}.ids", f"{P}.exact"], [head.output[0]], axis=-1,
                             name=f"{P}/Scatter")]


def _embedding_nodes(pair: _Pair, parts: list, w: _Parts, gather_kind: str) -> list:
    """The embedding's rows gathered from each part (GatherBlockQuantized, or standard operators
    where ``gather_kind`` is "standard"), summed and flattened to (batch, seq, hidden)."""
    import numpy as np
    from onnx import helper, numpy_helper

    gather, vocab, hidden, bs = pair.gather, pair.vocab, pair.hidden, w.block_size
    kb = hidden // bs
    shape_out = f"{pair.emb_name}.out_shape"
    w.inits.append(numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), shape_out))
    out = gather.output[0]
    blocks = [f"{out}.blocks{j}" for j in range(len(parts))]
    nodes = []
    for j, (data, scales, zp, b) in enumerate(parts):
        scales3d = w.gather_scales(scales, vocab, kb)
        if gather_kind == "standard":
            part_nodes, part_inits = _standard_gather(data, scales3d, gather.input[1], b, bool(zp), blocks[j],
                                                      f"{gather.name}_part{j}", kb, bs)
            nodes += part_nodes
            w.inits.extend(part_inits)
            continue
        nodes += [helper.make_node("GatherBlockQuantized",
                                   [data, gather.input[1], scales3d]
                                   + ([w.zeros(f"{data}.gather_zero_points", [vocab, kb, 1])] if zp else []),
                                   [blocks[j]], name=gather.name + "_Q" + (f"_{j}" if len(parts) > 1 else ""),
                                   domain="com.microsoft", bits=b, block_size=bs, gather_axis=0, quantize_axis=2)]
    nodes += _summed(blocks, f"{out}.blocks", f"{gather.name}_halves")
    nodes.append(helper.make_node("Reshape", [blocks[0] if len(parts) == 1 else f"{out}.blocks", shape_out], [out],
                                  name=gather.name + "_flat"))
    return nodes


@step("quantize_head_embedding", QuantizeHeadEmbedding)
def quantize_head_embedding(src: Path, dst: Path, settings: QuantizeHeadEmbedding, profile) -> dict:
    """Quantize the lm_head (MatMulNBits) and the token embedding (GatherBlockQuantized).

    A tied pair at the same precision shares one quantized matrix, stored once: the head reads it as
    ``B`` (vocab, K/block, block*bits/8), the embedding gathers rows of the same tensor.
    """
    model = load_onnx(src)
    pair = _find_pair(model.graph, settings.block_size)
    head_prec, emb_prec, kept = _precisions(pair, settings)
    shared = pair.tied and head_prec == emb_prec and head_prec != "fp32"
    w = _Parts(settings.block_size, halves=settings.accuracy_level == 0)
    info: dict[str, Any] = {"tied": pair.tied, "kept_int4_grid": kept}
    new_nodes: list = []
    removed: list = []
    head_parts: list[tuple[str, str, str, int]] = []
    if pair.head is not None and head_prec != "fp32":
        head_parts = w.quantized("shared_embedding" if shared else "lm_head", pair.head_w, BITS[head_prec])
        new_nodes.append((pair.head, _head_nodes(pair, head_parts, w, settings)))
        removed += [pair.transpose] if pair.transpose is not None else []
    info["head"] = head_prec if head_parts else "fp32" if pair.head is not None else "not found"
    info["int8_as_4bit_halves"] = len(head_parts) > 1
    info["rescore_top_k"] = settings.rescore_top_k if head_parts else 0
    info["embedding"], info["shared"] = emb_prec, bool(shared) and emb_prec != "fp32"
    if emb_prec != "fp32":
        parts = head_parts if shared else w.quantized("embedding", pair.emb, BITS[emb_prec], read_by_head=False)
        new_nodes.append((pair.gather, _embedding_nodes(pair, parts, w, settings.gather)))
        info["gather"] = settings.gather
    _write(model, new_nodes, removed, w, dst)
    return info


def _write(model, new_nodes: list, removed: list, w: _Parts, dst: Path) -> None:
    """Splice the new nodes in, the nodes on constants first, and save (checked where it fits)."""
    import onnx

    g = model.graph
    splice(g, new_nodes, tuple(removed))
    g.initializer.extend(w.inits)
    if w.first:
        nodes = list(g.node)
        del g.node[:]
        g.node.extend([*w.first, *nodes])
    ensure_ms_domain(model)
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.checker.check_model(model)
    save_onnx(model, dst, external=True)
