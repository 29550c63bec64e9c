"""A bundle's memory: the head computes only the rows generation reads (export's ``logits_to_keep``
step), and validate/check measure the resident memory by stage in a fresh process and gate it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekd.device.check import CheckConfig, check_bundle
from edgekd.device.runtime import Runtime
from edgekd.device.session import keeps_logits
from edgekd.device.speed import measure_memory, memory_line
from edgekd.export import export_bundle
from edgekd.export.onnx import feeds_for, session
from edgekd.export.steps import STEPS, load_onnx
from edgekd.export.steps.logits_to_keep import LogitsToKeep, head_input

PROFILE = """
description = "fp32 with the head on the kept rows, for the memory tests"
steps = [{steps}]
[gates]
max_peak_rss_mb = {limit}
"""
PROMPT = "Tell me about the sea, the ships and the harbour at night."


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_teacher_dir):
    """The tiny teacher exported at fp32 twice: with the ``logits_to_keep`` step and without."""
    root = tmp_path_factory.mktemp("memory")
    out = {}
    for name, steps, limit in (("kept", '"logits_to_keep"', 1e5), ("all", "", 1e5), ("tight", '"logits_to_keep"', 0.001),
                               ("fused", '"fuse_attention", "logits_to_keep"', 1e5)):
        profile = root / f"{name}.toml"
        profile.write_text(PROFILE.format(steps=steps, limit=limit), encoding="utf-8")
        if name != "tight":
            export_bundle(str(tiny_teacher_dir), profile, root / name, golden_prompts=2)
        out[name] = root / name if name != "tight" else profile
    return out


def _profiled_shapes(model_path, ids: np.ndarray, tmp_path) -> list[list[int]]:
    """The output shapes of every node onnxruntime ran for one prefill of ``ids`` (its profiler)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    first = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    sess.run(["logits"], feeds_for(sess.get_inputs(), ids, None, {"num_kv_heads": first.shape[1], "head_dim": first.shape[3]}))
    events = json.loads(open(sess.end_profiling(), encoding="utf-8").read())
    shapes = [list(shape.values())[0] for e in events if e.get("cat") == "Node"
              for shape in e.get("args", {}).get("output_type_shape", [])]
    return [s for s in shapes if len(s) >= 2]


def test_generation_computes_the_head_for_the_last_position_only(bundles, tmp_path):
    kept, full = Runtime(bundles["kept"]), Runtime(bundles["all"])
    assert kept.keeps_logits and not full.keeps_logits
    ids = kept.encode_prompt(PROMPT)
    assert len(ids) > 8
    last = kept.prefill_logits(ids)
    every = full.prefill_logits(ids)
    assert last.shape == (1, kept.vocab_size) and every.shape == (len(ids), kept.vocab_size)
    assert np.abs(last[0] - every[-1]).max() < 1e-5
    assert kept.generate(PROMPT, max_new_tokens=12) == full.generate(PROMPT, max_new_tokens=12)
    # no node of the prefill made a row of logits for each prompt position
    vocab = kept.vocab_size
    shapes = _profiled_shapes(kept.model_path, np.asarray([ids]), tmp_path)
    wide = [s for s in shapes if s[-1] == vocab]
    assert wide and all(s[-2] == 1 for s in wide), wide
    assert any(s[-1] == vocab and s[-2] == len(ids) for s in _profiled_shapes(full.model_path, np.asarray([ids]), tmp_path))


def test_every_row_is_there_when_asked_for(bundles):
    """``logits_to_keep = 0`` gives every position, as the graph without the step (scoring in one run)."""
    a, b = session(bundles["kept"] / "model.onnx"), session(bundles["all"] / "model.onnx")
    assert keeps_logits(a) and not keeps_logits(b)
    first = next(i for i in a.get_inputs() if i.name.startswith("past_key_values."))
    facts = {"num_kv_heads": first.shape[1], "head_dim": first.shape[3]}
    ids = np.array([[5, 17, 99, 250, 3, 42, 7]], dtype=np.int64)
    want = b.run(["logits"], feeds_for(b.get_inputs(), ids, None, facts))[0]
    for keep, rows in ((0, 7), (3, 3), (100, 7)):
        got = a.run(["logits"], {**feeds_for(a.get_inputs(), ids, None, facts), "logits_to_keep": np.array(keep)})[0]
        assert got.shape[1] == rows and np.abs(got - want[:, -rows:]).max() < 1e-5
    assert read_step(bundles["kept"])["sliced_at"]  # the recipe says where


