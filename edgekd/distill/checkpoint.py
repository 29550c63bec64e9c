"""Atomic checkpoints for ``--resume``.

A checkpoint is a folder ``checkpoints/step-0000050/`` holding ``model.safetensors`` (the student),
``optimizer.pt`` (AdamW state and the torch RNG, read back with ``torch.load(weights_only=True)``)
and ``state.json``. It is written under a hidden temporary name, each file fsynced, and renamed
into place in one step: a kill at any moment leaves either the previous checkpoints or the new
one, never a half-written folder under a ``step-*`` name. ``latest`` also skips any checkpoint it
cannot read, falling back to the one before.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

FILES = ("model.safetensors", "optimizer.pt", "state.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, step: int, model, optimizer, keep: int = 2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*"):  # torn writes of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    for name in FILES:
        _fsync(tmp / name)
    if final.exists():  # the same step written again after a resume from an older checkpoint
        old = folder / f".step-{step:07d}.old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(folder)
    for old in complete(folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(folder: Path) -> list[Path]:
    """Checkpoint folders with every file present, newest first (hidden temporary ones never)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest(folder: Path) -> Path | None:
    """The newest checkpoint whose state file reads back, or None."""
    for path in complete(folder):
        try:
            json.loads((path / "state.json").read_text())["step"]
            return path
        except (ValueError, KeyError, OSError):
            continue
    return None


def load(path: Path, model, optimizer) -> int:
    """Restore the student, the optimizer and the RNG from ``path``; return the step it was saved at."""
    step = json.loads((path / "state.json").read_text())["step"]
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(step)
