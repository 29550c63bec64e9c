"""The export steps a profile names, in one registry. Each step is ``path in -> path out``.

A step is a function ``fn(src, dst, settings, profile) -> dict``: it reads the ONNX model at
``src``, writes its result at ``dst`` (``.onnx`` with external data beside it, or ``.ort`` for
``to_ort``), and returns facts worth recording in the manifest's recipe. ``settings`` is the
profile's table of the same name as the step (``None`` when the step has none). Register a step
where it is defined, with ``@step("name")``; ``tests/test_export_steps.py`` checks every name a
shipped profile uses is here.

Sources: MatMulNBits / GatherBlockQuantized are onnxruntime contrib ops (docs/ContribOperators.md);
HQQ is Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekd.errors import EdgekdError, UsageError, first_line
from edgekd.export.grid import exact_half, nibble_halves, pack_nibbles, splice, store_on_grid, zero_points
from edgekd.io import quiet

StepFn = Callable[[Path, Path, Any, Any], dict]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn
    suffix: str = ".onnx"  # the file the step writes
    doc: str = ""


STEPS: dict[str, Step] = {}


def step(name: str, suffix: str = ".onnx") -> Callable[[StepFn], StepFn]:
    def deco(fn: StepFn) -> StepFn:
        if name in STEPS:
            raise RuntimeError(f"step {name!r} registered twice")
        STEPS[name] = Step(name, fn, suffix, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# Saving: every intermediate and final .onnx keeps its weights in one external file beside it when
# asked or when the protobuf limit (2 GB) forces it.
PROTOBUF_LIMIT = 2_000_000_000


def save_onnx(model, path: Path, external: bool | None = None) -> None:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _ensure_ms_domain(model) -> None:
    import onnx

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


# ---------------------------------------------------------------------------------------------
@step("fuse_attention")
def fuse_attention(src: Path, dst: Path, settings, profile) -> dict:
    """Each layer's attention as one GroupQueryAttention node, checked against the unfused graph."""
    from edgekd.export.fuse import NotFusable, agreement, fuse_gqa

    model = load_onnx(src)
    try:
        fused = fuse_gqa(model, settings.max_positions, settings.pack_qkv)
    except NotFusable as e:
        fused, why = None, str(e)
    else:
        _ensure_ms_domain(model)
        save_onnx(model, dst, external=True)
        diff = agreement(src, dst)
        why = "" if diff <= settings.tolerance else (
            f"the fused graph differs from the unfused one by {diff:.2g} (> fuse_attention.tolerance = {settings.tolerance})")
    if fused is None or why:  # the graph goes on as it was
        save_onnx(load_onnx(src), dst, external=True)
        return {"fused_layers": 0, "not_fused": why}
    return {"fused_layers": fused.layers, "packed_qkv_layers": fused.packed, "qk_norm_layers": fused.normed,
            "sliding_window_layers": fused.windowed, "rotary_tables": fused.tables,
            "context_length_cap": settings.max_positions, "max_abs_diff_vs_unfused": diff}


# ---------------------------------------------------------------------------------------------
# quantize_head_embedding: the largest size win left by the stock quantizer (FACTS.md).
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


