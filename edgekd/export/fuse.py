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
at positions ``0..max_positions-1`` (so any rope scaling the exporter traced is kept), one pair per
rotary embedding the layers use (Gemma 3's sliding-window layers rotate with another base than its
global ones). Where a layer normalises its queries and keys before the rotary (Qwen 3, OLMo 2,
Gemma 3), GroupQueryAttention reads the normalised tensors: the graph's own norm nodes stay. What the
graph does not show, each layer's attention scale, sliding window and logit soft-capping, comes from
the PyTorch modules, written into the ONNX file's metadata at export (``ATTENTION_NOTES``).

The step checks itself: the fused and the unfused graph run the same prompt and one cached step,
and the fusion is kept only if logits and cache agree within ``tolerance``; otherwise the unfused
graph goes on unchanged and the recipe says why. Positions come from the cache length, as
GroupQueryAttention computes them: right for the left-aligned, unpadded rows edgekd's runtime and
onnxruntime-genai feed at batch 1. A sliding window is GroupQueryAttention's ``local_window_size``,
set to the model's window: the fused and the unfused graph agree then on prompts longer than the
window (window - 1 differs; ``tests/test_families.py`` exports windows shorter than its prompts).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from edgekd.export.graph import ATTENTION_NOTES, chain_end, constants, consumers_of, dim, needed, read_notes, slice_bounds, starts_at_zero
from edgekd.export.grid import set_nodes, splice

_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")
class NotFusable(Exception):
    """The graph is not the attention this rewrite knows; the message says what differs."""


_TABLE_OPS = ("Cast", "Unsqueeze", "Squeeze", "Mul", "Reshape", "Expand", "Gather", "Slice")


def _table_roots(graph) -> dict[str, str]:
    """Each tensor computed from a rotary table alone (a Cos or Sin output, cast, unsqueezed or
    scaled by constants) -> the tensor its Cos/Sin read: one root per rotary embedding."""
    const = constants(graph)
    roots: dict[str, str] = {}
    for n in graph.node:
        if n.op_type in ("Cos", "Sin"):
            roots[n.output[0]] = n.input[0]
        elif n.op_type in _TABLE_OPS and n.input and n.input[0] in roots and all(i in const or not i for i in n.input[1:]):
            roots[n.output[0]] = roots[n.input[0]]
    return roots


def _probe_feeds(inputs, max_positions: int) -> dict[str, np.ndarray]:
    """Feeds that put positions ``0..max_positions-1`` through a rotary subgraph: ``position_ids``
    where the graph has it, else a prompt of that length after an empty cache (the positions the
    graph computes from the cache length)."""
    feeds: dict[str, np.ndarray] = {}
    for i in inputs:
        if i.name == "position_ids":
            feeds[i.name] = np.arange(max_positions, dtype=np.int64).reshape(1, -1)
        elif i.name in ("input_ids", "attention_mask"):
            feeds[i.name] = np.ones((1, max_positions), dtype=np.int64)
        elif i.name.startswith("past_key_values.") and len(i.shape) == 4 and all(isinstance(d, int) for d in (i.shape[1], i.shape[3])):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        else:
            raise NotFusable(f"the rotary embedding reads {i.name}: not a position-only rotary")
    return feeds


