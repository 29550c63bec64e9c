#!/usr/bin/env bash
# Quantization-aware self-distillation (QAD) of a model on no grid, on a lent GPU (issue 30, item 4).
#
# The model is its own teacher; its copy trains through onnxruntime's symmetric 4-bit grid
# (`edgekd distill --teacher M --student M --qat-bits 4`) on the model's own answers to the shipped
# prompts, and is saved on that grid, which the mobile profile's matmul_nbits (keep_grid) stores
# exactly. Side by side: RTN and GPTQ (post-training) and QAD from the model and from its GPTQ copy,
# scored in PyTorch by benchmarks/offgrid_quality.py on 50 unseen prompts.
#
#     GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR=/tmp/qad bash benchmarks/qad_offgrid.sh [STEPS_EPOCHS]
#
# Needs python3 with a CUDA torch and edgekd's dependencies (transformers 4.57); the off-grid proxy
# is built from $GGUF by benchmarks/offgrid_proxy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT_DIR:?set OUT_DIR}
epochs=${1:-6}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
"$py" benchmarks/offgrid_proxy.py "$out/offgrid" "${GGUF:?set GGUF}"
"$py" benchmarks/offgrid_quality.py "$out/offgrid" --save-gptq "$out/gptq" --json "$out/baselines.json" | tee "$out/baselines.md"
echo "baselines: $(( $(date +%s) - t0 )) s"
common=(--teacher "$out/offgrid" --qat-bits 4 --qat-head-bits 8 --max-prompts 0 --max-new-tokens 128 --batch-size 8
        --epochs "$epochs" --checkpoint-every 0 --eval-every 0 --teacher-dtype fp32 --student-dtype fp32)
run() {  # name, student, lr
  "$py" -m edgekd distill "${common[@]}" --student "$2" --lr "$3" --out "$out/$1" >"$out/$1.log" 2>&1 \
    && echo "$1: done" || echo "$1: failed (see $out/$1.log)"
}
run qad-lr2e-5 "$out/offgrid" 2e-5 &
run qad-lr1e-4 "$out/offgrid" 1e-4 &
run qad-gptq-lr2e-5 "$out/gptq" 2e-5 &
run qad-gptq-lr1e-4 "$out/gptq" 1e-4 &
wait
echo "distill: $(( $(date +%s) - t0 )) s"
for r in qad-lr2e-5 qad-lr1e-4 qad-gptq-lr2e-5 qad-gptq-lr1e-4; do
  tail -n 3 "$out/$r.log"
done
ls -d "$out"/qad-*/ 2>/dev/null | grep -v '\.log' >"$out/copies.txt" || true
"$py" benchmarks/offgrid_quality.py "$out/offgrid" $(cat "$out/copies.txt" | xargs -I{} sh -c 'test -f {}/model.safetensors && echo {}') \
  --skip-baselines --json "$out/qad.json" | tee "$out/qad.md"
echo "total: $(( $(date +%s) - t0 )) s"
