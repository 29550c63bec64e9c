"""Which parts of the teacher matter, measured on calibration text from the run's own data.

- ``block_influence``: ShortGPT's Block Influence, BI_i = 1 - E[cos(x_i, x_{i+1})] over the tokens,
  where x_i is the hidden state entering decoder layer i (Men et al. 2024, arXiv 2403.03853). A
  layer that barely turns the residual stream (BI near 0) can go; ``layers:N`` keeps the N layers
  of highest BI.
- ``iterative_kl``: removes one layer at a time, each time the one whose removal raises the
  KL(teacher || pruned) at the answer positions least (BlockPruner, Zhong et al. 2024,
  arXiv 2406.10594, with KL to the teacher for their perplexity). Each step tries only the
  ``window`` remaining layers of lowest BI, so the scan costs ``window`` forwards a removal.
- ``mlp_channel_importance``: Minitron's activation-based width importance (Muralidharan et al.
  2024, arXiv 2407.14679): the mean |activation| of each MLP intermediate channel (the input of
  ``down_proj``) over the calibration tokens.
- ``attention_head_importance``: Minitron's head importance: the mean L2 norm of each query head's
  attention output (its ``head_dim`` slice of the input of ``o_proj``) over the calibration tokens.

Every function takes ``batches``: a list of ``collate`` outputs ``{"input_ids", "attention_mask",
"loss_mask"} (B, S)``; positions are weighted by ``attention_mask`` (BI, width) or ``loss_mask`` (KL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from edgekd.device.errors import UsageError
from edgekd.models import decoder_of

# Where a decoder keeps its list of layers: ``model.layers`` (Llama, Mistral, Qwen, Gemma, Phi-3, ...),
# ``transformer.h`` (GPT-2).
LAYER_LISTS = ("layers", "h")


def layers_attribute(model) -> str:
    """The name of the decoder's layer list (one of ``LAYER_LISTS``), or a one-line error."""
    decoder = decoder_of(model)
    for name in LAYER_LISTS:
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return name
    raise UsageError(f"cannot scan {type(model).__name__}: its decoder layers are at none of "
                     f"{', '.join('decoder.' + n for n in LAYER_LISTS)}")


def decoder_layers(model) -> torch.nn.ModuleList:
    return getattr(decoder_of(model), layers_attribute(model))