def read_step(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    return next(r for r in manifest["recipe"] if r["step"] == "logits_to_keep")


def test_the_step_keeps_the_ort_format_input_and_leaves_a_graph_it_cannot_read(tmp_path, bundles):
    from onnx import TensorProto, helper

    ort_file = tmp_path / "ort" / "model.ort"
    STEPS["to_ort"].fn(bundles["kept"] / "model.onnx", ort_file, STEPS["to_ort"].settings(), None)
    assert keeps_logits(session(ort_file))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    assert head_input(graph) is None
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "model.onnx"
    from edgekd.export.steps import save_onnx

    save_onnx(helper.make_model(graph), src)
    info = STEPS["logits_to_keep"].fn(src, dst, LogitsToKeep(), None)
    assert info["kept_positions"] == 0 and "found no tensor" in info["not_applied"]
    assert [n.op_type for n in load_onnx(dst).graph.node] == ["Relu"]


def test_memory_is_measured_by_stage_in_a_fresh_process_and_gated(bundles):
    mem = measure_memory(bundles["kept"])
    assert list(mem["stages"]) == ["tokenizer", "session", "prefill", "decode"] and mem["logits_to_keep"] and not mem["torch_imported"]
    assert mem["peak_rss_mb"] >= mem["interpreter_mb"] > 10 and mem["bundle_peak_mb"] > 0
    assert mem["peak_over_model"] == pytest.approx(mem["bundle_peak_mb"] / mem["model_mb"])
    assert "above the bare interpreter" in memory_line(mem)
    report = check_bundle(bundles["kept"], CheckConfig(target=str(bundles["tight"])))
    gate = next(g for g in report.gates if g.name == "max_peak_rss_mb")
    assert not gate.passed and not report.passed and report.cost["bundle_peak_rss_mb"] == gate.value


def test_fused_attention_keeps_one_kv_buffer_written_in_place(bundles):
    """Where every layer is GroupQueryAttention, past and present are one buffer sized for the
    context; the answers and every logit are those of the two swapped buffers."""
    manifest = json.loads((bundles["fused"] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model"]["past_present_share_buffer"] is True
    assert json.loads((bundles["kept"] / "manifest.json").read_text(encoding="utf-8"))["model"]["past_present_share_buffer"] is False
    one, two = Runtime(bundles["fused"]), Runtime(bundles["fused"])
    two.shares_kv = False  # as a bundle without the flag is run
    ids = one.encode_prompt(PROMPT)
    a, b = list(one.generate_ids(ids, 20, stop_at_eos=False)), list(two.generate_ids(ids, 20, stop_at_eos=False))
    assert a == b and len(one._kv.buffers) == 1 and len(two._kv.buffers) == 2
    assert np.abs(one.score(ids, a) - two.score(ids, a)).max() < 1e-5
    longer = one.encode_prompt(PROMPT * 3)  # a longer prompt grows the one buffer
    assert list(one.generate_ids(longer, 8, stop_at_eos=False)) == list(two.generate_ids(longer, 8, stop_at_eos=False))


def test_a_prepared_model_is_made_once_per_machine_and_answers_alike(bundles, tmp_path):
    from edgekd.device.errors import UsageError
    from edgekd.device.prepared import DONE

    plain = Runtime(bundles["fused"])
    first = Runtime(bundles["fused"], prepared=tmp_path / "cache")
    made = first.session_path
    assert made.parent.parent == tmp_path / "cache" and (made.parent / DONE).is_file()
    assert (made.parent / "model.onnx.data").is_file() and not list((tmp_path / "cache").glob(".preparing-*"))
    stamp = made.stat().st_mtime_ns
    again = Runtime(bundles["fused"], prepared=tmp_path / "cache")
    assert again.session_path == made and made.stat().st_mtime_ns == stamp  # reused, not made again
    ids = plain.encode_prompt(PROMPT)
    want = list(plain.generate_ids(ids, 16, stop_at_eos=False))
    assert list(again.generate_ids(ids, 16, stop_at_eos=False)) == want
    assert np.abs(again.score(ids, want) - plain.score(ids, want)).max() < 1e-4
    blocked = tmp_path / "file"
    blocked.write_text("not a folder", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot write the prepared model under .*: give a writable folder"):
        Runtime(bundles["fused"], prepared=blocked / "cache")
