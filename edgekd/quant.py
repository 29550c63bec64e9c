"""The block-wise weight grid that distillation trains on and export reproduces.

onnxruntime's symmetric round-to-nearest ``MatMulNBits`` quantizer (``matmul_nbits`` with
``algorithm = "rtn"`` and ``symmetric = true``) splits each output row of a weight into blocks of
``block_size`` input features and stores integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` with one
signed fp32 scale per block, chosen so that the block's largest-magnitude weight lands exactly on
``-2**(bits-1)``: ``scale = extreme / -2**(bits-1)``, ``q = clamp(round(w / scale))``. (Read off
onnxruntime 1.32's ``quantize_matmul_4bits``; ``tests/test_quant.py`` checks it against onnxruntime
itself.)

Quantization-aware distillation (``edgekd distill --qat-bits 4``, after LLM-QAT, Liu et al. 2023,
which also distills from the full-precision model on model-written data) trains the student through
:func:`fake_quantize` with a straight-through gradient, and saves the weights *on* the grid. The
grid is a fixed point of the quantizer: exporting that student with the same bits and block size
gives back exactly the weights it was trained and evaluated with, so 4-bit costs no fidelity
against the PyTorch student, and what it costs against the teacher was paid, and measured, while
distilling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

GRID = "onnxruntime MatMulNBits, symmetric round-to-nearest"


def ort_symmetric_grid(w: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """``w`` (out_features, in_features) rounded to onnxruntime's symmetric block-wise grid.

    Blocks run along ``in_features`` (MatMulNBits' K); a short last block is padded with zeros, as
    onnxruntime pads it. Returns a tensor of ``w``'s shape and dtype whose every block holds at most
    ``2**bits`` distinct values. Idempotent: ``grid(grid(w)) == grid(w)``.
    """
    rows, k = w.shape
    blocks = ort_blocks(w.float(), block_size)
    scale = ort_symmetric_scales(blocks, bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = (blocks / scale).round_().clamp_(lo, hi).mul_(scale)  # in place: it runs every training step
    return q.reshape(rows, -1)[:, :k].to(w.dtype)


def ort_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """``w`` (rows, k) as (rows, ceil(k / block_size), block_size), the last block padded with zeros."""
    pad = (-w.shape[1]) % block_size
    return (torch.nn.functional.pad(w, (0, pad)) if pad else w).reshape(w.shape[0], -1, block_size)


def ort_symmetric_scales(blocks: torch.Tensor, bits: int) -> torch.Tensor:
    """onnxruntime's symmetric RTN scale of each block ((rows, n, block) -> (rows, n, 1)): the block's
    largest-magnitude weight over ``-2**(bits-1)``, so that weight lands exactly on the lowest level
    (1 for an all-zero block)."""
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    scale = extreme / -(2 ** (bits - 1))
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def absmax_grid(w: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """``w`` (rows, hidden) rounded to the grid of export's ``quantize_head_embedding`` step (the
    tied head and embedding, one matrix): symmetric, ``scale = max|block| / (2**(bits-1) - 1)``,
    integers in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, blocks along ``hidden`` (which the step
    requires to be a multiple of ``block_size``). Idempotent."""
    rows, k = w.shape
    blocks = w.float().reshape(rows, k // block_size, block_size)
    qmax = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (blocks / scale).round_().clamp_(-qmax, qmax).mul_(scale).reshape(rows, k).to(w.dtype)


GRIDS = {"matmul_nbits": ort_symmetric_grid, "head_embedding": absmax_grid}


class FakeQuantize(nn.Module):
    """A weight parametrization: the forward sees the grid, the gradient passes straight through
    to the full-precision weight (Bengio et al. 2013's straight-through estimator)."""

    def __init__(self, bits: int, block_size: int, grid: str = "matmul_nbits"):
        super().__init__()
        self.bits, self.block_size, self.grid = bits, block_size, grid
        self._key: tuple | None = None
        self._delta: torch.Tensor | None = None

    def on_grid(self, w: torch.Tensor) -> torch.Tensor:
        return GRIDS[self.grid](w, self.bits, self.block_size)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Computed once per weight update: micro-batches, evaluation and a tied head/embedding
        # sharing this module reuse it. A fused optimizer updates weights without bumping _version,
        # so whoever steps one calls refresh_fake_quantize (the distill loop does, by a step hook).
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if key != self._key:
            with torch.no_grad():
                self._delta = self.on_grid(w).sub_(w)
            self._key = key
        return w + self._delta


def refresh_fake_quantize(model) -> None:
    """Forget every cached grid of ``model``: call after changing its weights in place."""
    for mod in model.modules():
        if isinstance(mod, FakeQuantize):
            mod._key, mod._delta = None, None


def quantizable_linears(model) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers that export's ``matmul_nbits`` step turns into MatMulNBits: every
    linear layer but the output head (the head and the tied embedding are ``quantize_head_embedding``'s)."""
    head = model.get_output_embeddings()
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not head]


def attach_fake_quantize(model, bits: int, block_size: int, head_bits: int = 0) -> int:
    """Train ``model``'s quantizable linear weights through the grid (and, with ``head_bits``, the
    head and the embedding through ``quantize_head_embedding``'s); returns how many linear layers.

    A tied head and embedding share one Parameter: both modules get the parametrization, so both
    read the same quantized matrix and the optimizer still sees one weight."""
    layers = quantizable_linears(model)
    for _, mod in layers:
        parametrize.register_parametrization(mod, "weight", FakeQuantize(bits, block_size))
    if head_bits:
        pair = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        tied = len(pair) == 2 and pair[0].weight is pair[1].weight
        shared = FakeQuantize(head_bits, block_size, "head_embedding")
        for mod in {id(m): m for m in pair}.values():
            parametrize.register_parametrization(mod, "weight", shared if tied else FakeQuantize(head_bits, block_size, "head_embedding"))
    return len(layers)


def bake_fake_quantize(model) -> int:
    """Remove the parametrizations, leaving each weight exactly on its grid; returns how many."""
    n = 0
    for _, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod, "weight"):
            fq = next(p for p in mod.parametrizations.weight if isinstance(p, FakeQuantize))
            with torch.no_grad():
                on_grid = fq.on_grid(mod.parametrizations.weight.original)
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            with torch.no_grad():
                mod.weight.copy_(on_grid)
            n += 1
    return n
