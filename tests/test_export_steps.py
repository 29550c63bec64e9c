"""The step registry: every name a shipped profile uses exists, and every registered step is run here
on a tiny fp32 export and checked against that export's own logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgekd.device.targets import SHIPPED
from edgekd.export.onnx import export_onnx, model_facts, ort_forward, session
from edgekd.export.profile import load_target
from edgekd.export.steps import STEPS
from edgekd.export.steps.fuse_attention import FuseAttention
from edgekd.export.steps.logits_to_keep import LogitsToKeep
from edgekd.export.steps.matmul_nbits import MatMulNBits
from edgekd.export.steps.ort import OrtFormat
from edgekd.export.steps.quantize_head_embedding import QuantizeHeadEmbedding, _quantize_rows

# Each registered step, the settings it is tested with, and how far its logits may move (tiny model).
CASES = {
    "fuse_attention": [(FuseAttention(), 1e-3)],
    "quantize_head_embedding": [(QuantizeHeadEmbedding(), 0.1), (QuantizeHeadEmbedding(head="int4", embedding="int4"), 1.0),
                                (QuantizeHeadEmbedding(head="int8", embedding="fp32"), 0.1)],
    "matmul_nbits": [(MatMulNBits(bits=8), 0.1), (MatMulNBits(bits=4, algorithm="hqq"), 1.0),
                     (MatMulNBits(bits=4, int8_nodes=("down_proj",)), 1.0),
                     (MatMulNBits(bits=8, accuracy_level=4, fp32_activation_nodes=("down_proj",)), 0.2),
                     (MatMulNBits(bits=4, accuracy_level=0, int8_activation_nodes=("down_proj",),
                                  fp32_activation_nodes=("layers.1/mlp/down_proj",)), 1.0),
                     (MatMulNBits(bits=4, algorithm="k_quant"), 1.0),
                     (MatMulNBits(bits=4, algorithm="k_quant", int8_nodes=("down_proj",)), 1.0)],
    "quantize_dynamic": [(load_target("cpu").settings["quantize_dynamic"], 1.5)],
    "fp16": [(load_target("cuda").settings["fp16"], 0.05)],
    "optimize": [(load_target("cpu").settings["optimize"], 1e-3)],
    "logits_to_keep": [(LogitsToKeep(), 1e-5)],  # asked for every row (ort_forward): the graph's own logits
    "to_ort": [(load_target("mobile").settings["to_ort"], 1e-3), (OrtFormat(constant_folding=False), 1e-3)],
}


def test_every_step_a_shipped_profile_names_is_registered():
    for name in SHIPPED:
        for step in load_target(name).steps:
            assert step in STEPS, f"{name}.toml names unknown step {step}"


def test_every_registered_step_has_a_test_case():
    assert set(CASES) == set(STEPS)


def test_a_new_step_is_its_function_and_its_settings(tmp_path):
    """A step registered with its settings class becomes a profile table: read and checked from the
    file, run by run_steps with those settings, recorded in the recipe; the profile needs no change."""
    import dataclasses

    from edgekd.device.config import require
    from edgekd.device.errors import UsageError
    from edgekd.export import run_steps
    from edgekd.export.profile import TargetProfile
    from edgekd.export.steps import StepSettings, load_onnx, save_onnx, step

    @dataclasses.dataclass(frozen=True)
    class Rename(StepSettings):
        prefix: str = "n"

        def __post_init__(self):
            require(self.prefix.isidentifier(), f"rename_nodes.prefix = {self.prefix!r}: use a name")

    @step("rename_nodes", Rename)
    def rename_nodes(src, dst, settings, profile) -> dict:
        """Every node renamed prefix + its index."""
        model = load_onnx(src)
        for i, node in enumerate(model.graph.node):
            node.name = f"{settings.prefix}{i}"
        save_onnx(model, dst)
        return {"renamed": len(model.graph.node)}

    try:
        profile = TargetProfile.from_mapping({"name": "t", "steps": ["rename_nodes"], "rename_nodes": {"prefix": "x"}}, "t.toml")
        assert profile.settings["rename_nodes"] == Rename("x") and TargetProfile(name="u").settings["rename_nodes"] == Rename()
        with pytest.raises(UsageError, match="t.toml: rename_nodes.prefix = '1': use a name"):
            TargetProfile.from_mapping({"name": "t", "rename_nodes": {"prefix": "1"}}, "t.toml")
        with pytest.raises(UsageError, match="unknown key 'rename_nodes.suffix'"):
            TargetProfile.from_mapping({"name": "t", "rename_nodes": {"suffix": "x"}}, "t.toml")
        src = tmp_path / "in.onnx"
        save_onnx(tiny_graph(), src)
        path, recipe = run_steps(src, profile, tmp_path / "work")
        assert [n.name for n in load_onnx(path).graph.node] == ["x0"]
        assert recipe == [{"step": "rename_nodes", "prefix": "x", "renamed": 1}]
    finally:
        del STEPS["rename_nodes"]


def tiny_graph():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_rows_round_trips_within_half_a_step(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 64)).astype(np.float32)
    packed, scales = _quantize_rows(w, bits, 32)
    assert packed.dtype == np.uint8 and packed.shape == (6, 2, 32 * bits // 8) and scales.shape == (6, 2)
    if bits == 4:  # low nibble first, as MatMulNBits and GatherBlockQuantized read it
        q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(6, 2, 32)
    else:
        q = packed
    deq = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    assert np.abs(deq.reshape(6, 64) - w).max() <= scales.max() / 2 + 1e-6


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    """A tiny Llama exported to fp32 ONNX, its facts, and the logits of a fixed input."""
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=2))
    path = export_onnx(model, tmp_path_factory.mktemp("fp32"), 17)
    facts = model_facts(model.config)
    ids = np.array([[5, 17, 99, 250, 3, 42, 7, 300]], dtype=np.int64)
    logits, _ = ort_forward(session(path), ids, None, facts)
    return path, facts, ids, logits


@pytest.mark.parametrize("name, case", [(n, i) for n, cases in CASES.items() for i in range(len(cases))])
def test_step_output_runs_and_stays_close(tmp_path, fp32_export, name, case):
    src, facts, ids, want = fp32_export
    settings, tol = CASES[name][case]
    st = STEPS[name]
    dst = tmp_path / f"model{st.suffix}"
    info = st.fn(src, dst, settings, load_target("cpu"))
    assert isinstance(info, dict) and dst.is_file()
    got, present = ort_forward(session(dst), ids, None, facts)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol
    assert set(present) == {f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    if name == "quantize_head_embedding":
        assert info["tied"] is True
        assert info["shared"] is (settings.embedding == settings.head)
    if name == "matmul_nbits" and settings.int8_nodes:
        assert info["int8_matmuls"] == 2  # one down_proj per layer
    if name == "matmul_nbits":
        import onnx

        levels = {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
                  for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits"}
        assert len(levels) == info["quantized_matmuls"] == 14  # 7 per layer; the tied head is not a const MatMul
        for node, level in levels.items():
            fp32_act = any(p in node for p in settings.fp32_activation_nodes)
            int8_act = any(p in node for p in settings.int8_activation_nodes)
            assert level == (0 if fp32_act else 4 if int8_act else settings.accuracy_level), node
        if settings.int8_activation_nodes:  # layer 0's down_proj; layer 1's is named in both lists: fp32 wins
            assert info["int8_activation_matmuls"] == 1 and sorted(levels.values()).count(4) == 1


def test_untied_head_and_embedding_are_quantized_separately(tmp_path):
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=1, tie_word_embeddings=False))
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    want, _ = ort_forward(session(src), ids, None, facts)
    info = STEPS["quantize_head_embedding"].fn(src, tmp_path / "q" / "model.onnx",
                                              dataclasses.replace(QuantizeHeadEmbedding(), head="int8"), None)
    assert info == {"tied": False, "head": "int8", "embedding": "int8", "shared": False, "kept_int4_grid": [],
                    "int8_as_4bit_halves": True, "rescore_top_k": 0, "gather": "block_quantized"}  # accuracy_level 0 by default: fp32 activations
    got, _ = ort_forward(session(tmp_path / "q" / "model.onnx"), ids, None, facts)
    assert np.abs(got - want).max() <= 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_an_int8_head_at_fp32_activations_is_two_exact_4bit_halves(tmp_path, tied):
    """At accuracy_level 0 an int8 head is stored as two 4-bit halves (and the embedding tied to it
    gathers from them): the same numbers as the int8 matrix computed at fp32, the same bytes, and
    kernels onnxruntime runs fast at fp32 activations."""
    import onnx
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=1, tie_word_embeddings=tied))
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[1, 2, 3, 4, 250, 17]], dtype=np.int64)
    runs = {}
    for level in (0, 4):
        dst = tmp_path / f"level{level}" / "model.onnx"
        settings = dataclasses.replace(QuantizeHeadEmbedding(), head="int8", accuracy_level=level)
        runs[level] = STEPS["quantize_head_embedding"].fn(src, dst, settings, None), dst
    info, halves = runs[0]
    assert info["int8_as_4bit_halves"] and info["shared"] == tied and not runs[4][0]["int8_as_4bit_halves"]
    ops = [n.op_type for n in onnx.load(str(halves)).graph.node]
    assert ops.count("MatMulNBits") == 2  # the head's halves; an embedding of its own is gathered as int8, once
    assert ops.count("GatherBlockQuantized") == (2 if tied else 1)
    reference = onnx.load(str(runs[4][1]))  # the int8 matrix at fp32 activations (slow kernel): the reference
    for n in reference.graph.node:
        if n.op_type == "MatMulNBits":
            next(a for a in n.attribute if a.name == "accuracy_level").i = 0
    onnx.save(reference, str(tmp_path / "reference.onnx"))
    want, _ = ort_forward(session(tmp_path / "reference.onnx"), ids, None, facts)
    got, _ = ort_forward(session(halves), ids, None, facts)
    assert np.abs(got - want).max() <= 1e-4
    size = {level: sum(f.stat().st_size for f in path.parent.glob("model.onnx*")) for level, (_, path) in runs.items()}
    assert size[0] <= size[4] * 1.02


@pytest.mark.parametrize("tied, gather, precision", [(True, "block_quantized", "int8"), (False, "block_quantized", "int8"),
                                                     (True, "standard", "int8"), (True, "block_quantized", "int4")])
def test_a_rescored_head_answers_as_the_fp32_activation_head(tmp_path, tied, gather, precision):
    """``rescore_top_k``: the head runs as one int8-activation node, then its k highest logits are
    recomputed from the same quantized rows at fp32 activations. The argmax at every position, and
    the value of every rescored logit, are the fp32-activation head's (two exact halves); the rest
    keep the fast head's values; the matrix is still stored once."""
    import onnx
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=1, tie_word_embeddings=tied))
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[1, 2, 3, 4, 250, 17, 383, 9]], dtype=np.int64)
    out = {}
    for name, level, k in (("halves", 0, 0), ("rescored", 4, 5)):
        dst = tmp_path / name / "model.onnx"
        settings = dataclasses.replace(QuantizeHeadEmbedding(), head=precision, embedding=precision, accuracy_level=level,
                                       rescore_top_k=k, gather=gather)
        info = STEPS["quantize_head_embedding"].fn(src, dst, settings, None)
        assert info["rescore_top_k"] == k and info["shared"] == tied
        out[name] = ort_forward(session(dst), ids, None, facts)[0][0], onnx.load(str(dst))
    (want, _), (got, graph) = out["halves"], out["rescored"]
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("TopK") == 1 and ops.count("ScatterElements") == 1
    assert (got.argmax(-1) == want.argmax(-1)).all()
    for pos in range(len(got)):
        top = np.argsort(-got[pos])[:5]
        assert np.abs(got[pos, top] - want[pos, top]).max() <= 1e-4
    assert 0 < np.abs(got - want).max() <= 0.1  # the others: the int8-activation head's values (an int4 head's, at fp32: the halves' place)
    sizes = [sum(len(t.raw_data) for t in m.graph.initializer) for _, m in out.values()]
    assert sizes[1] <= sizes[0] * 1.01


