"""What ``edgekd export`` prints about the bundle it wrote, read from its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def summary(manifest_table: dict[str, Any], out: Path) -> tuple[list[str], list[str]]:
    """What ``edgekd export`` prints about the bundle it wrote: ``(lines, warnings)``."""
    from edgekd.device.bundle import Manifest

    m = Manifest(manifest_table)
    check = m.export_check
    lines = [f"wrote {out} ({m.target_name}): {m.model_file} {check['model_bytes'] / 1e6:.1f} MB "
             f"({check['size_ratio_vs_fp32']:.0%} of fp32), probe top-1 vs PyTorch {check['top1_agreement']:.3f}, "
             f"max |dlogit| {check['max_abs_logit_diff']:.3g}"]
    grid = next((r for r in m.data.get("recipe", []) if r.get("step") == "matmul_nbits" and r.get("kept_on_grid_matmuls")), None)
    if grid:
        offsets = f", {grid['grid_offset_matmuls']} with per-block offsets" if grid["grid_offset_matmuls"] else ""
        types = grid.get("kept_gguf_types")
        which = (f"their GGUF grids ({sum(types.values())} GGUF tensors: {', '.join(f'{n} {t}' for t, n in sorted(types.items()))})"
                 if types else "a 4-bit grid")
        lines.append(f"{grid['kept_on_grid_matmuls']} weights were already on {which} and are stored on it exactly{offsets} "
                     "(matmul_nbits.keep_grid)")
    fused = next((r for r in m.data.get("recipe", []) if r.get("step") == "fuse_attention"), None)
    if fused:
        lines.append(f"attention fused into GroupQueryAttention in {fused['fused_layers']} layers" if fused["fused_layers"]
                     else f"attention left unfused: {fused['not_fused']}")
    golden = check.get("golden")
    if golden:
        lines.append(f"greedy answers equal to PyTorch's on {golden['greedy_exact']:.0%} of {golden['prompts']} held-out prompts "
                     f"(mean common prefix {golden['greedy_prefix_tokens']:.1f} tokens; top-1 {golden['top1']:.3f}); "
                     "golden.json lets `edgekd check` repeat this on the device")
    warnings = []
    lost = next((r.get("gguf_types_not_kept") for r in m.data.get("recipe", []) if r.get("gguf_types_not_kept")), None)
    if lost:
        step = next(r for r in m.data["recipe"] if r.get("step") == "matmul_nbits")
        from edgekd.export.grid import module_of

        named = ", ".join(f"{module_of(node)} ({'+'.join(t)})" for node, t in list(lost.items())[:4])
        warnings.append(f"{len(lost)} GGUF weights have no exact home in MatMulNBits and were re-quantized by the profile "
                        f"({step['bits']}-bit {step['algorithm']}): {named}{', ...' if len(lost) > 4 else ''}")
    qat = m.source.quantization_aware
    if qat and not qat.reproduced_by_recipe:
        head_hint = ""
        if qat.head_bits:
            head_hint = f", and quantize_head_embedding head/embedding int{qat.head_bits} or fp32"
            if qat.head_bits == 4:
                head_hint += " (or int8 with keep_grid)"
        warnings.append(f"this student was distilled for the {qat.bits}-bit grid, block {qat.block_size} "
                        f"(--qat-bits), but {m.target_name} quantizes differently: use matmul_nbits with "
                        f"algorithm = \"rtn\", symmetric = true, block_size = {qat.block_size}, bits >= {qat.bits}"
                        + head_hint)
    budget = m.gates.get("max_size_mb")
    if budget is not None and check["model_bytes"] / 1e6 > budget:
        warnings.append(f"the model is over the target's size budget of {budget} MB: validate will fail it")
    lines.append(f"next: edgekd validate {out}")
    return lines, warnings
