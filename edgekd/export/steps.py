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

from edgekd.errors import UsageError
from edgekd.export.grid import store_on_grid
from edgekd.io import quiet

StepFn = Callable[[Path, Path, Any, Any], dict]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn
    suffix: str = ".onnx"  # the file the step writes
    doc: str = ""


STEPS: dict[str, Step] = {}


def _road_order(name: str) -> int:
    from edgekd.targets import STEP_NAMES

    return STEP_NAMES.index(name) if name in STEP_NAMES else len(STEP_NAMES)


def step(name: str, suffix: str = ".onnx") -> Callable[[StepFn], StepFn]:
    def deco(fn: StepFn) -> StepFn:
        if name in STEPS:
            raise RuntimeError(f"step {name!r} registered twice")
        STEPS[name] = Step(name, fn, suffix, (fn.__doc__ or "").strip().splitlines()[0])
        for known in sorted(STEPS, key=_road_order):  # the road's order (targets.STEP_NAMES), whatever the imports'
            STEPS[known] = STEPS.pop(known)
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


# Steps with modules of their own register here: the head and embedding (edgekd/export/head.py),
# onnxruntime's own optimizer and its ORT format (edgekd/export/ort.py).
from edgekd.export import head as _head  # noqa: E402,F401
from edgekd.export import ort as _ort  # noqa: E402,F401

