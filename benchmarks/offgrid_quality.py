"""How close does each 4-bit copy of a model stay to it, in PyTorch? Top-1 agreement and mean
KL(model || copy) on the model's own greedy answers to unseen prompts (teacher-forced, every
position of prompt and answer), side by side with round-to-nearest on onnxruntime's symmetric
4-bit grid, block 32 (the mobile profile's RTN) and GPTQ (edgekd.export.gptq) on the same model.

    python benchmarks/offgrid_quality.py runs/offgrid [COPY_FOLDER ...] [--prompts FILE] [--num-prompts 50]

A COPY_FOLDER is a Hugging Face folder of the same architecture, e.g. a quantization-aware
self-distilled copy (`edgekd distill --teacher M --student M --qat-bits 4`), whose weights lie on
the grid: its figures here are its bundle's up to onnxruntime's arithmetic (keep_grid stores them
exactly). The decoder's linear weights are what RTN and GPTQ round; the head and embedding stay fp32
here (export stores them int8).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from edgekd.device.data import load_records
from edgekd.device.paths import SHIPPED_TRAIN, resource
from edgekd.export.gptq import decoder_layers, gptq_model
from edgekd.models import load_model, model_written_texts
from edgekd.quant import ort_symmetric_grid


def rtn(model):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in decoder_layers(out):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(ort_symmetric_grid(m.weight, 4, 32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("copies", nargs="*", help="Hugging Face folders to score against the model")
    ap.add_argument("--prompts", type=Path, default=Path("benchmarks/data/general-unseen.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--gptq-prompts", type=int, default=64)
    ap.add_argument("--skip-baselines", action="store_true", help="only the copies")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save-gptq", type=Path, help="also save the GPTQ-rounded copy here (a Hugging Face folder)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model, tok = load_model(args.model)
    model.eval()
    prompts = [r["prompt"] for r in load_records(args.prompts, limit=args.num_prompts)]
    texts = model_written_texts(model, tok, prompts, args.answer_tokens)

    def logits(m):
        m = m.to(device)
        with torch.inference_mode():
            out = [m(input_ids=torch.tensor([t], device=device)).logits[0].float().cpu() for t in texts]
        m.to("cpu")
        return out

    ref = logits(model)

    def score(m) -> dict:
        agree, kls = [], []
        for r, o in zip(ref, logits(m)):
            agree.append((r.argmax(-1) == o.argmax(-1)).float())
            lp, lq = r.log_softmax(-1), o.log_softmax(-1)
            kls.append((lp.exp() * (lp - lq)).sum(-1))
        return {"top1": torch.cat(agree).mean().item(), "kl": torch.cat(kls).mean().item(), "positions": len(torch.cat(agree))}

    rows = []
    if not args.skip_baselines:
        rows.append({"copy": "RTN (ort symmetric, block 32)", **score(rtn(model))})
        t0 = time.time()
        cal = model_written_texts(model, tok, [r["prompt"] for r in load_records(resource(SHIPPED_TRAIN), limit=args.gptq_prompts)], 64)
        rounded, _ = gptq_model(model, cal)
        if args.save_gptq:
            rounded.save_pretrained(args.save_gptq, safe_serialization=True)
            tok.save_pretrained(args.save_gptq)
        rows.append({"copy": f"GPTQ ({args.gptq_prompts} prompts, {time.time() - t0:.0f} s)", **score(rounded)})
    for folder in args.copies:
        m, _ = load_model(folder)
        rows.append({"copy": folder, **score(m.eval())})
    print(f"\n{args.model} vs each copy, {len(texts)} unseen prompts ({args.prompts}), the model's greedy answers "
          f"of {args.answer_tokens} tokens, {rows[0]['positions'] if rows else 0} positions\n")
    print("| copy | top-1 vs the model | mean KL |\n|---|---|---|")
    for r in rows:
        print(f"| {r['copy']} | {r['top1']:.3f} | {r['kl']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
