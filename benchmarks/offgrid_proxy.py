"""An off-grid stand-in for a distilled student, until one exists: the SmolLM2 teacher with every
decoder linear weight moved by Gaussian noise of a third of its 4-bit step (per block of 32), saved
as a Hugging Face folder. The GGUF teacher's weights sit on a Q4_1 grid that HQQ nearly recovers;
a trained student's do not, and neither do these.

    python benchmarks/offgrid_proxy.py runs/offgrid [TEACHER]   # TEACHER: default the packaged SmolLM2 (a .gguf path works)
    python benchmarks/export_fidelity.py runs/offgrid --variants fp32,mobile,cpu --answer-tokens 0 --no-speed
"""

import sys

import torch

from edgekd.models import load_model

model, tok = load_model(sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m-instruct")
torch.manual_seed(0)
with torch.no_grad():
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            blocks = mod.weight.view(mod.weight.shape[0], -1, 32)
            step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
            blocks += torch.randn_like(blocks) * step / 3
model.save_pretrained(sys.argv[1], safe_serialization=True)
tok.save_pretrained(sys.argv[1])
