"""Is fp16 faithful for SmolLM2? The largest activations per Linear/norm input, and PyTorch fp16
(CPU, fp32 accumulation) against fp32 on 8 held-out prompts.
Usage: python benchmarks/fp16_check.py
Measured 2026-11-28: peak 24,926 (< 65,504); top-1 1.000 on 309 positions, no inf/NaN."""
import json

import torch

from edgekd.models import load_model

m, tok = load_model("smollm2-135m-instruct"); m.eval()
mx = {}
def hook(name):
    def h(mod, inp, out):
        mx[name] = max(mx.get(name, 0), out.abs().max().item())
        mx[name+":in"] = max(mx.get(name+":in", 0), inp[0].abs().max().item())
    return h
for n, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear) or n.endswith("norm") or n.endswith("layernorm"):
        mod.register_forward_hook(hook(n))
texts = [json.loads(l)["prompt"] for l in open("examples/prompts/heldout.jsonl")][:8]
ids = [tok.apply_chat_template([{"role":"user","content":t}], add_generation_prompt=True) for t in texts]
with torch.no_grad():
    outs32 = [m(torch.tensor([i])).logits[0] for i in ids]
top = sorted(mx.items(), key=lambda kv: -kv[1])[:12]
for k, v in top: print(f"{k:45s} {v:10.1f}")
m16 = m.half()
with torch.no_grad():
    agree = n = 0
    for i, l32 in zip(ids, outs32):
        l16 = m16(torch.tensor([i])).logits[0].float()
        agree += (l16.argmax(-1) == l32.argmax(-1)).sum().item(); n += len(i)
        print("nan/inf", (~torch.isfinite(l16)).sum().item(), end="; ")
print("\ntorch fp16 (CPU) top-1 vs fp32:", agree / n, n)
