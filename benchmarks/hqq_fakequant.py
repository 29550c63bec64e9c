"""HQQ vs RTN 4-bit as fake quantization in PyTorch (no onnxruntime graph): top-1 against the
unquantized model on 12 held-out prompts, and the worst relative weight error.
Usage: python benchmarks/hqq_fakequant.py MODEL_FOLDER
Measured 2026-11-28 on a 6-layer student distilled without QAT: RTN 0.515, HQQ 0.211."""
import copy
import json
import sys

import torch
from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval(); tok = AutoTokenizer.from_pretrained(sys.argv[1])
hq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=32, bits=4))
def rtn(w):
    b = w.reshape(w.shape[0], -1, 32); s = b.abs().amax(-1, keepdim=True) / 7
    return (torch.clamp(torch.round(b / s), -8, 7) * s).reshape(w.shape)
def hqq(w):
    wq, scale, zero = hq.quantize_internal(w.clone(), bits=4, group_size=32)
    return ((wq.float().reshape(-1, 32) - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(w.shape)
texts = [json.loads(l)["prompt"] for l in open("examples/prompts/heldout.jsonl")][:12]
ids = [torch.tensor([tok.apply_chat_template([{"role":"user","content":t}], add_generation_prompt=True)]) for t in texts]
with torch.no_grad():
    ref = [m(i).logits[0] for i in ids]
def score(mm):
    a = n = 0
    with torch.no_grad():
        for i, r in zip(ids, ref):
            l = mm(i).logits[0]; a += (l.argmax(-1) == r.argmax(-1)).sum().item(); n += l.shape[0]
    return round(a / n, 3)
for name, fn in [("rtn", rtn), ("hqq", hqq)]:
    q = copy.deepcopy(m)
    worst = (0, "")
    for n_, mod in q.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in n_:
            w = mod.weight.data; d = fn(w); e = (d - w).abs().max().item() / w.abs().max().item()
            worst = max(worst, (e, n_)); mod.weight.data = d
    print(name, "top-1", score(q), "worst max-abs err / max|w|", worst, flush=True)
