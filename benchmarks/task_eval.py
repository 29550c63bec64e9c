"""How well do students do the teacher's job on inputs they never saw? PyTorch, greedy, side by side.

    python benchmarks/task_eval.py --task sentiment --prompts benchmarks/data/sentiment-unseen.jsonl \
        runs/sentiment-student [more students ...] [--zero-shot layers:14 even:14]

For each model: its parameters, answer-position top-1 and KL against the teacher (teacher-forced
on the teacher's greedy answers), and the task figures of its own greedy answers against the teacher's (label agreement,
exact match, ROUGE-L; edgekd.device.tasks.score_answers). ``--zero-shot SPEC``: a pruned copy built from
the teacher with that student spec (calibrated on the task's train prompts), without training
(``layers:20+mlp:0.5``, ``layers:17+heads:0.5``; ``budget:F`` also prints every candidate it measured).
Prints a Markdown table; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgekd.device.data import record_truths
from edgekd.device.io import iter_jsonl
from edgekd.device.tasks import label_margins, load_task, score_answers, task_inputs
from edgekd.distill.data import collate, encode_chat, prompt_text
from edgekd.distill.generate import generate_answers
from edgekd.distill.loop import calibration_batches
from edgekd.distill.students import build_student
from edgekd.models import load_model

DEVICE = torch.device("cpu")  # --device: where the models run


@torch.no_grad()
def answer_agreement(model, teacher, tok, prompts: list[str], answers: list[str], batch_size: int = 8) -> tuple[float, float]:
    """At the teacher's answer positions (teacher-forced): the share where ``model``'s argmax is the
    teacher's, and the mean KL(teacher || model) in nats."""
    rows = [encode_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)]
    agree = n = 0
    kl = 0.0
    for i in range(0, len(rows), batch_size):
        b = {k: v.to(DEVICE) for k, v in collate(rows[i : i + batch_size], tok.pad_token_id or 0).items()}
        mask = b["loss_mask"]
        s = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask]
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[mask]
        v = min(s.shape[-1], t.shape[-1])
        agree += int((s[:, :v].argmax(-1) == t[:, :v].argmax(-1)).sum())
        t_logp, s_logp = torch.log_softmax(t[:, :v].float(), -1), torch.log_softmax(s[:, :v].float(), -1)
        kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
        n += int(mask.sum())
    return agree / max(n, 1), kl / max(n, 1)


def greedy(model, tok, prompts: list[str], max_new_tokens: int, ids: bool = False):
    """The greedy answers' texts (``ids=True``: and their token ids)."""
    answers, _ = generate_answers(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                                  batch_size=16, seed=0, max_prompt_tokens=448)
    texts = [a["response"] for a in answers]
    return (texts, [list(a["answer_ids"]) for a in answers]) if ids else texts


@torch.no_grad()
def teacher_margins(teacher, tok, prompts: list[str], answer_ids: list[list[int]], labels) -> list[float | None]:
    """``edgekd.device.tasks.label_margins`` of the teacher's own greedy answers: how decided each label was."""
    out = []
    for p, ans in zip(prompts, answer_ids):
        pid = tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        logits = teacher(input_ids=torch.tensor([pid + ans], device=DEVICE)).logits[0, len(pid) - 1 : len(pid) - 1 + len(ans)]
        out += label_margins([ans], [logits.float().cpu().numpy()], labels, lambda ids: tok.decode(list(ids), skip_special_tokens=True),
                             lambda text: tok.encode(text, add_special_tokens=False))
    return out