@pytest.mark.parametrize("tied, precision, level", [(True, "int8", 0), (True, "int4", 0), (False, "int8", 4)])
def test_the_standard_gather_reads_the_rows_gather_block_quantized_reads(tmp_path, tied, precision, level):
    """The web profile's embedding (``gather = "standard"``: Gather, Mod/Div nibbles, Cast, Sub, Mul)
    computes what GatherBlockQuantized computes, from the same initializers (the tied head still
    shares them), with no contrib gather left for onnxruntime-web's WebGPU build to lack."""
    import onnx
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=1, tie_word_embeddings=tied))
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[1, 2, 3, 4, 250, 17, 383]], dtype=np.int64)
    out = {}
    for gather in ("block_quantized", "standard"):
        dst = tmp_path / gather / "model.onnx"
        settings = dataclasses.replace(QuantizeHeadEmbedding(), head=precision, embedding=precision, accuracy_level=level, gather=gather)
        info = STEPS["quantize_head_embedding"].fn(src, dst, settings, None)
        assert info["gather"] == gather and info["shared"] == tied
        out[gather] = ort_forward(session(dst), ids, None, facts)[0], onnx.load(str(dst))
    assert "GatherBlockQuantized" not in {n.op_type for n in out["standard"][1].graph.node}
    assert np.abs(out["standard"][0] - out["block_quantized"][0]).max() <= 1e-5
    sizes = [sum(len(t.raw_data) for t in m.graph.initializer) for _, m in out.values()]
    assert abs(sizes[0] - sizes[1]) < 1024  # the same matrices: a few shape constants more


