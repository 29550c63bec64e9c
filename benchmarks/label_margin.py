"""Where does a labelled-task student disagree with the teacher's label? By how sure the teacher was.

    python benchmarks/label_margin.py --task sentiment --prompts benchmarks/data/sentiment-unseen.jsonl \
        runs/sentiment-student [more students ...]

The teacher answers each prompt greedily; at the token where its answer first names a label, the
teacher and every student are scored teacher-forced on the teacher's answer so far. The teacher's
decision margin there is the gap between its two likeliest labels, renormalised over the task's
labels (0 = a coin flip, 1 = certain). Prints, per margin bucket, how many prompts fall in it and
how often each student's likelier label is the teacher's, with how often each side says the first
label (e.g. "positive"): a student that agrees where the teacher is sure and leans one way where it
is not has learnt the task, not the teacher's near-ties. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgekd.device.io import iter_jsonl
from edgekd.device.tasks import label_of, load_task
from edgekd.distill.data import encode_chat
from edgekd.distill.generate import generate_answers
from edgekd.distill.loop import label_token_groups
from edgekd.models import load_model

BUCKETS = [(0.0, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 1.0)]


@torch.no_grad()
def label_logp(model, ids: list[int], pos: int, groups) -> list[float]:
    """Log-probs of each label group at token ``pos`` of ``ids`` (predicted at ``pos - 1``), renormalised."""
    logits = model(input_ids=torch.tensor([ids[:pos]])).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    g = torch.stack([torch.logsumexp(lp[list(ids_)], -1) for ids_ in groups])
    return torch.log_softmax(g, -1).tolist()


def margin(logp: list[float]) -> float:
    top = sorted((torch.tensor(logp).exp()).tolist(), reverse=True)
    return top[0] - top[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="+", help="distilled student folders")
    ap.add_argument("--task", required=True, help="a labelled task (name or folder)")
    ap.add_argument("--prompts", required=True, help="a .jsonl of {\"prompt\"} records never trained on")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    task = load_task(args.task)
    if not task.labels:
        raise SystemExit(f"task {args.task!r} has no labels: this benchmark is for labelled tasks")
    prompts = [r["prompt"] for _, r in iter_jsonl(Path(args.prompts))]
    teacher, tok = load_model(args.teacher)
    teacher.eval()
    groups = label_token_groups(tok, task.labels)
    answers, _ = generate_answers(teacher, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0,
                                  batch_size=16, seed=0, max_prompt_tokens=448)
    students = {s: load_model(s)[0].eval() for s in args.students}
    rows = []
    for p, a in zip(prompts, answers):
        if label_of(a["response"], task.labels) is None:
            continue
        ex = encode_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a["response"]}])
        start = ex.target.index(1)
        pos = next((j for j in range(start, len(ex.ids)) if any(ex.ids[j] in g for g in groups)), None)
        if pos is None:  # the label is spelt with a token outside the groups ("Positively")
            continue
        row = {"prompt": p, "teacher": label_logp(teacher, ex.ids, pos, groups)}
        for name, m in students.items():
            row[name] = label_logp(m, ex.ids, pos, groups)
        rows.append(row)

    def pick(logp):
        return max(range(len(logp)), key=lambda i: logp[i])

    first = task.labels[0]
    print(f"{len(rows)} of {len(prompts)} prompts whose teacher answer names a label with a label token "
          f"({args.prompts}); teacher says {first!r} on {sum(pick(r['teacher']) == 0 for r in rows)}\n")
    header = "| teacher's margin | prompts | teacher says " + repr(first) + " | " + " | ".join(
        f"{s}: agrees / says {first!r}" for s in students) + " |"
    print(header)
    print("|" + "---|" * (3 + len(students)))
    for lo, hi in BUCKETS:
        sel = [r for r in rows if lo <= margin(r["teacher"]) < hi or (hi == 1.0 and margin(r["teacher"]) == 1.0)]
        cells = [f"{lo:.1f}-{hi:.1f}", str(len(sel)), str(sum(pick(r["teacher"]) == 0 for r in sel))]
        for s in students:
            agree = sum(pick(r[s]) == pick(r["teacher"]) for r in sel)
            cells.append(f"{agree / max(len(sel), 1):.2f} / {sum(pick(r[s]) == 0 for r in sel)}")
        print("| " + " | ".join(cells) + " |")
    for s in students:
        print(f"\n{s}: teacher-forced label agreement {sum(pick(r[s]) == pick(r['teacher']) for r in rows) / max(len(rows), 1):.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