def rotary_tables(model, roots: list[str], max_positions: int, head_dim: int) -> tuple[dict[str, tuple[str, str]], list, list]:
    """GroupQueryAttention's cos/sin caches ``(max_positions, head_dim / 2)`` for each rotary
    embedding (named by the tensor its Cos and Sin read), as nodes that compute them: a copy of the
    model's own rotary subgraph fed with constants for positions ``0..max_positions-1``. onnxruntime
    folds them into constants when it loads the model, so the file holds only the subgraph (Gemma
    3's two tables at 8,192 positions would be 17 MB). The tables are evaluated here once to refuse
    an interleaved or partial rotary it cannot pass on. Returns ({root: (cos, sin)}, nodes,
    constants)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    g = model.graph
    consumers = consumers_of(g)
    names: list[str] = []
    for root in roots:
        trig = {n.op_type: n for n in consumers.get(root, []) if n.op_type in ("Cos", "Sin")}
        if len(trig) != 2:
            raise NotFusable(f"the rotary embedding at {root} has no Cos and Sin pair")
        names += [chain_end(trig["Cos"].output[0], consumers), chain_end(trig["Sin"].output[0], consumers)]
    nodes = needed(list(g.node), names)  # the rotary subgraphs alone, with only the constants they read
    used = {i for n in nodes for i in n.input}
    cut = _cut(nodes, {c.name.rsplit("/", 1)[0] + "/" for c in g.node if c.op_type in ("Cos", "Sin") and c.input[0] in roots},
               constants(g))
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "rotary", [i for i in g.input if i.name in used],
                               [onnx.helper.make_empty_tensor_value_info(n) for n in [*names, *cut]],
                               [t for t in g.initializer if t.name in used]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = _probe_feeds(sess.get_inputs(), max_positions)
    values = sess.run(None, feeds)
    cut_values = dict(zip(cut, values[len(names):]))
    if all(v.size <= 4 * max_positions for v in cut_values.values()):  # positions, not activations: feed them as constants
        feeds, nodes = cut_values, needed(nodes, names, frozenset(cut))
    for t in values[: len(names)]:
        t = np.asarray(t, dtype=np.float32).reshape(max_positions, -1)
        half = t.shape[1] // 2
        if not np.array_equal(t[:, :half], t[:, half:]):
            raise NotFusable("the rotary tables are not two equal halves (interleaved or partial rotary)")
        if half * 2 != head_dim:
            raise NotFusable(f"the rotary covers {half * 2} of {head_dim} head channels (partial rotary)")
    width = head_dim // 2
    P = "edgekd_gqa.tables"
    rename = {o: f"{P}/{o}" for n in nodes for o in n.output} | {name: f"{P}/{name}" for name in feeds}
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = f"{P}/{n.name}"
        c.input[:] = [rename.get(i, i) for i in n.input]
        c.output[:] = [rename[o] for o in n.output]
        copies.append(c)
    consts = [numpy_helper.from_array(v, rename[k]) for k, v in feeds.items()]
    consts += [numpy_helper.from_array(np.array([max_positions, 2 * width], np.int64), f"{P}.shape"),
               numpy_helper.from_array(np.array([0], np.int64), f"{P}.start"),
               numpy_helper.from_array(np.array([width], np.int64), f"{P}.end"),
               numpy_helper.from_array(np.array([1], np.int64), f"{P}.axis")]
    caches: dict[str, tuple[str, str]] = {}
    for j, root in enumerate(roots):
        pair = []
        for name in names[2 * j: 2 * j + 2]:
            full, cache = f"{rename[name]}.2d", f"{rename[name]}.cache"
            copies += [helper.make_node("Reshape", [rename[name], f"{P}.shape"], [full], name=f"{full}/Reshape"),
                       helper.make_node("Slice", [full, f"{P}.start", f"{P}.end", f"{P}.axis"], [cache], name=f"{cache}/Slice")]
            pair.append(cache)
        caches[root] = (pair[0], pair[1])
    return caches, copies, consts


def _cut(nodes: list, scopes: set[str], constants: set[str]) -> list[str]:
    """The tensors the rotary embedding modules (nodes named under ``scopes``) read from outside
    them: the positions, computed from the graph's inputs (constants excluded)."""
    inside = [n for n in nodes if any(n.name.startswith(s) for s in scopes if s != "/")]
    made = {o for n in inside for o in n.output}
    return list(dict.fromkeys(i for n in inside for i in n.input if i and i not in made and i not in constants))


def _rotated(start: str, consumers: dict[str, list], roots: dict[str, str], depth: int = 40) -> tuple[str, str]:
    """The tensor a layer rotates, reached forward from its projection's output ``start`` (a query or
    key norm between them included), and the rotary embedding it is rotated with: the first
    ``Mul`` of a tensor derived from ``start`` by a rotary table."""
    seen, frontier = {start}, [start]
    for _ in range(depth):
        ahead = []
        for t in frontier:
            for c in consumers.get(t, []):
                if c.op_type == "Mul" and len(c.input) == 2 and t not in roots:
                    other = c.input[1] if c.input[0] == t else c.input[0]
                    if other in roots:
                        return t, roots[other]
                for o in c.output:
                    if o not in seen:
                        seen.add(o)
                        ahead.append(o)
        frontier = ahead
    raise NotFusable(f"found no rotary embedding applied to {start}")