def test_an_ort_file_of_an_int8_head_with_float16_scales_computes_as_its_onnx(tmp_path):
    """A tied embedding on an int8 grid whose scales float16 holds exactly (a GGUF's Q8_0: SmolLM2's)
    is stored with float16 scales cast back; the mobile profile's int8 head (accuracy_level 4) then
    reads them, and its ORT file (no constant folding) must compute what the ONNX model does: it
    drifted 40 logits when onnxruntime packed the head without its computed scales."""
    import torch
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=1))
    with torch.no_grad():  # the embedding on an int8 grid with float16 scales, as a Q8_0 tensor is
        w = model.model.embed_tokens.weight.view(-1, 2, 32)
        d = (w.abs().amax(-1, keepdim=True) / 127).half().float()
        w.copy_((w / d).round().clamp(-127, 127) * d)
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[1, 2, 3, 4, 250, 17]], dtype=np.int64)
    head = tmp_path / "head" / "model.onnx"
    STEPS["quantize_head_embedding"].fn(src, head, dataclasses.replace(QuantizeHeadEmbedding(), accuracy_level=4), None)
    import onnx

    assert any(n.op_type == "Cast" and n.input[0].endswith("scales.f16") for n in onnx.load(str(head)).graph.node)
    want, _ = ort_forward(session(head), ids, None, facts)
    ort_file = tmp_path / "ort" / "model.ort"
    STEPS["to_ort"].fn(head, ort_file, OrtFormat(constant_folding=False), None)
    got, _ = ort_forward(session(ort_file), ids, None, facts)
    assert np.abs(got - want).max() <= 1e-3


