"""Step ``fuse_attention``: each layer's attention as one onnxruntime ``GroupQueryAttention`` node.

The graph rewrite is ``edgekd.export.fuse``; this step checks it against the unfused graph and keeps
the unfused one, saying why, where it does not recognise the graph or the two disagree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgekd.device.config import require
from edgekd.export.steps import StepSettings, ensure_ms_domain, load_onnx, save_onnx, step


@dataclasses.dataclass(frozen=True)
class FuseAttention(StepSettings):
    """Step ``fuse_attention``: each layer's attention as one onnxruntime ``GroupQueryAttention``
    node (rotary, cache append, causal softmax in one kernel). Checked against the unfused graph;
    a graph it does not recognise, or that disagrees, is kept unfused and the recipe says why."""

    max_positions: int = 8192  # rotary table length: the bundle's context is capped at this
    pack_qkv: bool = True      # q, k, v weights as one MatMul (GroupQueryAttention's packed input)
    tolerance: float = 1e-3    # largest |logit or cache difference| to the unfused graph accepted

    def __post_init__(self):
        require(self.max_positions >= 16, f"fuse_attention.max_positions = {self.max_positions}: use at least 16 (8192 is the usual)")
        require(self.tolerance > 0, "fuse_attention.tolerance must be > 0")


@step("fuse_attention", FuseAttention)
def fuse_attention(src: Path, dst: Path, settings: FuseAttention, profile) -> dict:
    """Each layer's attention as one GroupQueryAttention node, checked against the unfused graph."""
    from edgekd.export.fuse import NotFusable, agreement, fuse_gqa
    from edgekd.export.onnx import session

    model = load_onnx(src)
    try:
        fused = fuse_gqa(model, settings.max_positions, settings.pack_qkv)
    except NotFusable as e:
        fused, why = None, str(e)
    else:
        ensure_ms_domain(model)
        save_onnx(model, dst, external=True)
        diff = agreement(session(src), session(dst))
        why = "" if diff <= settings.tolerance else (
            f"the fused graph differs from the unfused one by {diff:.2g} (> fuse_attention.tolerance = {settings.tolerance})")
    if fused is None or why:  # the graph goes on as it was
        save_onnx(load_onnx(src), dst, external=True)
        return {"fused_layers": 0, "not_fused": why}
    return {"fused_layers": fused.layers, "packed_qkv_layers": fused.packed, "qk_norm_layers": fused.normed,
            "sliding_window_layers": fused.windowed, "rotary_tables": fused.tables,
            "context_length_cap": settings.max_positions, "max_abs_diff_vs_unfused": diff}
