"""``edgekd bench``: the bundle's decode speed beside PyTorch eager ``generate`` of its reference
model (the runtime side of speed is ``edgekd.device.speed``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError
from edgekd.device.speed import DECODE_TOKENS, SPEED_PROMPT, time_runtime


def bench(bundle: Path, reference: str | None = None, max_new_tokens: int = DECODE_TOKENS, threads: int | None = None) -> dict[str, Any]:
    """Decode tokens/s of the bundle (edgekd runtime) against PyTorch eager ``generate`` of its
    reference model, same prompt, same process, greedy, batch 1, eos ignored."""
    import torch

    from edgekd.device.runtime import Runtime
    from edgekd.models import load_model

    rt = Runtime(bundle, threads=threads)
    spec = reference or rt.manifest.source.spec
    if not spec:
        raise UsageError(f"{bundle}'s manifest names no source model: pass --reference")
    ours = time_runtime(rt, decode_tokens=max_new_tokens)
    try:
        model, _ = load_model(spec)
    except UsageError as e:
        raise UsageError(f"the reference {spec!r} could not be loaded ({e}): pass --reference") from None
    if threads:
        torch.set_num_threads(threads)
    ids = torch.tensor([rt.encode_prompt(SPEED_PROMPT)])
    kwargs = dict(do_sample=False, min_new_tokens=None, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **kwargs)  # warm up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        first = time.perf_counter() - t  # prefill + one token: subtracted below to time decode only
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens + 1, **kwargs)
        total = time.perf_counter() - t
    steps = out.shape[1] - ids.shape[1] - 1
    torch_tps = steps / max(total - first, 1e-9)
    return {
        "bundle": str(bundle),
        "reference": spec,
        "providers": rt.session.get_providers(),
        "edgekd_decode_tokens_per_s": ours["decode_tokens_per_s"],
        "torch_decode_tokens_per_s": torch_tps,
        "speedup": ours["decode_tokens_per_s"] / torch_tps,
        "edgekd_prefill_ms": ours["prefill_ms"],
        "prefill_tokens": ours["prefill_tokens"],
        "decode_tokens": max_new_tokens,
    }