def test_a_head_on_the_int4_grid_is_kept_at_int4_exactly(tmp_path):
    """A head distilled with --qat-head-bits 4 under an int8 setting: stored at int4 (re-rounding
    its int4 points to int8 would move them), shared with the embedding, and exact; keep_grid =
    false re-rounds it to int8 as asked."""
    import torch
    from conftest import build_model, tiny_llama_config

    from edgekd.quant import absmax_grid

    model = build_model(tiny_llama_config(layers=1))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(absmax_grid(emb, 4, 32))
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[5, 17, 99, 250, 3, 42, 7, 300]], dtype=np.int64)
    want, _ = ort_forward(session(src), ids, None, facts)
    step = STEPS["quantize_head_embedding"].fn
    info = step(src, tmp_path / "k" / "model.onnx", QuantizeHeadEmbedding(), None)
    assert info == {"tied": True, "head": "int4", "embedding": "int4", "shared": True, "kept_int4_grid": ["head", "embedding"],
                    "int8_as_4bit_halves": False, "rescore_top_k": 0, "gather": "block_quantized"}
    got, _ = ort_forward(session(tmp_path / "k" / "model.onnx"), ids, None, facts)
    assert np.abs(got - want).max() <= 1e-4
    info = step(src, tmp_path / "r" / "model.onnx", QuantizeHeadEmbedding(keep_grid=False), None)
    assert info["head"] == info["embedding"] == "int8" and info["kept_int4_grid"] == []
    again, _ = ort_forward(session(tmp_path / "r" / "model.onnx"), ids, None, facts)
    assert np.abs(again - want).max() > 1e-4


def test_an_untied_head_on_the_int4_grid_is_kept_alone(tmp_path):
    """Untied: each matrix is decided on its own weights (the embedding here is on no grid)."""
    import torch
    from conftest import build_model, tiny_llama_config

    from edgekd.quant import absmax_grid

    model = build_model(tiny_llama_config(layers=1, tie_word_embeddings=False))
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.copy_(absmax_grid(head, 4, 32))
    src = export_onnx(model, tmp_path / "fp32", 17)
    info = STEPS["quantize_head_embedding"].fn(src, tmp_path / "k" / "model.onnx", QuantizeHeadEmbedding(), None)
    assert info == {"tied": False, "head": "int4", "embedding": "int8", "shared": False, "kept_int4_grid": ["head"],
                    "int8_as_4bit_halves": False, "rescore_top_k": 0, "gather": "block_quantized"}


