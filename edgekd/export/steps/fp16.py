"""Step ``fp16``: weights and most ops in float16 (onnxruntime's converter), for GPUs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgekd.device.io import quiet
from edgekd.export.steps import PROTOBUF_LIMIT, StepSettings, load_onnx, save_onnx, step


@dataclasses.dataclass(frozen=True)
class Fp16(StepSettings):
    """Step ``fp16``: weights and most ops in float16."""

    keep_io_types: bool = True
    keep_fp32_ops: tuple[str, ...] = ()
    keep_fp32_nodes: tuple[str, ...] = ()  # node-name substrings kept float32 (e.g. the norms)


@step("fp16", Fp16)
def fp16(src: Path, dst: Path, settings: Fp16, profile) -> dict:
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
