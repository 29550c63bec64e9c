"""Attention as one onnxruntime ``GroupQueryAttention`` node per layer (step ``fuse_attention``).

optimum exports each layer's attention as ~95 small nodes: reshapes of q/k/v and the shape
arithmetic behind them, rotary embedding (slices, negation, concatenation), the KV cache
concatenation, the key/value head repetition, the causal mask, softmax, and the output reshape.
At batch 1 the decode step is bound by the cost of running nodes, not by their arithmetic
(``benchmarks/decode_profile.py``: a third of the teacher's node time was shape and mask
arithmetic). onnxruntime's contrib op ``GroupQueryAttention`` (docs/ContribOperators.md) does all of
it in one kernel, rotary included, and is what onnxruntime-genai's model builder emits.

The rewrite keeps the bundle's inputs and outputs as they are (``attention_mask``, ``position_ids``,
``past_key_values.N.*`` -> ``present.N.*``, BNSH), so every runtime that fed the unfused graph feeds
this one. GroupQueryAttention takes ``seqlens_k`` (each row's length - 1) and the total length,
computed here from ``attention_mask``; the rotary tables are the model's own, evaluated from its graph
at positions ``0..max_positions-1`` (so any rope scaling the exporter traced is kept).

The step checks itself: the fused and the unfused graph run the same prompt and one cached step,
and the fusion is kept only if logits and cache agree within ``tolerance``; otherwise the unfused
graph goes on unchanged and the recipe says why. Positions come from the cache length, as
GroupQueryAttention computes them: right for the left-aligned, unpadded rows edgekd's runtime and
onnxruntime-genai feed at batch 1. GroupQueryAttention here attends to the whole cache: for a model
with a sliding attention window, export caps the bundle's context at the window, where the two agree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.grid import set_nodes, splice

_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")


class NotFusable(Exception):
    """The graph is not the attention this rewrite knows; the message says what differs."""


def _dim(value_info, axis: int) -> int | None:
    d = value_info.type.tensor_type.shape.dim[axis]
    return d.dim_value if d.HasField("dim_value") else None


def _consumers(graph) -> dict[str, list]:
    """Each tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def _chain_end(start: str, consumers: dict[str, list]) -> str:
    """Follow ``start`` through single-consumer Mul/Cast/Unsqueeze nodes (attention scaling, dtype,
    broadcast axes) to the tensor the layers share."""
    t = start
    for _ in range(8):
        c = consumers.get(t, [])
        if len(c) != 1 or c[0].op_type not in ("Mul", "Cast", "Unsqueeze"):
            return t
        t = c[0].output[0]
    return t