def _standard_gather(data: str, scales: str, shape_3d: str, ids: str, bits: int, zero: bool, out: str, name: str,
                     kb: int, block_size: int) -> tuple[list, list]:
    """GatherBlockQuantized's rows ``(batch, seq, kb, block)`` from standard operators: Gather the
    packed rows of ``data`` (vocab, kb, block*bits/8) and of the scales, split 4-bit bytes into their
    nibbles (low first) with Mod and Div, subtract the zero point (0 where ``zero``: a lower half of
    an int8 matrix; else 2**(bits-1)) and scale. Same initializers, so a tied head still shares them."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    P = name
    inits = [numpy_helper.from_array(np.array(0.0 if zero else 2.0 ** (bits - 1), np.float32), f"{P}.zero"),
             numpy_helper.from_array(np.array([0, 0, kb, block_size], np.int64), f"{P}.blocks_shape")]
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
              helper.make_node("Reshape", [scales, shape_3d], [f"{P}.scales3d"], name=f"{P}/Reshape_scales"),
              helper.make_node("Gather", [f"{P}.scales3d", ids], [f"{P}.row_scales"], axis=0, name=f"{P}/Gather_scales"),
              helper.make_node("Mul", [f"{P}.centred", f"{P}.row_scales"], [out], name=f"{P}/Mul")]
    return nodes, inits


@step("quantize_head_embedding")
def quantize_head_embedding(src: Path, dst: Path, settings, profile) -> dict:
    """Quantize the lm_head (MatMulNBits) and the token embedding (GatherBlockQuantized).

    A tied pair at the same precision shares one quantized matrix, stored once: the head reads it as
    ``B`` (vocab, K/block, block*bits/8), the embedding gathers rows of the same tensor. The stock
    quantizer cannot do this: it skips a head fed by a Transpose and refuses 8-bit Gathers.
    With ``keep_grid``, an int8 setting stores a matrix that already lies on the int4 grid (a head
    distilled with ``--qat-head-bits 4``) at int4: exact, where re-rounding to int8 would not be.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = load_onnx(src)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    bs = settings.block_size

    gather = next((n for n in g.node if n.op_type == "Gather" and len(n.input) == 2
                   and n.input[0] in inits and _reads_input_ids(n.input[1], producers)), None)
    if gather is None:
        raise EdgekdError("quantize_head_embedding: found no embedding Gather on input_ids in this graph: "
                          "remove the step from the profile's steps for this model")
    emb_name = gather.input[0]
    vocab, hidden = inits[emb_name].dims

    # The head: a MatMul producing (..., vocab) from a constant (K, vocab), possibly Transpose(embedding).
    head, head_w_name, head_transposed, transpose_node = None, None, False, None
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        b = n.input[1]
        if b in inits and list(inits[b].dims) == [hidden, vocab]:
            head, head_w_name = n, b
        elif b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits \
                and list(inits[producers[b].input[0]].dims) == [vocab, hidden]:
            head, head_w_name, head_transposed, transpose_node = n, producers[b].input[0], True, producers[b]
    tied = head is not None and head_transposed and head_w_name == emb_name
    if hidden % bs:
        raise EdgekdError(f"quantize_head_embedding: hidden size {hidden} is not a multiple of block_size {bs}: "
                          "choose a block_size that divides it")

    new_inits, new_nodes, remove_nodes = [], [], []
    info: dict[str, Any] = {"tied": bool(tied)}
    emb = numpy_helper.to_array(inits[emb_name])
    bits_of = {"int8": 8, "int4": 4}
    head_w = None
    if head is not None:
        head_w = emb if head_transposed else np.ascontiguousarray(numpy_helper.to_array(inits[head_w_name]).T)  # (vocab, hidden)
        if not tied and np.array_equal(head_w, emb):  # a tied head the exporter stored as its own transposed copy (Gemma 3)
            tied, head_w = True, emb
            info["tied"] = True

    kept: list[str] = []  # the matrices stored at int4 because they already lie on its grid

    def precision(asked: str, w, name: str) -> str:
        """int4 for a matrix already on the int4 grid (exact, and half the bytes of int8)."""
        if asked == "int8" and settings.keep_grid and w is not None and _on_int4_grid(w, bs):
            kept.append(name)
            return "int4"
        return asked

    head_prec = precision(settings.head, head_w, "head")
    if tied and settings.embedding == settings.head:
        emb_prec = head_prec  # one matrix: one decision
        if "head" in kept:
            kept.append("embedding")
    else:
        emb_prec = precision(settings.embedding, emb, "embedding")
    info["kept_int4_grid"] = kept
    shared = tied and head_prec == emb_prec and head_prec != "fp32"

    first: list = []  # nodes on constants, folded at load: fp16 scales cast back, the halves' scales and zero points

    # An int8 matrix at fp32 activations (accuracy_level 0) is stored as two exact 4-bit halves, as
    # matmul_nbits stores an 8-bit grid (grid.split_nodes): onnxruntime's 8-bit kernel is fast only
    # at int8 activations, and the head's int8 activations were what kept Gemma 3's bundle from
    # PyTorch's answers (top-1 0.989 -> 0.999, greedy identical 0.66 -> 0.98, docs/export.md).
    halves = settings.accuracy_level == 0

    def quantized(tag: str, rows_w, bits: int, read_by_head: bool = True) -> list[tuple[str, str, str, int]]:
        """The matrix as parts ``(data, scales, zero points or "", bits)`` whose sum it is (an
        embedding the head does not read stays one part: a Gather has no activations)."""
        q, s = _quantize_rows(rows_w, bits, bs)
        sn = f"{tag}.scales"
        scale_inits, cast = exact_half(np.ascontiguousarray(s.reshape(-1)), sn)
        new_inits.extend(scale_inits)
        first.extend(cast)
        if bits != 8 or not halves or not read_by_head:
            new_inits.append(numpy_helper.from_array(q, f"{tag}.q{bits}"))
            return [(f"{tag}.q{bits}", sn, "", bits)]
        half_inits, half_nodes, parts = nibble_halves(q, sn, tag)
        new_inits.extend(half_inits)
        first.extend(half_nodes)
        return [(data, scales, "zero" if zero else "", 4) for data, scales, zero in parts]

    def zeros(name: str, shape: list[int]) -> str:
        zp_inits, zp_nodes = zero_points(name, shape)
        new_inits.extend(zp_inits)
        first.extend(zp_nodes)
        return name

    def summed(parts_out: list[str], out: str, name: str) -> list:
        return [] if len(parts_out) == 1 else [helper.make_node("Add", parts_out, [out], name=name)]

    kb = hidden // bs
    if head is not None and head_prec != "fp32":
        parts = quantized("shared_embedding" if shared else "lm_head", head_w, bits_of[head_prec])
        outs = list(head.output) if len(parts) == 1 else [f"{head.output[0]}.part{j}" for j in range(len(parts))]
        nodes = [helper.make_node("MatMulNBits", [head.input[0], data, scales]
                                  + ([zeros(f"{data}.zero_points", [vocab * ((kb + 1) // 2)])] if zp else []),
                                  [o], name=head.name + "_Q" + (f"_{j}" if len(parts) > 1 else ""), domain="com.microsoft",
                                  K=int(hidden), N=int(vocab), bits=b, block_size=bs,
                                  accuracy_level=0 if len(parts) > 1 else settings.accuracy_level)
                 for j, ((data, scales, zp, b), o) in enumerate(zip(parts, outs))]
        new_nodes.append((head, nodes + summed(outs, head.output[0], head.name + "_halves")))
        if transpose_node is not None:
            remove_nodes.append(transpose_node)
        info["head"] = head_prec
        info["int8_as_4bit_halves"] = len(parts) > 1
        head_parts = parts
    else:
        info["head"] = "fp32" if head is not None else "not found"
        info["int8_as_4bit_halves"] = False
        head_parts = None

    if emb_prec != "fp32":
        if shared:
            assert head_parts is not None  # shared implies a tied head, quantized just above
            parts = head_parts
        else:
            parts = quantized("embedding", emb, bits_of[emb_prec], read_by_head=False)
        shape_3d, shape_out = f"{emb_name}.scales_shape", f"{emb_name}.out_shape"
        new_inits.append(numpy_helper.from_array(np.array([vocab, kb, 1], dtype=np.int64), shape_3d))
        new_inits.append(numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), shape_out))
        out = gather.output[0]
        blocks = [f"{out}.blocks{j}" for j in range(len(parts))]
        nodes = []
        for j, (data, scales, zp, b) in enumerate(parts):
            if settings.gather == "standard":
                part_nodes, part_inits = _standard_gather(data, scales, shape_3d, gather.input[1], b, bool(zp), blocks[j],
                                                          f"{gather.name}_part{j}", kb, bs)
                nodes += part_nodes
                new_inits.extend(part_inits)
                continue
            nodes += [helper.make_node("Reshape", [scales, shape_3d], [f"{scales}.gather_shape"], name=f"{gather.name}_scales{j}"),
                      helper.make_node("GatherBlockQuantized",
                                       [data, gather.input[1], f"{scales}.gather_shape"]
                                       + ([zeros(f"{data}.gather_zero_points", [vocab, kb, 1])] if zp else []),
                                       [blocks[j]], name=gather.name + "_Q" + (f"_{j}" if len(parts) > 1 else ""),
                                       domain="com.microsoft", bits=b, block_size=bs, gather_axis=0, quantize_axis=2)]
        nodes += summed(blocks, f"{out}.blocks", f"{gather.name}_halves")
        nodes.append(helper.make_node("Reshape", [blocks[0] if len(parts) == 1 else f"{out}.blocks", shape_out], [out],
                                      name=gather.name + "_flat"))
        new_nodes.append((gather, nodes))
        info["embedding"] = emb_prec
        info["shared"] = bool(shared)
        info["gather"] = settings.gather
    else:
        info["embedding"] = "fp32"
        info["shared"] = False

    splice(g, new_nodes, tuple(remove_nodes))
    g.initializer.extend(new_inits)
    if first:
        nodes = list(g.node)
        del g.node[:]
        g.node.extend([*first, *nodes])
    _ensure_ms_domain(model)
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.checker.check_model(model)
    save_onnx(model, dst, external=True)
    return info


# ---------------------------------------------------------------------------------------------
@step("matmul_nbits")
def matmul_nbits(src: Path, dst: Path, settings, profile) -> dict:
    """Block-wise weight-only quantization of every MatMul with a constant weight (MatMulNBits).

    ``algorithm``: onnxruntime's own quantizers, all of them writing MatMulNBits: ``rtn``
    (round to nearest), ``hqq`` (Badri & Shaji 2023, 4-bit), ``k_quant`` (llama.cpp's k-quant
    search for each block's scale and minimum, 4-bit). 8-bit nodes (``int8_nodes``, or
    ``bits = 8``) are RTN. ``gptq``: edgekd's own GPTQ rounded the PyTorch model to the symmetric
    4-bit grid before it was exported (``edgekd.export.gptq``), so ``keep_grid`` finds its weights
    on that grid and stores them exactly; any other weight is RTN. (onnxruntime's own GPTQ rounds
    exactly as RTN does in 1.32, and its symmetric packing adds error: ``benchmarks/ort_gptq_check.py``.)"""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    model = load_onnx(src)
    gemms = gemm_as_matmul(model)  # GPT-2's Conv1D layers export as Gemm, which MatMulNBits does not take

    def algo_config(bits: int):
        if bits == 4 and settings.algorithm == "hqq":
            return mq.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=4)
        if bits == 4 and settings.algorithm == "k_quant":
            if not hasattr(mq, "KQuantWeightOnlyQuantConfig"):
                import onnxruntime

                raise UsageError(f"matmul_nbits.algorithm = \"k_quant\": onnxruntime {onnxruntime.__version__} has no k-quant "
                                 "quantizer; install a newer onnxruntime (edgekd is tested with 1.32), or use rtn or hqq")
            return mq.KQuantWeightOnlyQuantConfig()
        return mq.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                               accuracy_level=settings.accuracy_level, bits=bits)

    def run(model, bits: int, include: list[str] | None, exclude: list[str]):
        q = mq.MatMulNBitsQuantizer(model, bits=bits, block_size=settings.block_size, is_symmetric=settings.symmetric,
                                    accuracy_level=settings.accuracy_level, nodes_to_include=include,
                                    nodes_to_exclude=exclude, algo_config=algo_config(bits))
        q.process()
        return q.model.model

    def matching(patterns) -> list[str]:
        return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(p in n.name for p in patterns)]

    before = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    fp32_act = set(matching(settings.fp32_activation_nodes)) if settings.fp32_activation_nodes else set()
    int8_act = set(matching(settings.int8_activation_nodes)) - fp32_act if settings.int8_activation_nodes else set()
    grid: dict[str, Any] = {"matmuls": [], "with_offsets": 0, "float16_offsets": 0, "types": {}, "not_kept": {}, "split": 0}
    if settings.keep_grid:  # weights already on a grid (a --qat-bits 4 student, a GGUF's types) stay on it, exactly
        grid = store_on_grid(model, before, settings.block_size, settings.grid_accuracy_level, settings.grid_offsets)
    on_grid = set(grid["matmuls"])
    made = {n.name for n in model.graph.node if n.op_type == "MatMul"} - before  # the grid's offset MatMuls: not weights
    with quiet():
        int8_nodes = [n for n in matching(settings.int8_nodes) if n not in made] if settings.bits == 4 and settings.int8_nodes else []
        if int8_nodes:  # onnxruntime's nodes_to_include adds to its op types, it does not restrict: exclude the rest
            model = run(model, 8, None, sorted((before | made) - set(int8_nodes)))
        model = run(model, settings.bits, None, sorted(set(int8_nodes) | made))
    # Set accuracy_level on the nodes this step made (HQQ's quantizer writes none): the node lists
    # first (a node in both gets fp32 activations), then the grid's (4-bit grids) or the step's level.
    quantized = set()
    for n in model.graph.node:
        original = n.name.rsplit("_Q", 1)[0]  # an 8-bit grid's two halves: _Q_hi, _Q_lo
        if n.op_type == "MatMulNBits" and original in before:
            level = settings.grid_accuracy_level if original in on_grid else settings.accuracy_level
            _set_int_attr(n, "accuracy_level", 0 if original in fp32_act else 4 if original in int8_act else level)
            quantized.add(original)
    count = len(quantized)
    left = sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.name not in made)
    save_onnx(model, dst, external=True)
    return {"quantized_matmuls": count, "gemm_as_matmul": gemms, "int8_matmuls": len(int8_nodes), "fp32_activation_matmuls": len(fp32_act),
            "int8_activation_matmuls": len(int8_act),
            "fp32_matmuls_left": left, "kept_on_grid_matmuls": len(on_grid), "grid_offset_matmuls": grid["with_offsets"],
            "grid_offsets_float16": grid["float16_offsets"], "kept_gguf_types": grid["types"],
            "gguf_types_not_kept": grid["not_kept"], "grid_8bit_as_4bit_halves": grid["split"]}