def _as_gqa_input(t: str, projection: str, producer: dict[str, Any], name: str) -> tuple[str, list, list]:
    """GroupQueryAttention's (batch, seq, heads * head_dim) input for the rotated tensor ``t``
    (batch, heads, seq, head_dim): the projection's output itself when only its reshape and
    transpose lie between, else ``t``'s normalised tensor brought back to that layout. Returns
    (the input, the nodes and the constants that make it)."""
    from onnx import helper, numpy_helper

    layout, x = "bhsd", t
    while x != projection and x in producer:
        p = producer[x]
        perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
        if layout == "bhsd" and p.op_type == "Transpose" and perm == [0, 2, 1, 3]:
            layout, x = "bshd", p.input[0]
        elif layout == "bhsd" and p.op_type == "Slice" and p.input[0] in producer and starts_at_zero(p, producer):
            x = p.input[0]  # the rotary part of the head (Phi-3's code slices it): all of it, as rotary_tables checked
        elif layout == "bshd" and p.op_type == "Reshape":
            layout, x = "bsd", p.input[0]
        else:
            break
    if x == projection and layout == "bsd":
        return projection, [], []
    nodes, shape = [], numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{name}.shape")
    if layout == "bhsd":
        nodes.append(helper.make_node("Transpose", [x], [f"{name}.bshd"], perm=[0, 2, 1, 3], name=f"{name}/Transpose"))
        x, layout = f"{name}.bshd", "bshd"
    if layout == "bshd":
        nodes.append(helper.make_node("Reshape", [x, shape.name], [f"{name}.bsd"], name=f"{name}/Reshape"))
        return f"{name}.bsd", nodes, [shape]
    return x, nodes, []


