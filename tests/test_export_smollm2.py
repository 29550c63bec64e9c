"""The real teacher through `edgekd export --target cpu`, end to end (about 2 minutes on 2 cores)."""

from __future__ import annotations

import pytest
from conftest import requires_smollm2

from edgekd.device.bundle import read_manifest

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@requires_smollm2
def test_smollm2_cpu_bundle(smollm2_cpu_bundle):
    bundle, manifest = smollm2_cpu_bundle
    assert read_manifest(bundle) == manifest
    check = manifest["export_check"]
    assert check["fp32_max_abs_logit_diff"] < 1e-3
    assert check["size_ratio_vs_fp32"] <= 0.30  # the cpu goal: <= 30% of the fp32 export
    assert check["top1_agreement"] >= 0.95  # on the short probe; the benchmark measures 0.98 on 8 texts
    assert manifest["source"]["spec"] == "smollm2-135m-instruct" and manifest["source"]["kind"] == "gguf"
    m = manifest["model"]
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"], m["vocab_size"]) == (30, 3, 64, 49152)
    steps = {r["step"]: r for r in manifest["recipe"]}
    assert steps["quantize_head_embedding"] == {**steps["quantize_head_embedding"], "tied": True, "shared": True}
    assert steps["fuse_attention"] == {**steps["fuse_attention"], "fused_layers": 30, "packed_qkv_layers": 30}
    assert steps["matmul_nbits"]["kept_on_grid_matmuls"] == 150  # 30 x (qkv, o, gate, up, down): the GGUF's Q4_1, exactly
    assert steps["matmul_nbits"]["grid_offsets_float16"] == 150  # every offset fits float16 (grid_offsets)
    assert steps["quantize_head_embedding"]["head"] == "int8"  # the GGUF's Q8_0 head is on no int4 grid: int8, as asked


@requires_smollm2
def test_onnxruntime_genai_answers_as_edgekd_on_the_real_teacher(smollm2_cpu_bundle):
    """The teacher's tokenizer comes from its GGUF file: the case onnxruntime-genai misread."""
    pytest.importorskip("onnxruntime_genai")
    from test_genai import assert_genai_answers_as_edgekd

    bundle, manifest = smollm2_cpu_bundle
    assert "-> ByteLevel (all 49152 tokens decode alike)" in manifest["tokenizer"]["decoder"]
    assert_genai_answers_as_edgekd(bundle, ["What is the capital of France?", "Correct the grammar: she go to school yesterday."], 16)


@requires_smollm2
def test_smollm2_mobile_bundle(tmp_path, smollm2_fp32_onnx):
    """The mobile profile's ORT file on the real teacher, whose Q8_0 embedding has float16 scales:
    the int8 head at int8 activations once read them as zeros in the .ort (40 logits of drift, top-1 0)."""
    from edgekd.export import export_bundle

    manifest = export_bundle("smollm2-135m-instruct", "mobile", tmp_path / "mobile", golden_prompts=0, fp32_onnx=smollm2_fp32_onnx)
    check = manifest["export_check"]
    assert manifest["model"]["file"] == "model.ort"
    assert check["top1_agreement"] >= 0.9 and check["max_abs_logit_diff"] < 4.0
    steps = {r["step"]: r for r in manifest["recipe"]}
    assert steps["matmul_nbits"]["kept_on_grid_matmuls"] == 150 and "gptq" not in steps["matmul_nbits"]  # a GGUF: its grid
