"""Small readers of an ONNX graph the rewrites share: who reads a tensor, what a constant holds,
which nodes an output needs; and the notes an export writes into the graph's metadata for them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

ATTENTION_NOTES = "edgekd.attention"  # ONNX metadata: per layer {"scale", "window", "softcap"} (see attention_notes)


def attention_notes(model) -> list[dict[str, Any]] | None:
    """Each decoder layer's attention scale, sliding window and logit soft-cap, read from the
    PyTorch modules (``scaling``, ``sliding_window``, ``attn_logit_softcapping``; a Mistral-style
    model keeps its window in the config); None when the model has no ``model.layers[i].self_attn``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    config = model.config
    notes = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            return None
        window = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") else (
            getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None)
        scale = getattr(attn, "scaling", None)
        softcap = getattr(attn, "attn_logit_softcapping", None)
        notes.append({"scale": float(scale) if scale is not None else None, "window": int(window) if window else None,
                      "softcap": float(softcap) if softcap else None})
    return notes


def read_notes(model, key: str) -> Any:
    """The JSON an export wrote into ``model``'s metadata under ``key`` (None when absent)."""
    for p in model.metadata_props:
        if p.key == key:
            return json.loads(p.value)
    return None


def dim(value_info, axis: int) -> int | None:
    d = value_info.type.tensor_type.shape.dim[axis]
    return d.dim_value if d.HasField("dim_value") else None


def consumers_of(graph) -> dict[str, list]:
    """Each tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def chain_end(start: str, consumers: dict[str, list]) -> str:
    """Follow ``start`` through single-consumer Mul/Cast/Unsqueeze nodes (attention scaling, dtype,
    broadcast axes) to the tensor the layers share."""
    t = start
    for _ in range(8):
        c = consumers.get(t, [])
        if len(c) != 1 or c[0].op_type not in ("Mul", "Cast", "Unsqueeze"):
            return t
        t = c[0].output[0]
    return t


def constants(graph) -> set[str]:
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def constant(name: str, producer: dict[str, Any]) -> np.ndarray | None:
    """The value of ``name`` where a ``Constant`` node makes it, else None."""
    from onnx import numpy_helper

    p = producer.get(name)
    if p is None or p.op_type != "Constant":
        return None
    value = next((a.t for a in p.attribute if a.name == "value"), None)
    return None if value is None else numpy_helper.to_array(value)


def slice_bounds(node, producer: dict[str, Any]) -> tuple[int, int | None, int] | None:
    """A one-axis ``Slice``'s constant ``(start, end, axis)``; ``end`` None where it is computed
    (a rotary slice's end is the table's width); None where start or axis is not a constant."""
    if node.op_type != "Slice" or len(node.input) < 4 or not node.input[3]:
        return None
    start, end, axes = (constant(node.input[j], producer) for j in (1, 2, 3))
    if start is None or axes is None or start.size != 1 or axes.size != 1:
        return None
    return int(start.ravel()[0]), None if end is None else int(end.ravel()[0]), int(axes.ravel()[0])


def starts_at_zero(node, producer: dict[str, Any]) -> bool:
    """A ``Slice`` that starts at 0 on the last axis of (batch, heads, seq, head_dim) (its end is left
    to the caller to know)."""
    bounds = slice_bounds(node, producer)
    return bounds is not None and bounds[0] == 0 and bounds[2] in (-1, 3)


def needed(nodes: list, outputs: list[str], given: frozenset[str] = frozenset()) -> list:
    """The nodes of ``nodes`` (in their order) that ``outputs`` depend on, the tensors in ``given``
    taken as known."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        k = producer.get(t)
        if t in given or k is None or k in keep:
            continue
        keep.add(k)
        stack.extend(nodes[k].input)
    return [nodes[k] for k in sorted(keep)]