def print_generative_table(rows: list[dict]) -> None:
    """ROUGE-L beside the trivial baselines, against the teacher and against the references."""
    cols = ["model", "ROUGE-L vs teacher", "input copied vs teacher", "first sentence vs teacher",
            "ROUGE-L vs reference", "teacher vs reference", "input copied vs reference", "first sentence vs reference"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        t = r.get("truth") or {}
        cells = [r["rouge_l"], r.get("baseline_input_rouge_l"), r.get("baseline_first_sentence_rouge_l"), t.get("rouge_l"),
                 t.get("teacher_rouge_l"), t.get("baseline_input_rouge_l"), t.get("baseline_first_sentence_rouge_l")]
        print(f"| {r['name']} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")


def print_label_tables(rows: list[dict], labels, t_answers: list[str], truths) -> None:
    """Balanced figures beside their baselines: a constant answer must not pass for reading."""
    from edgekd.device.tasks import NO_LABEL, label_of

    t_labels = [label_of(a, labels) for a in t_answers]
    counts = {lab: t_labels.count(lab) for lab in labels}
    print(f"\nteacher labels: {counts}; a constant answer of the teacher's majority label agrees on {max(counts.values()) / max(sum(counts.values()), 1):.3f}, "
          f"balanced agreement of any constant answer: {1 / len(labels):.3f}")
    cols = ["model", "label agreement (95%)", "balanced agreement"] + [f"agreement where teacher {lab}" for lab in labels]
    decided = rows[0].get("teacher_decided_share") if rows else None
    if decided is not None:
        print(f"the teacher decided {decided:.2f} of its labels (its label's logit >= 1 nat over the other's); the rest are near-ties")
        cols += ["where the teacher decided", "on its near-ties"]
    if truths:
        cols += ["accuracy vs truth (95%)", "teacher accuracy (95%)", "drop vs teacher"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        ci = r.get("label_agreement_ci95") or [0, 0]
        cells = [r["name"], f"{r['label_agreement']:.3f} ({ci[0]:.2f}-{ci[1]:.2f})", f"{r['balanced_label_agreement']:.3f}"]
        cells += [f"{r['label_agreement_per_label'].get(lab, float('nan')):.3f}" for lab in labels]
        if decided is not None:
            cells += ["–" if r.get(k) is None else f"{r[k]:.3f}" for k in ("label_agreement_teacher_decided", "label_agreement_teacher_near_tie")]
        if truths:
            t = r["truth"]
            cells += [f"{t['accuracy']:.3f} ({t['accuracy_ci95'][0]:.2f}-{t['accuracy_ci95'][1]:.2f})",
                      f"{t['teacher_accuracy']:.3f} ({t['teacher_accuracy_ci95'][0]:.2f}-{t['teacher_accuracy_ci95'][1]:.2f})",
                      f"{t['accuracy_drop_vs_teacher']:+.3f}"]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        print(f"\n{r['name']}: confusion (rows: teacher's label, columns: the model's)")
        print("| teacher \\ model | " + " | ".join([*labels, NO_LABEL]) + " |\n|" + "---|" * (len(labels) + 2))
        for t, row in r["label_confusion"].items():
            print(f"| {t} | " + " | ".join(str(row[a]) for a in [*labels, NO_LABEL]) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="*", help="distilled student folders")
    ap.add_argument("--task", default=None, help="a task name or folder (labels; zero-shot calibration)")
    ap.add_argument("--prompts", required=True, help="a .jsonl of {\"prompt\"} records never trained on")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--zero-shot", nargs="*", default=[], help="student specs built from the teacher without training")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="where the models run: cpu, or cuda (fp32 either way)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = load_task(args.task) if args.task else None
    labels = task.labels if task else ()
    records = [r for _, r in iter_jsonl(Path(args.prompts))]
    if args.limit:
        records = records[: args.limit]
    prompts = [r["prompt"] for r in records]
    # the records' own truth where they carry one: a label, or a reference answer
    truths = record_truths(records, None)
    teacher, tok = load_model(args.teacher)
    teacher.eval().to(DEVICE)
    t0 = time.time()
    t_answers, t_ids = greedy(teacher, tok, prompts, args.max_new_tokens, ids=True)
    margins = teacher_margins(teacher, tok, prompts, t_ids, labels) if labels else None
    print(f"teacher answered {len(prompts)} prompts in {time.time() - t0:.0f} s")
    models = []
    for spec in args.zero_shot:
        from edgekd.distill.data import encode_records

        calib_prompts = [r["prompt"] for _, r in iter_jsonl(task.train)][:16] if task else prompts[:16]
        recs = [{"prompt": p, "response": a} for p, a in zip(calib_prompts, greedy(teacher, tok, calib_prompts, args.max_new_tokens))]
        examples, _ = encode_records(tok, recs, 512, False)
        student = build_student(spec, teacher, tok, calibration=calibration_batches(examples, tok, 0))
        budget = student.describe.get("scan", {}).get("budget")
        if budget:  # every candidate the budget measured, on its own calibration answers
            print(f"{spec}: chose {budget['chosen']} of " + ", ".join(f"{c['spec']} ({c['parameters'] / 1e6:.1f}M, KL {c['kl']:.3f})" for c in budget["candidates"]))
        name = f"{spec} = {budget['chosen']}" if budget else spec
        models.append((f"{name} (zero-shot)", student.model.eval(), student.describe["num_hidden_layers"]))
    for folder in args.students:
        m, _ = load_model(folder)
        models.append((folder, m.eval().to(DEVICE), m.config.num_hidden_layers))
    rows = []
    for name, model, layers in models:
        t0 = time.time()
        answers = greedy(model, tok, prompts, args.max_new_tokens)
        figures = score_answers(answers, t_answers, labels, truths=truths, inputs=None if labels else task_inputs(prompts),
                                teacher_margins=margins)
        figures["answer_top1"], figures["answer_kl"] = answer_agreement(model, teacher, tok, prompts, t_answers)
        figures.update(name=name, layers=layers, parameters=sum(p.numel() for p in model.parameters()), seconds=round(time.time() - t0, 1),
                       examples=[{"prompt": p, "teacher": t, "student": a} for p, t, a in list(zip(prompts, t_answers, answers))[:3]])
        rows.append(figures)
        print(f"{name}: {json.dumps({k: v for k, v in figures.items() if k != 'examples'})}", flush=True)
    print()
    print(f"{len(prompts)} prompts from {args.prompts}, greedy, up to {args.max_new_tokens} new tokens\n")
    cols = ["model", "layers", "parameters", "answer top-1 vs teacher", "answer KL"] + (["label agreement"] if labels else []) + ["exact match", "ROUGE-L"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r["name"], str(r["layers"]), f"{r['parameters'] / 1e6:.1f}M", f"{r['answer_top1']:.3f}", f"{r['answer_kl']:.3f}"]
        if labels:
            cells.append("–" if r["label_agreement"] is None else f"{r['label_agreement']:.3f}")
        cells += [f"{r['exact_match']:.3f}", f"{r['rouge_l']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    if labels:
        print_label_tables(rows, labels, t_answers, truths)
    else:
        print_generative_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"prompts": args.prompts, "teacher_answers": t_answers, "teacher_margins": margins, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