def gemm_as_matmul(model) -> int:
    """Rewrite each ``Gemm`` with a constant weight and the plain form (alpha = beta = 1, A not
    transposed) as ``MatMul`` (+ ``Add`` of its bias): the same numbers, and a node the weight-only
    quantizer takes. A ``transB`` weight is stored transposed once. Returns how many were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    count, nodes = 0, []
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if n.op_type != "Gemm" or not plain or len(n.input) < 2 or n.input[1] not in inits:
            nodes.append(n)
            continue
        weight = n.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight])
            t = numpy_helper.from_array(np.ascontiguousarray(w.T), weight + "_t")
            g.initializer.append(t)
            weight = t.name
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        out = n.output[0] + "_mm" if bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], weight], [out], name=n.name + "_MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [n.output[0]], name=n.name + "_Add"))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return count


def _set_int_attr(node, name: str, value: int) -> None:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


@step("quantize_dynamic")
def quantize_dynamic(src: Path, dst: Path, settings, profile) -> dict:
    """onnxruntime's dynamic int8 quantization (weights int8, activations quantized at run time)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        qd(str(src), str(dst), per_channel=settings.per_channel, weight_type=QuantType.QInt8,
           op_types_to_quantize=list(settings.op_types), use_external_data_format=True)
    return {}