def test_an_algorithm_this_onnxruntime_lacks_is_one_line(tmp_path, fp32_export, monkeypatch):
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from edgekd.device.errors import UsageError

    monkeypatch.delattr(mq, "KQuantWeightOnlyQuantConfig")
    with pytest.raises(UsageError, match="has no k-quant quantizer; install a newer onnxruntime"):
        STEPS["matmul_nbits"].fn(fp32_export[0], tmp_path / "m.onnx", MatMulNBits(bits=4, algorithm="k_quant"), load_target("cpu"))


def _on_grid(model, kind: str):
    """Move every linear weight of ``model`` onto a 4-bit grid: onnxruntime's symmetric one (a
    --qat-bits 4 student) or llama.cpp's Q4_1 (scale and minimum per block, fp16, as a GGUF has)."""
    import torch

    from edgekd.quant import ort_symmetric_grid

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or "embed" in name:
                continue
            if kind == "symmetric":
                p.copy_(ort_symmetric_grid(p, 4, 32))
                continue
            b = p.reshape(p.shape[0], -1, 32)
            lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
            d = ((hi - lo) / 15).half().float()
            q = ((b - lo) / ((hi - lo) / 15)).add(0.5).floor().clamp(0, 15)  # ggml's quantize_row_q4_1_ref
            p.copy_((d * q + lo.half().float()).reshape(p.shape))
    return model


@pytest.mark.parametrize("kind", ["symmetric", "q4_1"])
def test_weights_on_a_4bit_grid_are_stored_on_it_exactly(tmp_path, kind):
    """A profile asking for 8 bits still stores a weight that lies on a 4-bit grid at 4 bits, and
    the bundle computes what the fp32 model does (fp32 activations: nothing rounds)."""
    import onnx
    from conftest import build_model, tiny_llama_config

    from edgekd.export.grid import find_grid

    model = _on_grid(build_model(tiny_llama_config(layers=2)), kind)
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    grid = find_grid(w, 32)
    assert grid is not None and (grid.offsets is None) == (kind == "symmetric")
    assert np.abs(grid.dequantized() - w).max() <= 1e-6
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    ids = np.array([[5, 17, 99, 250, 3, 42, 7, 300]], dtype=np.int64)
    want, _ = ort_forward(session(src), ids, None, facts)
    info = STEPS["matmul_nbits"].fn(src, tmp_path / "g.onnx", MatMulNBits(bits=8, accuracy_level=4), load_target("cpu"))
    assert info["kept_on_grid_matmuls"] == info["quantized_matmuls"] == 14
    assert info["grid_offset_matmuls"] == (14 if kind == "q4_1" else 0)
    attrs = {(next(a.i for a in n.attribute if a.name == "bits"), next(a.i for a in n.attribute if a.name == "accuracy_level"))
             for n in onnx.load(str(tmp_path / "g.onnx")).graph.node if n.op_type == "MatMulNBits"}
    assert attrs == {(4, 0)}  # 4 bits, fp32 activations (grid_accuracy_level): nothing rounds
    got, _ = ort_forward(session(tmp_path / "g.onnx"), ids, None, facts)
    assert np.abs(got - want).max() <= 1e-4
    if kind == "q4_1":  # offsets at half the bytes, cast back in the graph: a smaller file, the same logits
        half = MatMulNBits(bits=8, accuracy_level=4, grid_offsets="float16")
        STEPS["matmul_nbits"].fn(src, tmp_path / "h.onnx", half, load_target("cpu"))
        small, _ = ort_forward(session(tmp_path / "h.onnx"), ids, None, facts)
        assert np.abs(small - want).max() <= 1e-3
        size = {p: sum(f.stat().st_size for f in tmp_path.glob(p + "*")) for p in ("g.onnx", "h.onnx")}
        assert size["h.onnx"] < size["g.onnx"]
        casts = {f: sum(n.op_type == "Cast" for n in onnx.load(str(tmp_path / f)).graph.node) for f in ("g.onnx", "h.onnx")}
        assert casts["h.onnx"] - casts["g.onnx"] == 14  # one per weight
    # keep_grid = false: the profile's own 8-bit RTN re-rounds the weights (a measurable drift)
    info = STEPS["matmul_nbits"].fn(src, tmp_path / "r.onnx", MatMulNBits(bits=8, keep_grid=False), load_target("cpu"))
    assert info["kept_on_grid_matmuls"] == 0
    if kind == "q4_1":
        again, _ = ort_forward(session(tmp_path / "r.onnx"), ids, None, facts)
        assert np.abs(again - want).max() > 1e-3


