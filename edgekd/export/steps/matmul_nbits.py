"""Step ``matmul_nbits``: block-wise weight-only quantization of every constant-weight MatMul
(onnxruntime's ``MatMulNBits``), by onnxruntime's quantizers or on a grid the weights already have.

Sources: MatMulNBits is an onnxruntime contrib op (docs/ContribOperators.md); HQQ is Badri & Shaji,
"Half-Quadratic Quantization of Large Machine Learning Models" (2023).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from edgekd.device.bundle import QatGrid
from edgekd.device.config import power_of_two, require
from edgekd.device.errors import UsageError
from edgekd.device.io import quiet
from edgekd.export.grid import store_on_grid
from edgekd.export.steps import StepSettings, load_onnx, save_onnx, step

GPTQ_ANSWER_TOKENS = 64  # the model's own answer tokens per GPTQ calibration prompt


@dataclasses.dataclass(frozen=True)
class MatMulNBits(StepSettings):
    """Step ``matmul_nbits``: block-wise weight-only quantization of every constant-weight MatMul."""

    bits: int = 8
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    algorithm: Literal["rtn", "hqq", "k_quant", "gptq"] = "rtn"  # onnxruntime's quantizers (matmul_nbits below); gptq:
    # edgekd.export.gptq rounds the PyTorch model to the symmetric 4-bit grid before export, keep_grid stores it
    gptq_prompts: int = 64  # gptq: calibration texts, shipped training prompts + the model's own greedy answers
    int8_nodes: tuple[str, ...] = ()  # node-name substrings kept at 8 bits when bits = 4
    fp32_activation_nodes: tuple[str, ...] = ()  # node-name substrings quantized with accuracy_level 0
    int8_activation_nodes: tuple[str, ...] = ()  # node-name substrings computed with accuracy_level 4 (int8 activations)
    keep_grid: bool = True  # a weight already on its grid (--qat-bits 4, a GGUF's Q4/Q5_0/Q6_K/Q8_0...) is stored on it, exactly
    grid_accuracy_level: int = 0  # the accuracy_level of those weights; at 0 (fp32 activations) an 8-bit grid (Q5_0,
    # Q6_K, Q8_0) is stored as two exact 4-bit halves: onnxruntime's 8-bit kernel is fast only at int8 activations
    grid_offsets: Literal["float32", "float16"] = "float32"  # how a grid's per-block offsets are stored (float16: half the bytes, a Cast)

    def __post_init__(self):
        require(self.bits in (4, 8), f"matmul_nbits.bits = {self.bits}: use 4 or 8")
        require(power_of_two(self.block_size) and self.block_size >= 16,
                f"matmul_nbits.block_size = {self.block_size}: use a power of two >= 16 (32 is the usual)")
        require(self.accuracy_level in (0, 1, 2, 3, 4),
                f"matmul_nbits.accuracy_level = {self.accuracy_level}: use 0 (default), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        require(self.grid_accuracy_level in (0, 1, 2, 3, 4),
                f"matmul_nbits.grid_accuracy_level = {self.grid_accuracy_level}: use 0 (fp32 activations), 1, 2, 3 or 4 (int8)")
        require(not (self.algorithm != "rtn" and self.bits != 4), f"matmul_nbits: algorithm '{self.algorithm}' needs bits = 4 (8-bit is rtn)")
        require(self.algorithm != "gptq" or (self.symmetric and self.keep_grid),
                "matmul_nbits: algorithm 'gptq' rounds to the symmetric grid that keep_grid stores: set symmetric = true, keep_grid = true")
        require(self.gptq_prompts >= 1, f"matmul_nbits.gptq_prompts = {self.gptq_prompts}: use at least 1 (64 is the usual)")
        both = sorted(set(self.fp32_activation_nodes) & set(self.int8_activation_nodes))
        require(not both, f"matmul_nbits: {both} is in both fp32_activation_nodes and int8_activation_nodes: name each pattern in one")

    def reproduces_qat_grid(self, qat: QatGrid, report: dict[str, Any] | None = None) -> bool:
        """Symmetric RTN with the trained block size and at least as many bits (a 4-bit grid point is
        also an 8-bit one: the 8-bit scale is the 4-bit scale / 16), or the weights kept on their own
        grid (``keep_grid``, a block size dividing the trained one)."""
        kept = self.keep_grid and qat.bits == 4 and qat.block_size % self.block_size == 0
        return kept or (self.algorithm == "rtn" and self.symmetric and self.block_size == qat.block_size
                        and self.bits >= qat.bits)

    def before_export(self, torch_model, tok, source, say: Callable[[str], None]) -> tuple[Any, dict | None]:
        """``algorithm = "gptq"``: a copy of the model whose decoder weights GPTQ rounded to the 4-bit
        grid (``edgekd.export.gptq``), which ``keep_grid`` then stores exactly; recorded as ``gptq``."""
        if self.algorithm != "gptq":
            return torch_model, None
        if source.kind == "gguf":
            say("gptq: not needed, a GGUF's weights are on their own grids (keep_grid stores them)")
            return torch_model, None
        from edgekd.device.data import load_records
        from edgekd.device.paths import SHIPPED_TRAIN, resource
        from edgekd.export.gptq import gptq_model, node_path, off_grid
        from edgekd.models import model_written_texts

        if not off_grid(torch_model, self.block_size):
            say("gptq: not needed, every decoder weight is on a 4-bit grid already (keep_grid stores it)")
            return torch_model, None
        t0 = time.time()
        records = load_records(resource(SHIPPED_TRAIN), limit=self.gptq_prompts)
        say(f"gptq: the model answers {len(records)} calibration prompts")
        texts = model_written_texts(torch_model, tok, [r["prompt"] for r in records], GPTQ_ANSWER_TOKENS)
        rounded, info = gptq_model(torch_model, texts, self.bits, self.block_size,
                                   leave=lambda name: any(p in node_path(name) for p in self.int8_nodes),  # 8-bit RTN's
                                   progress=lambda i, n: say(f"gptq: layer {i}/{n}") if i == n or i % 10 == 0 else None)
        return rounded, {"gptq": {**info, "seconds": round(time.time() - t0, 1)}}


@step("matmul_nbits", MatMulNBits)
def matmul_nbits(src: Path, dst: Path, settings: MatMulNBits, profile) -> dict:
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
