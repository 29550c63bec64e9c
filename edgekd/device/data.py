"""Held-out text for validation: which file, and its records as ``{"prompt", "response"?}``.

Where the records come from, first found wins: ``--data FILE``; the held-out prompts of the
task named by ``--task``; the held-out split that
``edgekd distill`` wrote (the manifest's ``source.heldout``); the shipped held-out prompts
(``examples/prompts/heldout.jsonl``, prompts only: the reference answers them).
"""

from __future__ import annotations

from pathlib import Path

from edgekd.device.errors import UsageError
from edgekd.device.io import iter_jsonl
from edgekd.device.paths import SHIPPED_HELDOUT, resource


def load_records(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    """Read a jsonl of ``{"prompt": str, "response": str (optional)}``, keeping a record's own
    truth where it has one (``label`` for a labelled task, ``reference`` for a generative one);
    blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"held-out data {path} does not exist: pass a jsonl of {{\"prompt\", \"response\"}} records")
    records = []
    for n, rec in iter_jsonl(path):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise UsageError(f"{path}:{n} has no non-empty \"prompt\" string")
        response = rec.get("response")
        if response is not None and not isinstance(response, str):
            raise UsageError(f"{path}:{n}: \"response\" must be a string")
        truth = {k: rec[k] for k in ("label", "reference") if isinstance(rec.get(k), str) and rec[k].strip()}
        records.append({"prompt": rec["prompt"], **({"response": response} if response else {}), **truth})
        if limit and len(records) >= limit:
            break
    if not records:
        raise UsageError(f"{path} holds no records: add lines like {{\"prompt\": \"...\"}}")
    return records


def record_truths(records: list[dict], task_folder: str | None, prompt_template: str = "{prompt}") -> list[str | None] | None:
    """Each record's own truth (``label`` or ``reference``); where the records carry none (a
    distillation's held-out split: the teacher's answers), the task's held-out file's, matched by
    prompt (as the task's ``prompt_template`` put it). None when nothing has one."""
    from edgekd.device.tasks import fill_prompt

    truths = [r.get("label") or r.get("reference") for r in records]
    if not any(truths) and task_folder and (Path(task_folder) / "heldout.jsonl").is_file():
        try:
            own = {fill_prompt(prompt_template, r["prompt"]): r.get("label") or r.get("reference")
                   for r in load_records(Path(task_folder) / "heldout.jsonl")}
        except UsageError:
            return None
        truths = [own.get(r["prompt"]) for r in records]
    return truths if any(truths) else None


def choose_data(data: Path | None, *, task_heldout: Path | None = None, heldout: str | None = None) -> tuple[Path, str, list[str]]:
    """``(file, where it came from, notes)`` by the order in the module docstring: ``data`` (--data),
    ``task_heldout`` (--task), ``heldout`` (the manifest's ``source.heldout``), the shipped prompts."""
    notes: list[str] = []
    if data is not None:
        return Path(data), "--data", notes
    if task_heldout is not None:
        return Path(task_heldout), "the held-out prompts of --task", notes
    if heldout:
        if Path(heldout).is_file():
            return Path(heldout), "the distillation's held-out split (manifest source.heldout)", notes
        notes.append(f"the held-out split {heldout} named in the manifest is gone: using the shipped held-out prompts")
    return resource(SHIPPED_HELDOUT), "the shipped held-out prompts", notes
