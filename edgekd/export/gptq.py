"""GPTQ: a model that lies on no grid, rounded to the 4-bit grid so that its layers' outputs move least.

Round-to-nearest rounds each weight on its own. GPTQ (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"; the reference is
github.com/IST-DASLab/gptq, ``gptq.py: GPTQ.fasterquant``) rounds a linear weight one input column at
a time and spreads each column's rounding error over the columns not yet rounded, along the inverse
Hessian ``H = X^T X`` of the layer's inputs ``X`` on calibration text: the error the layer's *output*
sees is what is minimised, not the weights'. Layer by layer, as the reference does: each decoder
layer's inputs come from the layers before it already rounded.

The grid is the one ``matmul_nbits`` stores with onnxruntime's fast 4-bit kernels: symmetric, ``w =
s * q`` with ``q`` in ``[-8, 7]`` and one scale per block of ``block_size`` input features, the scale
set when GPTQ reaches the block (``s = extreme / -8``, onnxruntime's RTN rule, on the weights as GPTQ
has moved them). The rounded model is exported as any model is, and ``matmul_nbits.keep_grid`` finds
each weight on its grid and stores it exactly: 4 bits a weight, no second rounding.

Calibration text is written by the model itself (the shipped training prompts and its own greedy
answers), as LLM-QAT does for quantization-aware training: no dataset to download, and the text is
what the model says.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from edgekd.export.grid import find_grid
from edgekd.quant import ort_blocks, ort_symmetric_scales

DAMP = 0.01         # added to H's diagonal, relative to its mean (the reference's percdamp)
COLUMNS = 128       # columns rounded before the rest of the weight is updated at once (the reference's blocksize)


def block_scales(w: torch.Tensor, bits: int, block_size: int, shrink: Sequence[float] = (1.0,)) -> torch.Tensor:
    """One scale per block of ``block_size`` along ``w``'s columns ((rows, blocks)): onnxruntime's
    ``extreme / -2**(bits-1)``, times the factor in ``shrink`` that rounds the block with the least
    squared error (a smaller scale clips the extreme to resolve the rest finer)."""
    b = ort_blocks(w, block_size)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    base = ort_symmetric_scales(b, bits)
    best, best_err = base, None
    for f in shrink:
        s = base * f
        err = ((b / s).round().clamp(lo, hi) * s - b).pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best[..., 0]


def gptq_weight(w: torch.Tensor, h: torch.Tensor, bits: int = 4, block_size: int = 32, act_order: bool = True,
                shrink: Sequence[float] = (1.0,)) -> torch.Tensor:
    """``w`` (out_features, in_features) on the symmetric ``bits`` grid with blocks of ``block_size``
    along ``in_features``, rounded column by column against ``h`` (in_features, in_features), the sum
    of ``x^T x`` over the calibration inputs. ``act_order``: the columns with the largest inputs
    first (the reference's ``--act-order``), each block's scale set from the weights before
    rounding (AutoGPTQ's static groups). Returns a float32 tensor of ``w``'s shape whose blocks each
    hold at most ``2**bits`` values ``s * q``."""
    w = w.detach().float().clone()
    h = h.detach().double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0  # an input that is always 0: its weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMP * torch.diagonal(h).mean())
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scales = block_scales(w, bits, block_size, shrink).repeat_interleave(block_size, 1)[:, :cols] if act_order else None
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    if scales is not None:
        scales = scales[:, order]
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads to the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    step = max(COLUMNS, block_size)  # a block of the grid never straddles two of GPTQ's column blocks
    q = torch.zeros_like(w)
    scale = torch.ones(rows)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1, err, h1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if scales is not None:
                scale = scales[:, i1 + i]
            elif (i1 + i) % block_size == 0:  # a new block of the grid: its scale from the weights as they are now
                scale = block_scales(w1[:, i : i + block_size], bits, block_size, shrink)[:, 0]
            x = w1[:, i]
            rounded = (x / scale).round().clamp(lo, hi) * scale
            q[:, i1 + i] = rounded
            e = (x - rounded) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(order)]


def decoder_layers(model) -> nn.ModuleList:
    """The model's decoder layers (the ``ModuleList`` of ``config.num_hidden_layers`` modules)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"found no list of {n} decoder layers in {type(model).__name__}")


def node_path(module: str) -> str:
    """The name optimum gives the MatMul of a linear module: ``model.layers.5.mlp.down_proj`` ->
    ``/model/layers.5/mlp/down_proj/MatMul`` (what ``matmul_nbits.int8_nodes`` patterns match)."""
    path = ""
    for part in module.split("."):
        path += f".{part}" if part.isdigit() else f"/{part}"
    return path + "/MatMul"


def _linears(module: nn.Module):
    """``(name, module)`` of each linear map in ``module``: ``nn.Linear``, and GPT-2's ``Conv1D``
    (the same map with its weight stored transposed, as the exported MatMul holds it)."""
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _weight(m: nn.Module) -> torch.Tensor:
    """A linear map's weight as ``(out, in)`` (a view: writing it writes the module's)."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.T


def off_grid(model, block_size: int) -> int:
    """How many of the decoder's linear weights lie on no 4-bit grid at ``block_size``."""
    return sum(find_grid(_weight(m).detach().float().numpy(), block_size) is None
               for layer in decoder_layers(model) for _, m in _linears(layer))


class _Stop(Exception):
    pass


def _layer_calls(model, layers: nn.ModuleList, sequences: Sequence[Sequence[int]]) -> list[list[tuple]]:
    """Each layer's inputs ``(args, kwargs)``, per sequence, from one forward of the unrounded model
    (a layer's own kwargs: Gemma's layers get their own attention mask and rotary tables)."""
    calls: list[list[tuple]] = [[] for _ in layers]

    def recorder(i):
        def hook(module, args, kwargs):
            calls[i].append((args, kwargs))
            if i == len(layers) - 1:
                raise _Stop  # the head is not needed
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for ids in sequences:
                try:
                    model(input_ids=torch.tensor([list(ids)]), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return calls


def _accumulate(gram: torch.Tensor):
    """A forward pre-hook adding ``x^T x`` of a linear's inputs (any leading shape) into ``gram``."""
    def hook(module, inputs):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        gram.add_(x.T @ x)
    return hook


def _run(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``layer`` on hidden states ``x`` with the other inputs it was called with; its hidden states."""
    out = layer(x, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": x})
    return out[0] if isinstance(out, tuple) else out


def gptq_model(model, sequences: Sequence[Sequence[int]], bits: int = 4, block_size: int = 32, act_order: bool = True,
               shrink: Sequence[float] = (1.0,), leave: Callable[[str], bool] = lambda name: False,
               progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose decoder layers' linear weights are GPTQ-rounded on ``sequences``
    (token ids, one calibration text each); the model itself is left as it is. Returns the copy and
    what was done (``layers``, ``linears`` rounded, ``already_on_grid``, ``calibration_texts``,
    ``calibration_tokens``). A weight already on a 4-bit grid at ``block_size`` is left as it is, and
    so is each linear whose module name ``leave`` accepts (``model.layers.3.mlp.down_proj``: the
    profile keeps it at 8 bits)."""
    model = copy.deepcopy(model).eval()
    layers = decoder_layers(model)
    calls = _layer_calls(model, layers, sequences)
    inputs = [args[0] if args else kwargs["hidden_states"] for args, kwargs in calls[0]]  # the first layer's, per sequence
    names = {id(m): n for n, m in model.named_modules()}
    done, kept = 0, 0
    for i, layer in enumerate(layers):
        linears = {}
        for name, m in _linears(layer):
            if leave(names[id(m)]):
                continue
            if find_grid(_weight(m).detach().float().numpy(), block_size) is not None:
                kept += 1  # already on a 4-bit grid (a --qat-bits student): keep_grid stores it as it is
                continue
            linears[name] = m
        grams = {name: torch.zeros(_weight(m).shape[1], _weight(m).shape[1], dtype=torch.float64) for name, m in linears.items()}

        handles = [m.register_forward_pre_hook(_accumulate(grams[name])) for name, m in linears.items()]
        try:
            with torch.inference_mode():
                for x, (args, kwargs) in zip(inputs, calls[i]):
                    _run(layer, x, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, m in linears.items():
            with torch.no_grad():
                _weight(m).copy_(gptq_weight(_weight(m), grams[name], bits, block_size, act_order, shrink).to(m.weight.dtype))
        with torch.inference_mode():  # the next layer sees this one rounded
            inputs = [_run(layer, x, args, kwargs) for x, (args, kwargs) in zip(inputs, calls[i])]
        done += len(linears)
        progress(i + 1, len(layers))
    return model, {"layers": len(layers), "linears": done, "already_on_grid": kept,
                   "calibration_texts": len(sequences), "calibration_tokens": sum(len(s) for s in sequences)}
