"""GPTQ (edgekd.export.gptq): on the grid keep_grid stores, better than round-to-nearest where it
counts (the layer's output on its inputs), and exported exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgekd.export.gptq import gptq_model, gptq_weight
from edgekd.export.grid import find_grid
from edgekd.quant import ort_symmetric_grid


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) inputs with a few large, correlated directions, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * (torch.rand(k, generator=g) ** 4)[:, None] * 3
    return torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)


def test_gptq_weight_is_on_the_grid_and_beats_rtn_on_the_output():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    x = _correlated_inputs(512, 128)
    h = (x.T @ x).double()
    q = gptq_weight(w, h, bits=4, block_size=32)
    assert find_grid(q.numpy(), 32) is not None  # at most 16 levels a block, through zero: stored exactly at 4 bits
    rtn = ort_symmetric_grid(w, 4, 32)
    err_gptq = ((x @ (w - q).T) ** 2).mean()
    err_rtn = ((x @ (w - rtn).T) ** 2).mean()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    assert (w - q).abs().max() > (w - rtn).abs().max() * 0.5  # it moved weights RTN would not: not RTN in disguise


def test_gptq_weight_leaves_a_weight_on_its_grid_alone():
    w = ort_symmetric_grid(torch.randn(16, 64), 4, 32)
    x = _correlated_inputs(256, 64, seed=1)
    assert torch.equal(gptq_weight(w, (x.T @ x).double(), 4, 32), w)


def test_gptq_model_rounds_a_copy_layer_by_layer(tokenizer):
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [list(range(3, 40)), list(range(10, 30))]
    rounded, info = gptq_model(model, texts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself is untouched
    assert info == {"layers": 2, "linears": 14, "already_on_grid": 0, "calibration_texts": 2, "calibration_tokens": 57}
    for name, m in rounded.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            assert find_grid(m.weight.detach().numpy(), 32) is not None, name
    again, info = gptq_model(rounded, texts)  # every weight is on its grid now: nothing to round
    assert info["linears"] == 0 and info["already_on_grid"] == 14
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), rounded.state_dict().values()))


@pytest.mark.slow
def test_export_with_gptq_stores_the_rounded_model_exactly(tiny_teacher_dir, tmp_path):
    """matmul_nbits.algorithm = "gptq": export rounds the model, keep_grid stores every decoder
    weight on its grid, and the bundle computes what the rounded PyTorch model computes (the tied
    head, a MatMul on the embedding's transpose, is no constant weight here: it stays fp32)."""
    from edgekd.device.data import load_records
    from edgekd.device.paths import SHIPPED_TRAIN, resource
    from edgekd.export import export_bundle
    from edgekd.export.onnx import model_facts, ort_forward, session
    from edgekd.export.profile import load_target
    from edgekd.export.steps.matmul_nbits import GPTQ_ANSWER_TOKENS
    from edgekd.models import load_model, model_written_texts

    mobile = load_target("mobile")
    profile = dataclasses.replace(mobile, steps=("matmul_nbits",), external_data=False).with_settings(
        matmul_nbits=dataclasses.replace(mobile.settings["matmul_nbits"], algorithm="gptq", gptq_prompts=3, accuracy_level=0))
    manifest = export_bundle(str(tiny_teacher_dir), profile, tmp_path / "b", golden_prompts=0)
    step = next(r for r in manifest["recipe"] if r["step"] == "matmul_nbits")
    assert step["gptq"]["linears"] == 28 and step["gptq"]["calibration_texts"] == 3
    assert step["kept_on_grid_matmuls"] == step["quantized_matmuls"] == 28  # all on the grid GPTQ left them on

    model, tok = load_model(str(tiny_teacher_dir))
    prompts = [r["prompt"] for r in load_records(resource(SHIPPED_TRAIN), limit=3)]
    rounded, _ = gptq_model(model, model_written_texts(model, tok, prompts, GPTQ_ANSWER_TOKENS))
    ids = np.array([[5, 9, 14, 3, 27, 8, 11]], dtype=np.int64)
    with torch.no_grad():
        expected = rounded(input_ids=torch.from_numpy(ids)).logits.numpy()
    got, _ = ort_forward(session(tmp_path / "b" / "model.onnx"), ids, None, model_facts(model.config))
    assert np.abs(got - expected).max() < 1e-3


def test_node_path_is_the_exported_matmuls_name():
    from edgekd.export.gptq import node_path

    assert node_path("model.layers.5.mlp.down_proj") == "/model/layers.5/mlp/down_proj/MatMul"


@pytest.mark.slow
def test_gptq_leaves_the_int8_nodes_to_8bit_rtn_and_skips_a_model_on_the_grid(tiny_teacher_dir, tmp_path):
    from edgekd.export import export_bundle
    from edgekd.export.profile import load_target

    mobile = load_target("mobile")
    gptq = dataclasses.replace(mobile.settings["matmul_nbits"], algorithm="gptq", gptq_prompts=2, int8_nodes=("down_proj",))
    profile = dataclasses.replace(mobile, steps=("matmul_nbits",), external_data=False).with_settings(matmul_nbits=gptq)
    step = next(r for r in export_bundle(str(tiny_teacher_dir), profile, tmp_path / "b", golden_prompts=0)["recipe"]
                if r["step"] == "matmul_nbits")
    assert step["gptq"]["linears"] == 24 and step["kept_on_grid_matmuls"] == 24  # 4 layers x 6: not down_proj
    assert step["int8_matmuls"] == 4 and step["quantized_matmuls"] == 28

    # A model whose decoder weights are all on the grid (a --qat-bits 4 student): no GPTQ, no calibration
    from conftest import build_model, save_model, tiny_llama_config

    model = build_model(tiny_llama_config(layers=2))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in name:
                m.weight.copy_(ort_symmetric_grid(m.weight, 4, 32))
    from conftest import build_tokenizer

    folder = save_model(model, build_tokenizer(), tmp_path / "qat")
    step = next(r for r in export_bundle(str(folder), profile.with_settings(matmul_nbits=dataclasses.replace(gptq, int8_nodes=())),
                                         tmp_path / "b2", golden_prompts=0)["recipe"] if r["step"] == "matmul_nbits")
    assert "gptq" not in step and step["kept_on_grid_matmuls"] == 14
