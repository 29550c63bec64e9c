"""The TRL anchor of issue 3: TRL's GKDTrainer (off-policy, forward KL) on the same teacher, student
and teacher-written answers as an `edgekd distill` run, one epoch, batch 4, lr 5e-4; prints its
training tokens/s. Run it in a separate environment (trl pulls datasets, which this stack does not
need; the README's Install section and pyproject.toml give the versions that install together):

    python3 -m venv /tmp/trlenv && /tmp/trlenv/bin/pip install torch==2.13.0 \\
        "trl==1.16.0" "datasets>=4.7,<5" "transformers==4.57.*" accelerate gguf
    edgekd distill --out RUN                                   # any run: its data/train.jsonl is reused
    /tmp/trlenv/bin/python benchmarks/trl_anchor.py RUN/data/train.jsonl GGUF_FILE
    edgekd distill --out RUN2 --data RUN/data/train.jsonl --heldout RUN/data/heldout.jsonl \\
        --epochs 1 --no-cache-teacher --qat-bits 0             # edgekd at equal settings

The student is the teacher's layers [0, 6, 12, 18, 24, 29], as `--student layers:6` builds it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch


def main() -> None:
    data_path, gguf = sys.argv[1], sys.argv[2]
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.pad_token = tok.eos_token = "<|im_end|>"  # the GGUF tokenizer's eos is wrong and it has no pad
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    keep = [0, 6, 12, 18, 24, 29]
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    student.train()

    rows = [json.loads(line) for line in open(data_path, encoding="utf-8") if line.strip()]
    messages = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}] for r in rows]
    tokens = sum(len(tok.apply_chat_template(m)) for m in messages)
    args = GKDConfig(output_dir="/tmp/trl-anchor-out", per_device_train_batch_size=4, learning_rate=5e-4,
                     num_train_epochs=1, lmbda=0.0, beta=0.0, temperature=1.0, max_length=512, seq_kd=False,
                     logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     warmup_ratio=0.05, lr_scheduler_type="cosine", max_grad_norm=1.0, weight_decay=0.0,
                     dataloader_num_workers=0, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                         train_dataset=Dataset.from_dict({"messages": messages}))
    t0 = time.time()
    out = trainer.train()
    wall = time.time() - t0
    print(json.dumps({"engine": "trl GKDTrainer 1.16 (lmbda 0, beta 0: off-policy forward KL)", "examples": len(rows),
                      "tokens": tokens, "train_s": round(wall, 1), "train_tokens_per_s": round(tokens / wall, 1),
                      "train_loss": round(out.training_loss, 4), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
