"""Step ``logits_to_keep``: the head computes logits for the last positions only, unless asked for all.

A decoder exported as optimum exports it computes the head for every position of the input: a
prompt of 480 tokens makes 480 rows of logits, of which generation reads the last. For a large
vocabulary that is most of the memory a run needs (Gemma 3: 480 x 262,144 x 4 bytes = 503 MB, more
again for each copy the head makes on the way). This step puts a ``Slice`` on the positions in front
of the head, read from a new input ``logits_to_keep`` (an int64 scalar), as transformers'
``logits_to_keep`` argument and onnxruntime-genai's pruned head do:

- ``logits_to_keep = k > 0``: the logits of the last ``k`` positions (all of them for a shorter input);
- ``logits_to_keep = 0``: every position (scoring a text teacher-forced in one run).

The input has a default (an initializer of the same name, which onnxruntime lets a caller
override), ``default`` in the profile: an app that never feeds it gets the last position's logits
in a prefill, which is all that generation reads. The graph's ``logits`` output becomes
``(batch, kept, vocab)``.

Where the slice goes: in front of the tensor the logits depend on alone (with constants), the last
layer's output, so the final norm and the head run on the kept rows only. The rewritten graph is
checked against the original on a random prompt (every position at ``logits_to_keep = 0``, the last
at the default); a graph where no such tensor exists, or that disagrees, goes on as it was and the
recipe says why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edgekd.device.config import require
from edgekd.device.session import LOGITS_TO_KEEP as INPUT
from edgekd.export.steps import StepSettings, load_onnx, save_onnx, step


@dataclasses.dataclass(frozen=True)
class LogitsToKeep(StepSettings):
    """Step ``logits_to_keep``: an input that says how many of the last positions the head computes
    (0: all); its ``default`` applies where an app does not feed it."""

    default: int = 1           # positions whose logits a run returns when not told: 1 is what generation reads
    tolerance: float = 1e-4    # largest |logit difference| to the original graph accepted

    def __post_init__(self):
        require(self.default >= 0, f"logits_to_keep.default = {self.default}: use 1 (the last position) or 0 (all)")
        require(self.tolerance > 0, "logits_to_keep.tolerance must be > 0")


def head_input(graph) -> str | None:
    """The tensor in front of the head: the latest from which ``logits`` is computed with constants
    alone whose computation still holds every node that reads the head's weights (the final norm's
    output, so onnxruntime still fuses the last residual add into the norm); None where the graph
    has none."""
    from edgekd.export.graph import constants, needed

    nodes = list(graph.node)
    known = constants(graph) | {""}
    producer = {o: n for n in nodes for o in n.output}
    cones: dict[str, list] = {}  # tensor -> the nodes between it and the logits, for each that suffices
    frontier, seen = ["logits"], set()
    while frontier:  # tensors on the logits' side, nearest the head first
        t = frontier.pop(0)
        if t in seen or t in known or t not in producer:
            continue
        seen.add(t)
        cone = needed(nodes, ["logits"], frozenset({t}))
        made = {o for n in cone for o in n.output}
        if all(i in made or i in known or i == t for n in cone for i in n.input):
            cones[t] = cone
        frontier.extend(producer[t].input)
        if len(seen) > 200:  # the head and the final norm are a few nodes: past this we are inside the layers
            break
    if not cones:
        return None
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    widest = max(cones.values(), key=len)
    heaviest = max((sizes.get(i, 0) for n in widest for i in n.input), default=0)
    heads = {id(n) for n in widest if any(sizes.get(i, 0) * 2 >= heaviest for i in n.input)}  # a matrix split in two halves too
    holding = [t for t, cone in cones.items() if heads <= {id(n) for n in cone}]
    return min(holding, key=lambda t: len(cones[t]))


def add_input(model, tensor: str, default: int) -> None:
    """Insert ``Slice(tensor, -logits_to_keep, end, axis 1)`` in front of every reader of ``tensor``,
    with the overridable input ``logits_to_keep`` (int64 scalar, ``default``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    kept = f"{tensor}/kept"
    readers = [n for n in g.node if tensor in n.input]
    for n in readers:
        for k, name in enumerate(n.input):
            if name == tensor:
                n.input[k] = kept
    g.initializer.append(numpy_helper.from_array(np.array(default, dtype=np.int64), INPUT))
    g.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, []))
    consts = {"/logits_to_keep/shape": [1], "/logits_to_keep/end": [np.iinfo(np.int64).max], "/logits_to_keep/axis": [1]}
    for name, value in consts.items():
        g.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    first = min(k for k, n in enumerate(g.node) if n in readers)
    new = [
        helper.make_node("Neg", [INPUT], ["/logits_to_keep/neg"], name="/logits_to_keep/Neg"),
        helper.make_node("Reshape", ["/logits_to_keep/neg", "/logits_to_keep/shape"], ["/logits_to_keep/start"],
                         name="/logits_to_keep/Reshape"),
        helper.make_node("Slice", [tensor, "/logits_to_keep/start", "/logits_to_keep/end", "/logits_to_keep/axis"], [kept],
                         name="/logits_to_keep/Slice"),
    ]
    for k, node in enumerate(new):
        g.node.insert(first + k, node)
    out = next(o for o in g.output if o.name == "logits")
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 3:  # declared as what a run returns when not told: onnxruntime-genai sizes its buffer from it
        dims[1].Clear()
        if default == 1:
            dims[1].dim_value = 1
        else:
            dims[1].dim_param = "kept_positions"
    if model.ByteSize() < 2_000_000_000:  # the checker serializes the model: protobuf's limit
        onnx.checker.check_model(model, full_check=False)


def _last_rows_agree(a, b, default: int, seed: int = 1) -> float:
    """Largest |difference| between the original graph's (session ``a``) last ``default`` rows and
    what the new graph (``b``) returns when not told, on a random 12-token prompt."""
    from edgekd.export.fuse import random_probe
    from edgekd.export.onnx import feeds_for

    ids, facts = random_probe(a, seed)
    full = a.run(["logits"], feeds_for(a.get_inputs(), ids, None, facts))[0]
    kept = b.run(["logits"], feeds_for(b.get_inputs(), ids, None, facts))[0]
    want = full[:, -default:] if default else full
    return float("inf") if kept.shape != want.shape else float(np.abs(kept - want).max())


@step("logits_to_keep", LogitsToKeep)
def logits_to_keep(src: Path, dst: Path, settings: LogitsToKeep, profile) -> dict:
    """Logits for the last ``default`` positions unless the input ``logits_to_keep`` asks for more."""
    from edgekd.export.fuse import agreement
    from edgekd.export.onnx import session

    model = load_onnx(src)
    if any(i.name == INPUT for i in model.graph.input):
        save_onnx(model, dst, external=True)
        return {"kept_positions": settings.default, "note": "the graph already has the input"}
    tensor = head_input(model.graph)
    why = "" if tensor else "found no tensor in front of the head that the logits depend on alone"
    if tensor:
        add_input(model, tensor, settings.default)
        save_onnx(model, dst, external=True)
        a, b = session(src), session(dst)  # each graph opened once for both comparisons
        diff = max(agreement(a, b), _last_rows_agree(a, b, settings.default))
        if diff > settings.tolerance:
            why = f"the graph with the input differs from the original by {diff:.2g} (> logits_to_keep.tolerance = {settings.tolerance})"
    if why:  # the graph goes on as it was
        save_onnx(load_onnx(src), dst, external=True)
        return {"kept_positions": 0, "not_applied": why}
    return {"kept_positions": settings.default, "sliced_at": tensor, "max_abs_diff_vs_original": diff}
