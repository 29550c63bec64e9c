"""How good a judge is the sentiment teacher, and which calibration carries to real reviews?

    python benchmarks/teacher_calibration.py [--teacher smollm2-135m-instruct] [--n 200] [--json FILE]

For each labelled set (the real sets of ``benchmarks/real_sets.py``, their ``eval`` splits; the
task's held-out reviews; ``benchmarks/data/sentiment-independent.jsonl``), the teacher's label
scores z (``edgekd.distill.calibrate``: the largest logit of each label's tokens where its greedy
answer names a label), read two ways: after its own free opening, and after the fixed opening
"The review is" (a task's ``answer_prefix``). Then its accuracy against the people's labels: bare
(argmax z), with each fitted bias (``prior`` on the task's 640 unlabelled training reviews, declared
half and half; ``labels`` on 320 of its labelled training reviews (lines 641-960); ``labels`` on
100 labelled Yelp sentences of the calib split), and cut at each set's own balance point (an oracle:
it looks at the set); and the AUC of z(positive) - z(negative), the teacher's ranking, which no
bias changes. Prints one Markdown table per opening.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_sets

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("positive", "negative")
OPENINGS = {"its own opening": "", "opened 'The review is'": "The review is"}


def read(path: Path) -> list[tuple[str, str | None]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["prompt"], r.get("label")) for r in rows]


def scores(teacher, tok, prompts: list[str], opening: str) -> np.ndarray:
    """``(N, 2)`` label scores, NaN where the answer names no label."""
    from edgekd.distill import calibrate as cal
    from edgekd.distill.generate import generate_answers
    from edgekd.distill.loop import label_token_groups

    groups = label_token_groups(tok, LABELS)
    answers, _ = generate_answers(teacher, tok, prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, batch_size=32, seed=0,
                                  max_prompt_tokens=448, keep_logits_of=[i for g in groups for i in g], answer_prefix=opening)
    return np.array([np.full(2, np.nan) if z is None else z for z in cal.generated_scores(answers, groups)]).reshape(len(prompts), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=200, help="rows of each real set's eval split")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from edgekd.distill import calibrate as cal
    from edgekd.models import load_model, resolve_source

    torch.set_num_threads(2)
    teacher, tok = load_model(resolve_source(args.teacher), dtype=torch.float32)
    splits = real_sets.splits(eval_n=args.n)
    evals = {name: [(real_sets.PROMPT.format(text=t), y) for t, y in parts["eval"]] for name, parts in splits.items()}
    evals["task heldout"] = read(ROOT / "tasks/sentiment/heldout.jsonl")
    evals["independent"] = read(ROOT / "benchmarks/data/sentiment-independent.jsonl")
    train = read(ROOT / "tasks/sentiment/train.jsonl")  # 640 unlabelled reviews, then 640 with their writer's label
    fitting = {"train": train[:640], "train-more": train[640:960],
               "yelp calib": [(real_sets.PROMPT.format(text=t), y) for t, y in splits["uci-yelp"]["calib"]]}
    results: dict = {}
    t0 = time.time()
    for title, opening in OPENINGS.items():
        z = {name: scores(teacher, tok, [p for p, _ in rows], opening) for name, rows in {**fitting, **evals}.items()}
        print(f"[{time.time() - t0:.0f} s] scored every set {title}", file=sys.stderr)
        def named(name: str, rows: list, z: dict = z) -> tuple[np.ndarray, list]:
            """The scores and labels of the rows whose answer named a label."""
            keep = ~np.isnan(z[name][:, 0])
            return z[name][keep], [y for (_, y), k in zip(rows, keep) if k]

        biases = {"bare": np.zeros(2), "prior: 640 unlabelled training reviews": cal.fit_prior(named("train", fitting["train"])[0], [0.5, 0.5])}
        for name, label in (("train-more", "labels: 320 labelled training reviews"), ("yelp calib", "labels: 100 Yelp sentences")):
            zz, yy = named(name, fitting[name])
            biases[label] = cal.fit_labels(zz, [LABELS.index(y) for y in yy])
        rows_out = {}
        for name, rows in evals.items():
            zz, yy = named(name, rows)
            y = np.array([LABELS.index(t) for t in yy])
            s = zz[:, 0] - zz[:, 1]
            balance = float(np.mean((s > np.median(s)) == (y == 0)))
            rows_out[name] = {"named": len(y), "of": len(rows), "auc": cal.auc(s, y == 0), "balance_point": balance,
                              **{k: float(np.mean(np.argmax(zz + b, 1) == y)) for k, b in biases.items()}}
        results[title] = {"cuts": {k: float(b[1] - b[0]) for k, b in biases.items()}, "sets": rows_out}
        print(f"\n### The teacher's label, {title}\n")
        print("| set | named a label | AUC | " + " | ".join(f"{k} (cut {b[1] - b[0]:+.2f})" if k != "bare" else k for k, b in biases.items())
              + " | each set's balance point (oracle) |")
        print("|---|---|---|" + "---|" * (len(biases) + 1))
        for name, r in rows_out.items():
            print(f"| {name} | {r['named']}/{r['of']} | {r['auc']:.3f} | " + " | ".join(f"{r[k]:.3f}" for k in biases)
                  + f" | {r['balance_point']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
