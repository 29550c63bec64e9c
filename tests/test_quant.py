"""The quantization grid that `--qat-bits` trains on is onnxruntime's own: checked against
onnxruntime's quantizer, and end to end through `edgekd distill --qat-bits` and `edgekd export`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import parametrize
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.bundle import read_manifest
from edgekd.export import export_bundle
from edgekd.quant import absmax_grid, attach_fake_quantize, bake_fake_quantize, ort_symmetric_grid, refresh_fake_quantize


def unpacked(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packed unsigned integers (two 4-bit values a byte, low nibble first) as int32."""
    if bits == 8:
        return packed.astype(np.int32)
    q = np.zeros((*packed.shape[:-1], packed.shape[-1] * 2), np.int32)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    return q


def ort_dequantized(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """``w`` (out, in) through onnxruntime's symmetric MatMulNBits quantizer and back."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    kb = (k + block - 1) // block
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros(n * kb, np.float32)
    zero_points = np.zeros(n * ((kb * bits + 7) // 8), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(w.T.astype(np.float32)), scales, zero_points, block, n, k, True)
    q = unpacked(packed, bits)
    return ((q - 2 ** (bits - 1)) * scales.reshape(n, kb, 1)).reshape(n, kb * block)[:, :k]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 80])  # 80: a short last block, padded
def test_grid_is_onnxruntimes_and_a_fixed_point(bits, k):
    w = torch.randn(7, k, generator=torch.Generator().manual_seed(bits + k)) * 0.05
    grid = ort_symmetric_grid(w, bits, 32)
    np.testing.assert_allclose(grid.numpy(), ort_dequantized(w.numpy(), bits, 32), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ort_dequantized(grid.numpy(), bits, 32), grid.numpy(), rtol=0, atol=1e-7)
    assert torch.equal(ort_symmetric_grid(grid, bits, 32), grid)
    levels = max(len(torch.unique(b)) for b in torch.nn.functional.pad(grid, (0, (-k) % 32)).reshape(-1, 32))
    assert levels <= 2 ** bits and not torch.equal(grid, w)


def test_fake_quantize_passes_gradients_straight_through_and_bakes_onto_the_grid():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False))
    lin.get_output_embeddings = lambda: None
    w0 = lin[0].weight.detach().clone()
    assert attach_fake_quantize(lin, 4, 32) == 1
    x = torch.randn(3, 64)
    assert torch.allclose(lin(x), x @ ort_symmetric_grid(w0, 4, 32).T, atol=1e-6)
    lin(x).sum().backward()
    grad = lin[0].parametrizations.weight.original.grad
    assert torch.allclose(grad, x.sum(0).expand(8, 64))  # d(sum xW^T)/dW, as if unquantized
    assert bake_fake_quantize(lin) == 1 and not parametrize.is_parametrized(lin[0])
    assert torch.equal(lin[0].weight, ort_symmetric_grid(w0, 4, 32))


def test_the_grid_follows_a_fused_optimizer_step():
    """A fused AdamW updates weights without bumping their version: the cached grid must still move."""
    lin = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False))
    lin.get_output_embeddings = lambda: None
    attach_fake_quantize(lin, 4, 32)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05, fused=True)
    opt.register_step_post_hook(lambda *_: refresh_fake_quantize(lin))
    x = torch.randn(3, 64)
    lin(x).sum().backward()
    opt.step()
    latent = lin[0].parametrizations.weight.original.detach()
    assert torch.equal(lin[0].weight, ort_symmetric_grid(latent, 4, 32))


@pytest.mark.parametrize("bits", [4, 8])
def test_head_grid_is_quantize_head_embeddings(bits):
    from edgekd.export.steps.quantize_head_embedding import _quantize_rows

    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(bits)) * 0.1
    packed, scales = _quantize_rows(w.numpy(), bits, 32)
    q = unpacked(packed, bits)
    deq = ((q - 2 ** (bits - 1)) * scales[..., None]).reshape(10, 64)
    grid = absmax_grid(w, bits, 32)
    np.testing.assert_allclose(grid.numpy(), deq, rtol=0, atol=1e-7)
    assert torch.equal(absmax_grid(grid, bits, 32), grid)


def test_tied_head_and_embedding_stay_one_weight_on_one_grid(tiny_teacher_dir):
    from edgekd.models import load_model

    model, _ = load_model(str(tiny_teacher_dir))
    emb0 = model.get_input_embeddings().weight.detach().clone()
    n_params = len(list(model.parameters()))
    attach_fake_quantize(model, 4, 32, head_bits=8)
    assert len(list(model.parameters())) == n_params  # still one tied matrix for the optimizer
    assert torch.equal(model.get_output_embeddings().weight, absmax_grid(emb0, 8, 32))
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    bake_fake_quantize(model)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, absmax_grid(emb0, 8, 32))


def test_qat_student_exports_to_the_same_weights(tiny_teacher_dir, tmp_path):
    """A --qat-bits 4 student leaves its linear weights on the grid; the rtn export reproduces them:
    the bundle matches the PyTorch student as closely as an fp32 export would."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "response": f"The {w} is blue and calm. " * 2}) + "\n"
                            for w in ["sea", "sky", "wind", "stars", "Rome", "Paris", "poem", "rain"]))
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_teacher_dir), "--student", "layers:2", "--out", str(out),
                                 "--data", str(data), "--heldout", str(data), "--max-steps", "3", "--lr", "3e-3",
                                 "--qat-bits", "4"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "distill.json").read_text())
    assert info["student"]["quantization_aware"]["bits"] == 4 and info["config"]["qat_bits"] == 4
    weights = load_file(str(out / "model.safetensors"))
    linear = [k for k in weights if k.endswith("proj.weight")]
    assert linear and all(torch.equal(ort_symmetric_grid(weights[k], 4, 32), weights[k]) for k in linear)

    # The export: 4-bit RTN on the same grid, the head left fp32, so only the linear layers differ.
    profile = tmp_path / "rtn4.toml"
    profile.write_text('steps = ["matmul_nbits"]\n[matmul_nbits]\nbits = 4\nblock_size = 32\nsymmetric = true\n'
                       'algorithm = "rtn"\naccuracy_level = 0\n[check]\nmax_abs_logit_diff = 100.0\n')
    qat = export_bundle(str(out), str(profile), tmp_path / "qat-bundle")["export_check"]
    plain = export_bundle(str(tiny_teacher_dir), str(profile), tmp_path / "plain-bundle")["export_check"]
    assert qat["max_abs_logit_diff"] < 1e-3 < plain["max_abs_logit_diff"], (qat, plain)
    assert read_manifest(tmp_path / "qat-bundle")["source"]["quantization_aware"]["reproduced_by_recipe"] is True
    # A recipe that re-fits the weights (HQQ) keeps them on their grid all the same (keep_grid)...
    hqq = tmp_path / "hqq4.toml"
    hqq.write_text(profile.read_text().replace('"rtn"', '"hqq"'))
    r = CliRunner().invoke(app, ["export", str(out), "--target", str(hqq), "--out", str(tmp_path / "hqq")])
    assert r.exit_code == 0 and "stored on it exactly" in r.output and "distilled for the 4-bit grid" not in r.output, r.output
    assert read_manifest(tmp_path / "hqq")["export_check"]["max_abs_logit_diff"] < 1e-3
    # ... unless told to re-quantize: then it does not reproduce the grid, and export says so.
    hqq.write_text(hqq.read_text().replace("[matmul_nbits]\n", "[matmul_nbits]\nkeep_grid = false\n"))
    r = CliRunner().invoke(app, ["export", str(out), "--target", str(hqq), "--out", str(tmp_path / "hqq-refit")])
    assert r.exit_code == 0 and "distilled for the 4-bit grid" in r.output, r.output


def test_the_cpu_profile_keeps_an_int4_head_on_its_grid():
    """--qat-head-bits 4 under the cpu profile's int8 head: kept at int4 by keep_grid, so the
    recipe reproduces the student; with keep_grid off it would re-round the head to int8."""
    import dataclasses

    from edgekd.device.bundle import QatGrid
    from edgekd.export import reproduces_qat_grid
    from edgekd.export.profile import load_target

    cpu = load_target("cpu")
    for head_bits in (8, 4):
        assert reproduces_qat_grid(cpu, QatGrid(4, 32, head_bits))
    off = cpu.with_settings(quantize_head_embedding=dataclasses.replace(cpu.settings["quantize_head_embedding"], keep_grid=False))
    assert not reproduces_qat_grid(off, QatGrid(4, 32, 4))
    assert reproduces_qat_grid(off, QatGrid(4, 32, 8))