def rotary_tables(model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's own cos/sin tables ``(max_positions, head_dim / 2)``: its rotary subgraph run at
    positions ``0..max_positions-1``. Refuses an interleaved or partial rotary it cannot pass on."""
    import onnx
    import onnxruntime as ort

    g = model.graph
    consumers = _consumers(g)
    cos = [n for n in g.node if n.op_type == "Cos"]
    sin = [n for n in g.node if n.op_type == "Sin"]
    if len(cos) != 1 or len(sin) != 1:
        raise NotFusable(f"expected one shared rotary embedding (Cos/Sin), found {len(cos)}/{len(sin)}")
    names = [_chain_end(cos[0].output[0], consumers), _chain_end(sin[0].output[0], consumers)]
    if "position_ids" not in {i.name for i in g.input}:
        raise NotFusable("the graph has no position_ids input to evaluate its rotary embedding from")
    nodes = _needed(g, names)  # the rotary subgraph alone, with only the constants it reads
    used = {i for n in nodes for i in n.input}
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "rotary", [i for i in g.input if i.name in used],
                               [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names],
                               [t for t in g.initializer if t.name in used]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "position_ids":
            feeds[i.name] = np.arange(max_positions, dtype=np.int64).reshape(1, -1)
        elif i.name in ("input_ids", "attention_mask"):
            feeds[i.name] = np.ones((1, max_positions), dtype=np.int64)
        else:
            raise NotFusable(f"the rotary embedding reads {i.name}: not a position-only rotary")
    tables = []
    for t in sess.run(None, feeds):
        t = np.asarray(t, dtype=np.float32).reshape(max_positions, -1)
        half = t.shape[1] // 2
        if not np.array_equal(t[:, :half], t[:, half:]):
            raise NotFusable("the rotary tables are not two equal halves (interleaved or partial rotary)")
        tables.append(np.ascontiguousarray(t[:, :half]))
    return tables[0], tables[1]


def _needed(graph, outputs: list[str]) -> list:
    """The nodes ``outputs`` depend on, in graph order."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        k = producer.get(stack.pop())
        if k is None or k in keep:
            continue
        keep.add(k)
        stack.extend(nodes[k].input)
    return [nodes[k] for k in sorted(keep)]


def _projection(by_name: dict[str, Any], consumers: dict[str, list], layer: int, proj: str) -> Any:
    """The node computing layer ``layer``'s ``proj`` projection (its bias Add where it has one)."""
    n = by_name.get(f"/model/layers.{layer}/self_attn/{proj}/MatMul")
    if n is None:
        raise NotFusable(f"layer {layer} has no {proj} MatMul (fused qkv or another naming)")
    after = consumers.get(n.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and after[0].name == f"/model/layers.{layer}/self_attn/{proj}/Add":
        return after[0]
    return n


def fuse_gqa(model, max_positions: int, pack_qkv: bool = True) -> tuple[int, int]:
    """Rewrite ``model`` in place: each layer's attention becomes one GroupQueryAttention node (a
    com.microsoft op: the caller declares the domain). ``pack_qkv``: where q, k and v are bias-free projections of one input, their weights become one
    (K, q + k + v) MatMul feeding GroupQueryAttention's packed input (one weight read, one node, and
    one set of grid offsets instead of three). Returns (layers fused, layers packed); raises
    ``NotFusable`` (the model untouched) when the graph is not the attention it knows."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inputs = {i.name: i for i in g.input}
    layers = sorted(int(m.group(1)) for m in map(_PAST.match, inputs) if m)
    if not layers or "attention_mask" not in inputs:
        raise NotFusable("no past_key_values.N.key / attention_mask inputs: not a decoder with a KV cache")
    first = inputs[f"past_key_values.{layers[0]}.key"]
    kv_heads, head_dim = _dim(first, 1), _dim(first, 3)
    if not kv_heads or not head_dim:
        raise NotFusable("the cache's head count and head size are not fixed in the graph")
    if first.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise NotFusable("the cache is not float32 (fuse before converting to float16)")
    by_name = {n.name: n for n in g.node}
    consumers = _consumers(g)
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    plans = []
    for i in layers:
        q, k, v = (_projection(by_name, consumers, i, p) for p in ("q_proj", "k_proj", "v_proj"))
        o = by_name.get(f"/model/layers.{i}/self_attn/o_proj/MatMul")
        weight = inits.get(by_name[f"/model/layers.{i}/self_attn/q_proj/MatMul"].input[1])
        if o is None or weight is None or len(weight.dims) != 2:
            raise NotFusable(f"layer {i}: no o_proj MatMul or no constant q_proj weight")
        q_width = int(weight.dims[1])
        if q_width % head_dim:
            raise NotFusable(f"layer {i}: q_proj width {q_width} is not a multiple of the head size {head_dim}")
        present = (f"present.{i}.key", f"present.{i}.value")
        if not all(p in outputs for p in present):
            raise NotFusable(f"layer {i} has no {present[0]} output")
        plans.append((i, q, k, v, o, q_width // head_dim, present))
    cos, sin = rotary_tables(model, max_positions)
    if cos.shape[1] * 2 != head_dim:
        raise NotFusable(f"the rotary covers {cos.shape[1] * 2} of {head_dim} head channels (partial rotary)")

    P = "edgekd_gqa"
    new_inits = [numpy_helper.from_array(cos, f"{P}.cos_cache"), numpy_helper.from_array(sin, f"{P}.sin_cache"),
                 numpy_helper.from_array(np.array([1], np.int64), f"{P}.axis1"),
                 numpy_helper.from_array(np.array(1, np.int64), f"{P}.one"),
                 numpy_helper.from_array(np.array(1, np.int64), f"{P}.index1")]
    shared = [  # seqlens_k = rows' lengths - 1 and the total length, from the attention mask (int32)
        helper.make_node("ReduceSum", ["attention_mask", f"{P}.axis1"], [f"{P}.lengths"], keepdims=0, name=f"{P}/ReduceSum"),
        helper.make_node("Sub", [f"{P}.lengths", f"{P}.one"], [f"{P}.seqlens64"], name=f"{P}/Sub"),
        helper.make_node("Cast", [f"{P}.seqlens64"], [f"{P}.seqlens_k"], to=TensorProto.INT32, name=f"{P}/Cast_seqlens"),
        helper.make_node("Shape", ["attention_mask"], [f"{P}.mask_shape"], name=f"{P}/Shape"),
        helper.make_node("Gather", [f"{P}.mask_shape", f"{P}.index1"], [f"{P}.total64"], axis=0, name=f"{P}/Gather"),
        helper.make_node("Cast", [f"{P}.total64"], [f"{P}.total_len"], to=TensorProto.INT32, name=f"{P}/Cast_total"),
    ]
    producer = {out: (n, j) for n in g.node for j, out in enumerate(n.output)}
    replace: list[tuple[Any, list]] = []
    packed = 0
    for i, q, k, v, o, heads, present in plans:
        for p in present:  # the unfused cache outputs are renamed, so dead-node removal drops them
            n, j = producer[p]
            n.output[j] = f"{p}.unfused"
        out = f"/model/layers.{i}/self_attn/{P}_output"
        qkv, nodes = [q.output[0], k.output[0], v.output[0]], []
        projections = (q, k, v)
        if pack_qkv and all(n.op_type == "MatMul" and n.input[1] in inits for n in projections) \
                and len({n.input[0] for n in projections}) == 1:
            w = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in projections], axis=1)
            name = f"/model/layers.{i}/self_attn/qkv_proj/MatMul"
            new_inits.append(numpy_helper.from_array(w, f"model.layers.{i}.self_attn.qkv_proj.weight"))
            nodes.append(helper.make_node("MatMul", [q.input[0], f"model.layers.{i}.self_attn.qkv_proj.weight"],
                                          [name + "_output_0"], name=name))
            qkv, packed = [name + "_output_0", "", ""], packed + 1
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             f"{P}.seqlens_k", f"{P}.total_len", f"{P}.cos_cache", f"{P}.sin_cache"],
            [out, *present], name=f"/model/layers.{i}/self_attn/GroupQueryAttention", domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0))
        replace.append((o, [*nodes, o]))  # GroupQueryAttention (and the packed q/k/v) just before o_proj
        o.input[0] = out
    top = g.node[0]  # the shared nodes read only graph inputs and constants: they go first
    splice(g, [(top, [*shared, top]), *replace])
    g.initializer.extend(new_inits)
    _drop_dead(g)
    return len(plans), packed


def _drop_dead(graph) -> None:
    """Remove the nodes no graph output depends on, then the initializers nothing reads."""
    set_nodes(graph, _needed(graph, [o.name for o in graph.output]))


def agreement(unfused: Path, fused: Path, seed: int = 0) -> float:
    """Largest |difference| between the two graphs' logits and caches on a random 12-token prompt
    and one cached step."""
    from edgekd.export.onnx import ort_forward, session

    a, b = session(unfused), session(fused)
    first = next(i for i in a.get_inputs() if i.name.startswith("past_key_values."))
    facts = {"num_kv_heads": first.shape[1], "head_dim": first.shape[3]}
    vocab = a.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 100
    ids = np.random.default_rng(seed).integers(0, vocab, size=(1, 12), dtype=np.int64)
    worst = 0.0
    past_a = past_b = None
    for step_ids in (ids, ids[:, -1:]):
        la, past_a = ort_forward(a, step_ids, past_a, facts)
        lb, past_b = ort_forward(b, step_ids, past_b, facts)
        worst = max(worst, float(np.abs(la - lb).max()),
                    max(float(np.abs(past_a[n] - past_b[n]).max()) for n in past_a))
    return worst