def _run_hooked(model, batches, handles, mask_now: list) -> float:
    """Run the decoder over ``batches`` with the hooks ``handles`` registered (removed after);
    ``mask_now[0]`` holds the current batch's ``attention_mask`` for the hooks. Returns the number
    of real tokens seen."""
    device = next(model.parameters()).device
    seen = 0.0
    try:
        for b in batches:
            mask = b["attention_mask"].to(device).float()
            mask_now[:] = [mask]
            seen += mask.sum().item()
            decoder_of(model)(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def block_influence(model, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """BI of every decoder layer (see the module docstring), averaged over the real tokens."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    mask_now: list[torch.Tensor] = []

    def hook(i):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, S)
            sums[i] += ((1 - cos) * mask_now[0]).sum().double().cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    seen = _run_hooked(model, batches, handles, mask_now)
    return (sums / max(seen, 1)).tolist()


def keep_most_influential(scores: Sequence[float], n: int) -> list[int]:
    """The ``n`` layer indices of highest score, in order (ties: the earlier layer)."""
    if not 1 <= n <= len(scores):
        raise UsageError(f"layers:{n} must be between 1 and the teacher's {len(scores)} layers")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:n])


@torch.no_grad()
def answer_kl(model, batches, teacher_logp: Sequence[torch.Tensor], vocab: int) -> float:
    """Mean KL(teacher || model) at the ``loss_mask`` positions; ``teacher_logp[i]`` is ``(positions, vocab)``."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for b, t_logp in zip(batches, teacher_logp):
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False).logits
        s_logp = torch.log_softmax(logits[..., :vocab].float(), -1)[b["loss_mask"].to(device)]
        total += (t_logp.exp() * (t_logp - s_logp)).sum().item()
        n += t_logp.shape[0]
    return total / max(n, 1)


@torch.no_grad()
def teacher_answer_logp(teacher, batches, vocab: int) -> list[torch.Tensor]:
    device = next(teacher.parameters()).device
    out = []
    for b in batches:
        logits = teacher(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False).logits
        out.append(torch.log_softmax(logits[..., :vocab].float(), -1)[b["loss_mask"].to(device)])
    return out


@torch.no_grad()
def iterative_kl(teacher, batches, n: int, vocab: int, scores: Sequence[float], window: int = 6,
                 on_step: Callable[[int, float], None] | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    """Remove layers one at a time until ``n`` remain (see the module docstring).

    Returns ``(kept layer indices, [{"removed": i, "kl": KL after removing it}, ...])``. The
    teacher's decoder layer list is swapped in place while measuring and restored afterwards."""
    layers = decoder_layers(teacher)
    if not 1 <= n <= len(layers):
        raise UsageError(f"layers-kl:{n} must be between 1 and the teacher's {len(layers)} layers")
    t_logp = teacher_answer_logp(teacher, batches, vocab)
    decoder = decoder_of(teacher)
    attribute = layers_attribute(teacher)
    original, config_layers = layers, teacher.config.num_hidden_layers
    kept = list(range(len(layers)))
    history = []
    try:
        while len(kept) > n:
            candidates = sorted(kept, key=lambda i: (scores[i], i))[:window]
            best = None
            for c in candidates:
                trial = [i for i in kept if i != c]
                setattr(decoder, attribute, torch.nn.ModuleList([original[i] for i in trial]))
                teacher.config.num_hidden_layers = len(trial)
                kl = answer_kl(teacher, batches, t_logp, vocab)
                if best is None or kl < best[1]:
                    best = (c, kl)
            assert best is not None  # len(kept) > n >= 1, so there was a candidate
            kept.remove(best[0])
            history.append({"removed": best[0], "kl": round(best[1], 4)})
            if on_step:
                on_step(best[0], best[1])
    finally:
        setattr(decoder, attribute, original)
        teacher.config.num_hidden_layers = config_layers
    return kept, history


def _input_means(model, batches, owner: str, name: str, stat: Callable[[torch.Tensor], torch.Tensor], what: str) -> list[torch.Tensor]:
    """Per decoder layer, the mean over the real tokens of ``stat(x)``, ``(B, S, C) -> (B, S, C')``,
    where ``x`` is the input of ``layer.<owner>.<name>``; ``what`` names the measure in errors."""
    found = [getattr(getattr(layer, owner, None), name, None) for layer in decoder_layers(model)]
    modules = [m for m in found if m is not None]
    if len(modules) != len(found):
        raise UsageError(f"cannot measure the {what} of {type(model).__name__}: its layers have no {owner}.{name}")
    sums: list[torch.Tensor | None] = [None] * len(modules)
    mask_now: list[torch.Tensor] = []

    def hook(i):
        def fn(module, args):
            s = (stat(args[0].float()) * mask_now[0][..., None]).sum(dim=(0, 1)).double().cpu()
            sums[i] = s if sums[i] is None else sums[i] + s
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    seen = _run_hooked(model, batches, handles, mask_now)
    out = [s for s in sums if s is not None]
    if not seen or len(out) != len(sums):  # no batches: the hooks never ran
        raise UsageError(f"measuring the {what} needs calibration data")
    return [s / seen for s in out]


@torch.no_grad()
def mlp_channel_importance(model, batches) -> list[torch.Tensor]:
    """Per decoder layer, ``(intermediate,)``: the mean |activation| of each MLP intermediate
    channel, the input of ``down_proj`` (Minitron)."""
    return _input_means(model, batches, "mlp", "down_proj", torch.abs, "MLP channel importance")


@torch.no_grad()
def attention_head_importance(model, batches) -> list[torch.Tensor]:
    """Per decoder layer, ``(heads,)``: the mean L2 norm of each query head's attention output over
    the real tokens (Minitron). The input of ``o_proj`` is ``(B, S, heads * head_dim)``, head by head."""
    heads = model.config.num_attention_heads
    return _input_means(model, batches, "self_attn", "o_proj", lambda x: x.reshape(*x.shape[:-1], heads, -1).norm(dim=-1),
                        "attention head importance")
