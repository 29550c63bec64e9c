"""onnxruntime's own optimizer, and its ORT flatbuffer format for mobile and minimal builds.

Two export steps live here: ``optimize`` (onnxruntime's offline graph fusions, saved as .onnx) and
``to_ort`` (the same, then the ORT format).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from edgekd.device.errors import EdgekdError, first_line
from edgekd.export.steps import StepSettings, load_onnx, save_onnx, step


@dataclasses.dataclass(frozen=True)
class Optimize(StepSettings):
    """Step ``optimize``: onnxruntime's offline graph optimization for the first execution provider."""

    level: Literal["basic", "extended", "all"] = "basic"


@dataclasses.dataclass(frozen=True)
class OrtFormat(StepSettings):
    """Step ``to_ort``: convert to the ORT flatbuffer format (smaller runtime, mobile builds)."""

    level: Literal["disable", "basic", "extended", "all"] = "basic"
    constant_folding: bool = True  # false keeps float16 constants and shared scales unfolded in the file (smaller)


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
    from edgekd.device.session import choose_providers

    chosen, _ = choose_providers(providers, warn=False)
    try:
        ort.InferenceSession(str(src), so, providers=chosen, disabled_optimizers=[] if fold else ["ConstantFolding"])
    except Exception as e:
        first = first_line(e)
        raise EdgekdError(f"onnxruntime could not optimize/convert the model: {first}") from None


@step("optimize", Optimize)
def optimize(src: Path, dst: Path, settings: Optimize, profile) -> dict:
    """onnxruntime's offline graph optimizations (fusions) for the profile's first execution provider."""
    _ort_save(src, dst, settings.level, profile.execution_providers, ort_format=False)
    return {}


@step("to_ort", OrtFormat, suffix=".ort")
def to_ort(src: Path, dst: Path, settings: OrtFormat, profile) -> dict:
    """Convert to the ORT flatbuffer format, for onnxruntime's mobile and minimal builds.

    The graph is optimized at the profile's level and saved as .onnx first, its inner names
    shortened (``compact_names``), then converted with no further optimization: the same graph, a
    file smaller by the names (Gemma 3 270M's mobile bundle: 0.4 MB).

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
    optimized = dst.parent / "optimized" / "model.onnx"
    _ort_save(src, optimized, settings.level, ["CPUExecutionProvider"], ort_format=False, fold=settings.constant_folding)
    model = load_onnx(optimized)
    saved = compact_names(model)
    compact = dst.parent / "compact" / "model.onnx"
    save_onnx(model, compact, external=True)
    _ort_save(compact, dst, "disable", ["CPUExecutionProvider"], ort_format=True, fold=False)
    return {"name_bytes_saved": saved}


def compact_names(model) -> int:
    """Rename every node, initializer and inner value of ``model`` to a short counter (the graph's
    inputs and outputs keep their names, which the runtime feeds and reads); returns the bytes of
    names saved. The exporter's names (``/model/layers.17/self_attn/q_proj/MatMul_output_0``) are
    stored once per node and once per value in an ORT file: a few hundred kB of a model. A graph
    with subgraphs (If, Loop) is left as it is."""
    g = model.graph
    if any(a.g.node or a.graphs for n in g.node for a in n.attribute):
        return 0
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {""}
    short: dict[str, str] = {}
    before = after = 0

    def rename(name: str) -> str:
        nonlocal before, after
        if name in keep:
            return name
        if name not in short:
            short[name] = _base36(len(short))
            before, after = before + len(name), after + len(short[name])
        return short[name]

    for t in g.initializer:
        t.name = rename(t.name)
    for v in g.value_info:
        v.name = rename(v.name)
    for i, n in enumerate(g.node):
        name = "n" + _base36(i)
        before, after = before + len(n.name), after + len(name)
        n.name = name
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
    return before - after


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        i, r = divmod(i, 36)
        s = digits[r] + s
        if not i:
            return "_" + s


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