@step("fp16")
def fp16(src: Path, dst: Path, settings, profile) -> dict:
    """Weights and ops in float16; inputs/outputs and the listed (overflow-prone) ops stay float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = load_onnx(src)
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(settings.keep_fp32_ops))
    nodes = [n.name for n in model.graph.node if any(p in n.name for p in settings.keep_fp32_nodes)]
    with quiet():
        model = convert_float_to_float16(model, keep_io_types=settings.keep_io_types, op_block_list=block,
                                         node_block_list=nodes, disable_shape_infer=model.ByteSize() > PROTOBUF_LIMIT)
    save_onnx(model, dst, external=True)
    return {"fp32_nodes": len(nodes)}


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def _ort_save(src: Path, dst: Path, level: str, providers, ort_format: bool, fold: bool = True) -> None:
    import onnxruntime as ort

    dst.parent.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.optimized_model_filepath = str(dst)
    if ort_format:
        so.add_session_config_entry("session.save_model_format", "ORT")
    else:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    from edgekd.runtime import choose_providers

    chosen, _ = choose_providers(providers, warn=False)
    try:
        ort.InferenceSession(str(src), so, providers=chosen, disabled_optimizers=[] if fold else ["ConstantFolding"])
    except Exception as e:
        first = first_line(e)
        raise EdgekdError(f"onnxruntime could not optimize/convert the model: {first}") from None


@step("optimize")
def optimize(src: Path, dst: Path, settings, profile) -> dict:
    """onnxruntime's offline graph optimizations (fusions) for the profile's first execution provider."""
    _ort_save(src, dst, settings.level, profile.execution_providers, ort_format=False)
    return {}


@step("to_ort", suffix=".ort")
def to_ort(src: Path, dst: Path, settings, profile) -> dict:
    """Convert to the ORT flatbuffer format, for onnxruntime's mobile and minimal builds.

    Without constant folding, the scales of a MatMulNBits at int8 activations (accuracy_level 4)
    are first made fp32 initializers where a node computes them (a float16 copy cast back,
    ``grid.exact_half``): onnxruntime 1.32 packs such a weight with its scales when the session
    loads, from an initializer only, and an ORT file is not folded at load; the teacher's mobile
    bundle drifted 40 logits so (top-1 0.0)."""
    if not settings.constant_folding:
        model = load_onnx(src)
        if _scales_as_initializers(model):
            src = dst.parent / "prepared" / "model.onnx"
            save_onnx(model, src, external=True)
    _ort_save(src, dst, settings.level, ["CPUExecutionProvider"], ort_format=True, fold=settings.constant_folding)
    return {}


def _scales_as_initializers(model) -> int:
    """Give each MatMulNBits at accuracy_level 4 whose scales a Cast of an initializer computes its
    own fp32 initializer of those scales; returns how many were changed."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    casts = {n.output[0]: n for n in g.node if n.op_type == "Cast" and n.input[0] in inits}
    changed = 0
    for n in g.node:
        level = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "accuracy_level"), 0)
        if n.op_type != "MatMulNBits" or level != 4 or n.input[2] not in casts:
            continue
        name = n.input[2] + ".fp32"
        if name not in inits:
            inits[name] = numpy_helper.from_array(numpy_helper.to_array(inits[casts[n.input[2]].input[0]]).astype(np.float32), name)
            g.initializer.append(inits[name])
        n.input[2] = name
        changed += 1
    return changed
