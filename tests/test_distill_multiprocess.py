"""`edgekd distill` under `accelerate launch` with 2 CPU processes (gloo), and the GPU path.

accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process unless MPI is installed (it
hands multi-process CPU runs to mpirun); `launch --multi_gpu --num_processes 2` on a machine
without visible GPUs runs torchrun and gives 2 processes with the gloo backend (MULTI_CPU). That
is what this test launches, with CUDA hidden so it means the same on a GPU machine.

Two processes with batch 2 each see the same global batch of 4 as one process with batch 4: the
plan is the same on every process, each takes its rows, the loss is normalised by the global
token count, and DDP averages the gradients. So the loss curves agree up to float summation order
(tolerance: 2e-4 absolute per step, measured differences are ~1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgekd.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _pairs(path: Path) -> Path:
    words = ["sea", "stars", "wind", "Paris", "Rome", "poem", "capital", "blue", "sky", "numbers"]
    path.write_text("".join(
        json.dumps({"prompt": f"Explain the {w}", "response": f"The {w} is near the {words[(i + 3) % 10]}. " * (1 + i % 4)}) + "\n"
        for i, w in enumerate(words * 2)))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(), reason="accelerate CLI missing")
def test_two_cpu_processes_match_one_with_the_same_global_batch(tiny_teacher_dir, tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Tell me about the {w}", "response": f"The {w} is blue."}) + "\n" for w in ["sea", "sky", "wind"]))
    common = ["--teacher", str(tiny_teacher_dir), "--student", "layers:2", "--data", str(pairs), "--heldout", str(held),
              "--max-steps", "8", "--lr", "3e-3", "--checkpoint-every", "4"]
    one = tmp_path / "one"
    r = CliRunner().invoke(app, ["distill", *common, "--out", str(one), "--batch-size", "4"])
    assert r.exit_code == 0, r.output

    two = tmp_path / "two"
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29533", "-m", "edgekd", "distill", *common, "--out", str(two), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    info = json.loads((two / "distill.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 8
    assert _losses(two) == pytest.approx(_losses(one), abs=2e-4)
    # exactly one set of outputs: one metrics line per step, no leftover part files, one cache part per process
    assert len(_losses(two)) == 8
    assert not list(two.rglob(".*part*")) and len(list((two / "cache").glob("topk-*-r*of2.safetensors"))) == 2
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    a = json.loads((one / "distill.json").read_text())["metrics"]["after"]
    b = info["metrics"]["after"]
    assert b["top1_agreement"] == pytest.approx(a["top1_agreement"], abs=0.02) and b["positions"] == a["positions"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run(tiny_teacher_dir, tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "gpu"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_teacher_dir), "--student", "layers:2", "--data", str(pairs),
                                 "--out", str(out), "--max-steps", "6", "--max-heldout", "4"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "distill.json").read_text())
    assert info["device"].startswith("cuda")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows and all("peak_gpu_mem_gb" in r for r in rows)
    assert info["metrics"]["after"]["kl"] < info["metrics"]["before"]["kl"]