# llama.cpp's weight types as gguf's own dequantization writes them (ggml-quants.c in numpy): the
# legacy types quantized from normal weights, the k-quants from random blocks (gguf quantizes no
# k-quant), their fp16 super-block scales set to sane values at these byte offsets.
_HALVES = {"Q6_K": (208,), "Q4_K": (0, 2), "Q3_K": (108,), "Q2_K": (80, 82)}


def _gguf_weight(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    rng, qtype = np.random.default_rng(seed), GGMLQuantizationType[name]
    if name not in _HALVES:
        return quants.dequantize(quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _HALVES[name]:
        raw[..., offset:offset + 2] = np.full(raw.shape[:2], 2e-4, np.float16)[..., None].view(np.uint8)
    return quants.dequantize(raw.reshape(rows, -1), qtype)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q8_0", "Q6_K"])
def test_each_gguf_type_edgekd_keeps_round_trips_exactly(name):
    from edgekd.export.grid import GGUF_GRIDS, find_grid, find_symmetric, grid_kind

    w = _gguf_weight(name, 24, 512)
    kind = grid_kind([name], 32)
    assert kind == GGUF_GRIDS[name]
    grid = find_grid(w, kind.block) if kind.symmetric is None else find_symmetric(w, kind.block, kind.symmetric)
    assert grid is not None and grid.bits == kind.bits
    assert np.abs(grid.dequantized() - w).max() <= 1e-5 * np.abs(w).max()
    if kind.bits == 8:  # a float weight, or a block off the type's rule, fits no 8-bit grid
        assert find_symmetric(np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32), kind.block, kind.symmetric) is None


def test_types_without_an_exact_home_go_to_the_profile():
    from edgekd.export.grid import grid_kind

    assert grid_kind(["IQ2_XS"], 32) is None and grid_kind(["Q5_1"], 32) is None  # 32 levels with an offset
    assert grid_kind(["Q4_K", "Q5_0"], 32) is None  # a packed matrix whose parts need different bits
    assert grid_kind(["Q5_0", "Q8_0", "Q6_K"], 32).block == 16  # q, k, v packed: the finest block


def test_a_gguf_models_weights_stay_on_their_types_grids(tmp_path):
    """The GGUF types recorded in the exported graph choose each weight's grid: 4-bit types at 4
    bits with their block, Q5_0, Q8_0 and Q6_K at 8 bits; a type with no exact home (IQ2_XS) is
    named and goes to the profile's quantizer. At fp32 activations the bundle computes what the
    fp32 model does."""
    import onnx
    import torch
    from conftest import build_model, tiny_llama_config

    from edgekd.export.grid import GGUF_TYPES

    model = build_model(tiny_llama_config(layers=1, hidden=256, num_attention_heads=4, num_key_value_heads=4))
    types = {"self_attn.q_proj": "Q5_0", "self_attn.k_proj": "Q8_0", "self_attn.v_proj": "Q6_K", "self_attn.o_proj": "Q4_K",
             "mlp.gate_proj": "Q3_K", "mlp.up_proj": "Q2_K", "mlp.down_proj": "IQ2_XS"}
    layer = model.model.layers[0]
    with torch.no_grad():
        for seed, (name, t) in enumerate(types.items()):
            p = layer.get_submodule(name).weight
            p.copy_(torch.from_numpy(_gguf_weight("Q4_0" if t == "IQ2_XS" else t, *p.shape, seed=seed)))
    notes = {GGUF_TYPES: {f"model.layers.0.{k}": v for k, v in types.items()}}
    src = export_onnx(model, tmp_path / "fp32", 17, notes)
    facts = model_facts(model.config)
    ids = np.array([[5, 17, 99, 250, 3, 42, 7, 300]], dtype=np.int64)
    want, _ = ort_forward(session(src), ids, None, facts)
    info = STEPS["matmul_nbits"].fn(src, tmp_path / "g.onnx", MatMulNBits(bits=8, accuracy_level=0), load_target("cpu"))
    assert info["kept_gguf_types"] == {"Q5_0": 1, "Q8_0": 1, "Q6_K": 1, "Q4_K": 1, "Q3_K": 1, "Q2_K": 1}
    assert info["gguf_types_not_kept"] == {"/model/layers.0/mlp/down_proj/MatMul": ["IQ2_XS"]}  # named, then
    assert info["quantized_matmuls"] == 7  # re-rounded by the profile's 8-bit RTN
    nodes = {n.name: {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")}
             for n in onnx.load(str(tmp_path / "g.onnx")).graph.node if n.op_type == "MatMulNBits"}
    # 8-bit grids at fp32 activations (grid_accuracy_level 0): two exact 4-bit halves each
    assert info["grid_8bit_as_4bit_halves"] == 3
    assert nodes["/model/layers.0/self_attn/v_proj/MatMul_Q_hi"] == {"bits": 4, "block_size": 16}  # Q6_K: a scale per 16
    assert nodes["/model/layers.0/self_attn/v_proj/MatMul_Q_lo"] == {"bits": 4, "block_size": 16}
    assert nodes["/model/layers.0/mlp/gate_proj/MatMul_Q"] == {"bits": 4, "block_size": 16}  # Q3_K
    assert nodes["/model/layers.0/self_attn/o_proj/MatMul_Q"] == {"bits": 4, "block_size": 32}  # Q4_K, with offsets
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    half = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert sum(t.endswith(".grid_scales.f16") for t in half) >= 2  # Q5_0's and Q8_0's fp16 scales: stored so, cast in the graph
    got, _ = ort_forward(session(tmp_path / "g.onnx"), ids, None, facts)
    assert np.abs(got - want).max() <= 2e-2  # only the IQ2_XS stand-in is re-rounded (8-bit RTN)
    # at int8 activations an 8-bit grid is one 8-bit node: smaller graph, faster, less faithful
    info = STEPS["matmul_nbits"].fn(src, tmp_path / "i.onnx", MatMulNBits(bits=8, grid_accuracy_level=4), load_target("cpu"))
    assert info["grid_8bit_as_4bit_halves"] == 0 and info["kept_gguf_types"]["Q6_K"] == 1
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(tmp_path / "i.onnx")).graph.node if n.op_type == "MatMulNBits"}
    assert bits["/model/layers.0/self_attn/v_proj/MatMul_Q"] == 8


