"""Does a system prompt make the teacher decide? Its accuracy and its label margins, per prompt.

    python benchmarks/teacher_prompts.py

For each system prompt below (and none: the chat template's default), the packaged teacher answers
the three sentiment sets greedily (10 new tokens). Prints per set: accuracy against the human label,
the share of answers naming a label, and the share of labels under 1 nat of margin (a near-tie: the
logit of the label's token over the other label's, where the answer names it). Issue 32 asked whether
the task could give this teacher a decision a student can follow; benchmarks/RESULTS-students.md has
the figures.
"""

import time
from pathlib import Path

import torch

from edgekd.device.io import iter_jsonl
from edgekd.device.tasks import label_of
from edgekd.models import load_model

torch.set_num_threads(2)
teacher, tok = load_model("smollm2-135m-instruct")
pos_id = tok.encode(" positive", add_special_tokens=False)[0]; neg_id = tok.encode(" negative", add_special_tokens=False)[0]
Pos = tok.encode("Positive", add_special_tokens=False)[0]; Neg = tok.encode("Negative", add_special_tokens=False)[0]
sets = {s: [r for _, r in iter_jsonl(Path(p))] for s, p in [("independent", "benchmarks/data/sentiment-independent.jsonl"), ("unseen", "benchmarks/data/sentiment-unseen.jsonl"), ("heldout", "tasks/sentiment/heldout.jsonl")]}
VARIANTS = {
  "default": None,
  "sys-classifier": "You are a sentiment classifier. Read the whole review and decide whether the customer was satisfied. Answer with one word: positive or negative.",
  "sys-short": "Answer with one word: positive or negative.",
  "sys-careful": "You are a careful reader of customer reviews. A review that complains about a product or service is negative, even if it is polite; a review that praises it is positive. Reply: The review is positive. or The review is negative.",
}
def text_for(sys_p, p):
    msgs = ([{"role": "system", "content": sys_p}] if sys_p else []) + [{"role": "user", "content": p}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
for name, sp in VARIANTS.items():
    t0 = time.time(); res = {}
    for s, recs in sets.items():
        acc = n = lab = 0; margins = []
        for i in range(0, len(recs), 16):
            batch = recs[i:i+16]
            texts = [text_for(sp, r["prompt"]) for r in batch]
            tok.padding_side = "left"; tok.pad_token = tok.pad_token or tok.eos_token
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = teacher.generate(**enc, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            gen = out.sequences[:, enc["input_ids"].shape[1]:]
            for b, r in enumerate(batch):
                ans = tok.decode(gen[b], skip_special_tokens=True)
                l = label_of(ans, ["positive", "negative"])
                n += 1; lab += l is not None; acc += l == r["label"]
                # margin at the step where the label token was produced
                for k, t in enumerate(gen[b].tolist()):
                    if t in (pos_id, neg_id, Pos, Neg):
                        sc = out.scores[k][b]
                        a, c = (neg_id, pos_id) if t in (pos_id, neg_id) else (Neg, Pos)
                        margins.append(abs(float(sc[a] - sc[c]))); break
        res[s] = (acc / n, lab / n, sum(m < 1 for m in margins) / max(len(margins), 1))
    print(name, {k: tuple(round(x, 2) for x in v) for k, v in res.items()}, f"{time.time()-t0:.0f}s", "e.g.", repr(ans), flush=True)