def _projection(by_name: dict[str, Any], consumers: dict[str, list], layer: int, proj: str) -> Any:
    """The node computing layer ``layer``'s ``proj`` projection (its bias Add where it has one)."""
    n = by_name.get(f"/model/layers.{layer}/self_attn/{proj}/MatMul")
    if n is None:
        raise NotFusable(f"layer {layer} has no {proj} MatMul (fused qkv or another naming)")
    after = consumers.get(n.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and after[0].name == f"/model/layers.{layer}/self_attn/{proj}/Add":
        return after[0]
    return n


@dataclasses.dataclass
class Fused:
    """What :func:`fuse_gqa` did: layers fused, of them with q/k/v packed into one MatMul, with their
    query/key norms kept before the kernel, with a sliding window; rotary tables written."""

    layers: int
    packed: int = 0
    normed: int = 0
    windowed: int = 0
    tables: int = 0


@dataclasses.dataclass
class _Layer:
    """One layer's attention as the graph has it: its q/k/v projections (their bias Add where they
    have one) and o_proj MatMul, its query heads, the tensors it rotates (normalised where the
    layer normalises them), the rotary embedding it uses and its notes (scale, window, soft-cap)."""

    index: int
    q: Any
    k: Any
    v: Any
    o: Any
    heads: int
    q_rotated: str
    k_rotated: str
    table: str
    note: dict[str, Any]
    packed: Any = None  # the model's own qkv_proj (Phi-3): q, k and v are then its three Slices


def _layers(model, head_dim: int) -> list[_Layer]:
    """Every layer's :class:`_Layer`; ``NotFusable`` names the first that is not the attention this
    rewrite knows."""
    g = model.graph
    inputs = {i.name for i in g.input}
    by_name = {n.name: n for n in g.node}
    consumers = consumers_of(g)
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    roots = _table_roots(g)
    notes = read_notes(model, ATTENTION_NOTES) or []
    producer = {o: n for n in g.node for o in n.output}
    plans = []
    for i in sorted(int(m.group(1)) for m in map(_PAST.match, inputs) if m):
        packed = None
        if f"/model/layers.{i}/self_attn/q_proj/MatMul" not in by_name and f"/model/layers.{i}/self_attn/qkv_proj/MatMul" in by_name:
            packed = _projection(by_name, consumers, i, "qkv_proj")
            (q, k, v), q_width = _packed_slices(packed, consumers, producer, i)
        else:
            q, k, v = (_projection(by_name, consumers, i, p) for p in ("q_proj", "k_proj", "v_proj"))
            weight = inits.get(by_name[f"/model/layers.{i}/self_attn/q_proj/MatMul"].input[1])
            if weight is None or len(weight.dims) != 2:
                raise NotFusable(f"layer {i}: no constant q_proj weight")
            q_width = int(weight.dims[1])
        o = by_name.get(f"/model/layers.{i}/self_attn/o_proj/MatMul")
        if o is None:
            raise NotFusable(f"layer {i}: no o_proj MatMul")
        if q_width % head_dim:
            raise NotFusable(f"layer {i}: q_proj width {q_width} is not a multiple of the head size {head_dim}")
        if not {f"present.{i}.key", f"present.{i}.value"} <= outputs:
            raise NotFusable(f"layer {i} has no present.{i}.key output")
        (q_rot, table), (k_rot, k_table) = _rotated(q.output[0], consumers, roots), _rotated(k.output[0], consumers, roots)
        if table != k_table:
            raise NotFusable(f"layer {i} rotates its queries and keys with different tables")
        plans.append(_Layer(i, q, k, v, o, q_width // head_dim, q_rot, k_rot, table, notes[i] if i < len(notes) else {}, packed))
    return plans


def _packed_slices(qkv, consumers: dict[str, list], producer: dict[str, Any], layer: int) -> tuple[list, int]:
    """A packed ``qkv_proj``'s three consumers, the ``Slice`` nodes that cut q, k and v out of it
    (last axis, constant bounds), in that order, and the width of q."""
    bounds = []
    for n in consumers.get(qkv.output[0], []):
        b = slice_bounds(n, producer)
        if b is None or b[1] is None or b[2] not in (-1, 2):
            raise NotFusable(f"layer {layer}: its qkv_proj is not cut into q, k and v by three Slices on the last axis")
        bounds.append((b[0], b[1], n))
    bounds.sort(key=lambda b: b[0])
    if len(bounds) != 3 or bounds[0][0] != 0 or bounds[0][1] != bounds[1][0] or bounds[1][1] != bounds[2][0]:
        raise NotFusable(f"layer {layer}: its qkv_proj is not cut into q, k and v, in that order")
    return [b[2] for b in bounds], bounds[0][1]


def _gqa_attributes(note: dict[str, Any]) -> dict[str, Any]:
    """GroupQueryAttention's attributes for a layer's notes (the kernel's defaults where absent)."""
    attrs: dict[str, Any] = {}
    if note.get("scale") is not None:
        attrs["scale"] = float(note["scale"])
    if note.get("softcap"):
        attrs["softcap"] = float(note["softcap"])
    if note.get("window"):
        attrs["local_window_size"] = int(note["window"])  # measured: the unfused graph agrees at window, not window - 1
    return attrs


def fuse_gqa(model, max_positions: int, pack_qkv: bool = True) -> Fused:
    """Rewrite ``model`` in place: each layer's attention becomes one GroupQueryAttention node (a
    com.microsoft op: the caller declares the domain). ``pack_qkv``: where q, k and v are bias-free
    projections of one input, their weights become one (K, q + k + v) MatMul feeding
    GroupQueryAttention's packed input (one weight read, one node, and one set of grid offsets
    instead of three). Raises ``NotFusable`` (the model untouched) when the graph is not the
    attention it knows."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inputs = {i.name: i for i in g.input}
    first = inputs.get("past_key_values.0.key")
    if first is None or "attention_mask" not in inputs:
        raise NotFusable("no past_key_values.N.key / attention_mask inputs: not a decoder with a KV cache")
    kv_heads, head_dim = dim(first, 1), dim(first, 3)
    if not kv_heads or not head_dim:
        raise NotFusable("the cache's head count and head size are not fixed in the graph")
    if first.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise NotFusable("the cache is not float32 (fuse before converting to float16)")
    plans = _layers(model, head_dim)
    used = list(dict.fromkeys(p.table for p in plans))
    caches, table_nodes, new_inits = rotary_tables(model, used, max_positions, head_dim)

    P = "edgekd_gqa"
    shared, shared_inits = _mask_lengths(P)
    new_inits += shared_inits
    inits = {t.name: t for t in g.initializer}
    producer = {out: n for n in g.node for out in n.output}
    outputs_of = {out: (n, j) for n in g.node for j, out in enumerate(n.output)}
    replace: list[tuple[Any, list]] = []
    done = Fused(len(plans), tables=len(used))
    for layer in plans:
        i, q, k, v = layer.index, layer.q, layer.k, layer.v
        present = (f"present.{i}.key", f"present.{i}.value")
        for p in present:  # the unfused cache outputs are renamed, so dead-node removal drops them
            n, j = outputs_of[p]
            n.output[j] = f"{p}.unfused"
        out = f"/model/layers.{i}/self_attn/{P}_output"
        scope = f"/model/layers.{i}/self_attn/{P}"
        q_in, q_nodes, q_inits = _as_gqa_input(layer.q_rotated, q.output[0], producer, f"{scope}/q")
        k_in, k_nodes, k_inits = _as_gqa_input(layer.k_rotated, k.output[0], producer, f"{scope}/k")
        qkv, nodes = [q_in, k_in, v.output[0]], [*q_nodes, *k_nodes]
        new_inits += [*q_inits, *k_inits]
        projections = (q, k, v)
        if layer.packed is not None:  # the model's own qkv_proj feeds the kernel's packed input
            if nodes or q_in != q.output[0] or k_in != k.output[0]:
                raise NotFusable(f"layer {i}: its packed q and k are changed (a norm) before the rotary")
            qkv, done.packed = [layer.packed.output[0], "", ""], done.packed + 1
        done.normed += q_in != q.output[0] or k_in != k.output[0]
        if layer.packed is None and pack_qkv and qkv == [n.output[0] for n in projections] and all(n.op_type == "MatMul" and n.input[1] in inits for n in projections) \
                and len({n.input[0] for n in projections}) == 1:
            w = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in projections], axis=1)
            name = f"/model/layers.{i}/self_attn/qkv_proj/MatMul"
            new_inits.append(numpy_helper.from_array(w, f"model.layers.{i}.self_attn.qkv_proj.weight"))
            nodes.append(helper.make_node("MatMul", [q.input[0], f"model.layers.{i}.self_attn.qkv_proj.weight"],
                                          [name + "_output_0"], name=name))
            qkv, done.packed = [name + "_output_0", "", ""], done.packed + 1
        attrs = _gqa_attributes(layer.note)
        done.windowed += "local_window_size" in attrs
        cos_name, sin_name = caches[layer.table]
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             f"{P}.seqlens_k", f"{P}.total_len", cos_name, sin_name],
            [out, *present], name=f"/model/layers.{i}/self_attn/GroupQueryAttention", domain="com.microsoft",
            num_heads=layer.heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, **attrs))
        replace.append((layer.o, [*nodes, layer.o]))  # GroupQueryAttention (and the packed q/k/v) just before o_proj
        layer.o.input[0] = out
    top = g.node[0]  # the shared nodes read only graph inputs and constants: they go first
    splice(g, [(top, [*table_nodes, *shared, top]), *replace])
    g.initializer.extend(new_inits)
    _drop_dead(g)
    return done


def _mask_lengths(P: str) -> tuple[list, list]:
    """The nodes every layer's GroupQueryAttention shares: ``seqlens_k`` (each row's length - 1) and
    the total length, from the attention mask (int32); and their constants."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([1], np.int64), f"{P}.axis1"),
             numpy_helper.from_array(np.array(1, np.int64), f"{P}.one"),
             numpy_helper.from_array(np.array(1, np.int64), f"{P}.index1")]
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", f"{P}.axis1"], [f"{P}.lengths"], keepdims=0, name=f"{P}/ReduceSum"),
        helper.make_node("Sub", [f"{P}.lengths", f"{P}.one"], [f"{P}.seqlens64"], name=f"{P}/Sub"),
        helper.make_node("Cast", [f"{P}.seqlens64"], [f"{P}.seqlens_k"], to=TensorProto.INT32, name=f"{P}/Cast_seqlens"),
        helper.make_node("Shape", ["attention_mask"], [f"{P}.mask_shape"], name=f"{P}/Shape"),
        helper.make_node("Gather", [f"{P}.mask_shape", f"{P}.index1"], [f"{P}.total64"], axis=0, name=f"{P}/Gather"),
        helper.make_node("Cast", [f"{P}.total64"], [f"{P}.total_len"], to=TensorProto.INT32, name=f"{P}/Cast_total"),
    ]
    return nodes, inits