def test_a_float_weight_is_on_no_grid():
    from edgekd.export.grid import find_grid

    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    assert find_grid(w, 32) is None
    coarse = np.rint(w * 2) / 2  # a few levels, but spanning more than 16 steps in some block
    assert find_grid(coarse * np.array([1.0] * 32 + [40.0] * 32, dtype=np.float32), 32) is None or \
        np.abs(find_grid(coarse, 32).dequantized() - coarse).max() <= 1e-6


def _decode(path, facts, ids, steps: int = 3):
    """Logits of a prompt and ``steps`` cached greedy steps after it, and the last cache."""
    sess, out, past, x = session(path), [], None, ids
    for _ in range(steps + 1):
        logits, past = ort_forward(sess, x, past, facts)
        out.append(logits[:, -1])
        x = logits[:, -1:].argmax(-1).astype(np.int64)
    return np.concatenate(out), past


@pytest.mark.parametrize("rope_scaling, pack", [(None, True), ({"rope_type": "linear", "factor": 2.0}, True), (None, False)])
def test_fused_attention_is_one_node_a_layer_and_decodes_as_the_unfused_graph(tmp_path, rope_scaling, pack):
    """GroupQueryAttention replaces each layer's attention subgraph (q, k, v as one packed MatMul,
    or three); the rotary tables are the model's own (a scaled rope too), so prompt and cached
    steps give the unfused logits and cache."""
    import onnx
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=2, rope_scaling=rope_scaling))
    src = export_onnx(model, tmp_path / "fp32", 17)
    facts = model_facts(model.config)
    dst = tmp_path / "fused" / "model.onnx"
    info = STEPS["fuse_attention"].fn(src, dst, FuseAttention(max_positions=64, pack_qkv=pack), load_target("cpu"))
    assert info["fused_layers"] == 2 and info["context_length_cap"] == 64 and info["packed_qkv_layers"] == (2 if pack else 0)
    fused = onnx.load(str(dst))
    tables = [n for n in fused.graph.node if n.name.startswith("edgekd_gqa.tables/")]  # folded when a session loads
    nodes = [n for n in fused.graph.node if n not in tables]
    ops = [n.op_type for n in nodes]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Cos" not in ops
    # per layer: q, k, v (one packed or three), o, gate, up, down; plus the tied head (reads the embedding)
    assert ops.count("MatMul") == 2 * (5 if pack else 7) + 1
    assert sum("qkv_proj" in n.name for n in nodes) == (2 if pack else 0)
    assert len(ops) < len(onnx.load(str(src)).graph.node) / 3
    # the tables are the rotary subgraph on constant positions, not 64 x 8 floats twice in the file
    assert {"Cos", "Sin"} <= {n.op_type for n in tables}
    assert all(t.dims[0] != 64 for t in fused.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
               and t.dims[1] == 8)
    ids = np.array([[5, 17, 99, 250, 3, 42, 7, 300]], dtype=np.int64)
    (want, want_past), (got, got_past) = _decode(src, facts, ids), _decode(dst, facts, ids)
    assert np.abs(got - want).max() < 1e-3
    assert all(np.abs(got_past[k] - want_past[k]).max() < 1e-3 for k in want_past)


