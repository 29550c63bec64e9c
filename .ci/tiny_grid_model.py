"""A tiny random Llama with the packaged teacher's tokenizer, baked onto the 4-bit grid that
`edgekd distill --qat-bits 4` trains on: what CI's wheel check exports for cpu and mobile.

    python tiny_grid_model.py OUT_DIR
"""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgekd.models import load_model
from edgekd.quant import attach_fake_quantize, bake_fake_quantize

out = sys.argv[1]
_, tok = load_model("smollm2-135m-instruct")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
model = LlamaForCausalLM(config).eval()
attach_fake_quantize(model, 4, 32, head_bits=8)
bake_fake_quantize(model)
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print(f"tiny grid model in {out}")