def _drop_dead(graph) -> None:
    """Remove the nodes no graph output depends on, then the initializers nothing reads."""
    set_nodes(graph, needed(list(graph.node), [o.name for o in graph.output]))


def random_probe(sess, seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """A random 12-token prompt in the vocabulary of ``sess``'s graph (100 tokens where its logits'
    width is symbolic), and the cache facts its past inputs declare (for ``ort_forward``)."""
    first = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    vocab = sess.get_outputs()[0].shape[-1]
    ids = np.random.default_rng(seed).integers(0, vocab if isinstance(vocab, int) else 100, size=(1, 12), dtype=np.int64)
    return ids, {"num_kv_heads": first.shape[1], "head_dim": first.shape[3]}


def agreement(a, b, seed: int = 0) -> float:
    """Largest |difference| between two sessions' logits (every position) and caches on a random
    12-token prompt and one cached step."""
    from edgekd.export.onnx import ort_forward

    ids, facts = random_probe(a, seed)
    worst = 0.0
    past_a = past_b = None
    for step_ids in (ids, ids[:, -1:]):
        la, past_a = ort_forward(a, step_ids, past_a, facts)
        lb, past_b = ort_forward(b, step_ids, past_b, facts)
        worst = max(worst, float(np.abs(la - lb).max()),
                    max(float(np.abs(past_a[n] - past_b[n]).max()) for n in past_a))
    return worst