def test_attention_that_disagrees_or_is_unknown_is_left_unfused(tmp_path, fp32_export):
    """The fusion is kept only when it checks out: otherwise the unfused graph goes on and the
    recipe says why (a tolerance no fusion meets; a graph without the projections it knows)."""
    import onnx

    src, facts, ids, want = fp32_export
    dst = tmp_path / "strict" / "model.onnx"
    info = STEPS["fuse_attention"].fn(src, dst, FuseAttention(tolerance=1e-12), load_target("cpu"))
    assert info["fused_layers"] == 0 and "fuse_attention.tolerance" in info["not_fused"]
    assert "GroupQueryAttention" not in {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert np.abs(ort_forward(session(dst), ids, None, facts)[0] - want).max() < 1e-5

    renamed = onnx.load(str(src))
    for n in renamed.graph.node:
        n.name = n.name.replace("o_proj", "out_proj")
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    onnx.save(renamed, str(other))
    info = STEPS["fuse_attention"].fn(other, tmp_path / "o" / "model.onnx", FuseAttention(), load_target("cpu"))
    assert info["fused_layers"] == 0 and "o_proj" in info["not_fused"]


def test_gemm_with_a_constant_weight_becomes_matmul_plus_add(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.export.steps.matmul_nbits import gemm_as_matmul

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(3, 4)).astype(np.float32)
    assert gemm_as_matmul(model) == 1 and [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    onnx.save(model, tmp_path / "m.onnx")
    y = session(tmp_path / "m.onnx").run(None, {"x": x})[0]
    assert np.allclose(y, x @ w.T + b, atol=1e-5)


def test_a_gpt2_exports_for_cpu_with_its_gemms_quantized_and_its_embedding_shared(tmp_path, tokenizer):
    """GPT-2 gathers Reshape(input_ids) and its Conv1D layers export as Gemm (issue 30)."""
    import json

    import torch
    from conftest import VOCAB, save_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgekd.export import export_bundle

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2))
    folder = save_model(model.eval(), tokenizer, tmp_path / "gpt2")
    export_bundle(str(folder), "cpu", tmp_path / "bundle")
    recipe = {r["step"]: r for r in json.loads((tmp_path / "bundle" / "manifest.json").read_text())["recipe"]}
    assert recipe["quantize_head_embedding"]["tied"] and recipe["quantize_head_embedding"]["shared"]
    assert recipe["matmul_nbits"]["gemm_as_matmul"] == 8 and recipe["matmul_nbits"]["quantized_matmuls"] == 8


def test_compact_names_keep_the_graph_and_its_inputs_and_outputs(tmp_path, fp32_export):
    """to_ort stores every node and value name once or twice in the file: compact_names shortens the
    inner ones (the exporter's '/model/layers.0/...'), keeps what a runtime feeds and reads, and the
    graph computes the same logits."""
    import onnx

    from edgekd.export.steps import load_onnx, save_onnx
    from edgekd.export.steps.ort import compact_names

    src, facts, ids, want = fp32_export
    model = load_onnx(src)
    io_names = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    saved = compact_names(model)
    assert saved > 1000
    assert [v.name for v in model.graph.input] + [v.name for v in model.graph.output] == io_names
    inner = {x for n in model.graph.node for x in [*n.input, *n.output] if x and x not in io_names}
    assert inner and all(len(x) <= 5 for x in inner)
    save_onnx(model, tmp_path / "compact.onnx", external=True)
    onnx.checker.check_model(str(tmp_path / "compact.onnx"))
    got, _ = ort_forward(session(tmp_path / "compact.onnx"), ids, None, facts)
    assert np.array_equal(got, want)
