"""Step ``quantize_dynamic``: onnxruntime's dynamic int8 quantization, the naive anchor (it breaks SmolLM2: top-1 0.586; docs/export.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgekd.device.bundle import QatGrid
from edgekd.device.io import quiet
from edgekd.export.steps import StepSettings, step


@dataclasses.dataclass(frozen=True)
class QuantizeDynamic(StepSettings):
    """Step ``quantize_dynamic``: onnxruntime's dynamic int8 (the naive anchor; docs/export.md)."""

    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gather")

    def reproduces_qat_grid(self, qat: QatGrid, report: dict[str, Any] | None = None) -> bool:
        return False  # it re-rounds every weight to its own int8 grid


@step("quantize_dynamic", QuantizeDynamic)
def quantize_dynamic(src: Path, dst: Path, settings: QuantizeDynamic, profile) -> dict:
    """onnxruntime's dynamic int8 quantization (weights int8, activations quantized at run time)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        qd(str(src), str(dst), per_channel=settings.per_channel, weight_type=QuantType.QInt8,
           op_types_to_quantize=list(settings.op_types), use_external_data_format=True)
    return {}
