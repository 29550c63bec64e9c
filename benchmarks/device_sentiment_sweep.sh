#!/usr/bin/env bash
# The sentiment recipe's levers, measured side by side on a lent GPU machine (issue 32).
#
# Each lever of benchmarks/RESULTS-students.md's table is one `edgekd distill --task sentiment` with
# a flag or two changed, in fp32 (the CPU recipe's numerics, on the GPU), over two or three seeds:
# the default recipe's own seed spread was as large as any lever's effect. Then
# benchmarks/task_eval.py scores every student on the three sets none of them trained on.
#
# Run from the repository root on a machine where `python3` has torch with CUDA and the packages
# edgekd needs (the device tool's notes: transformers 4.57 and its pins travel as wheels):
#     SWEEP_OUT=/tmp/sweep bash benchmarks/device_sentiment_sweep.sh [SECONDS]
# SECONDS (default 420) bounds the whole sweep: no new run starts past 60% of it, and the
# evaluations stop at it. Students go to $SWEEP_OUT/runs, logs and figures to $SWEEP_OUT.
# SWEEP_CONFIGS=FILE runs FILE's `name|flags` lines instead of the list below; SWEEP_PARALLEL
# (default 4) runs that many at once.
set -u
budget=${1:-420}
out=${SWEEP_OUT:?set SWEEP_OUT}
mkdir -p "$out/runs"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
py=${PYTHON:-python3}

# a task folder with the 640 reviews of train-more.jsonl added (1,280 in all)
more=$out/task-more
rm -rf "$more" && cp -r tasks/sentiment "$more" && cat tasks/sentiment/train-more.jsonl >>"$more/train.jsonl"

# name|flags; most telling first, since the budget may stop the list
if [[ -n ${SWEEP_CONFIGS:-} ]]; then
  sed "s|\$more|$more|g" "$SWEEP_CONFIGS" >"$out/configs.txt"
else
cat >"$out/configs.txt" <<EOF
base-s0|--seed 0
ep3-s0|--seed 0 --epochs 3
kl14-s0|--seed 0 --student layers-kl:14
hidden-s0|--seed 0 --hidden-loss 1.0
onpol-s0|--seed 0 --on-policy 0.5
base-s1|--seed 1
ep3-s1|--seed 1 --epochs 3
kl14-s1|--seed 1 --student layers-kl:14
hidden-s1|--seed 1 --hidden-loss 1.0
onpol-s1|--seed 1 --on-policy 0.5
combo-s0|--seed 0 --epochs 3 --student layers-kl:14 --hidden-loss 1.0
more-s0|--seed 0 --epochs 2 --balance-labels --task $more
lr1e3-s0|--seed 0 --lr 1e-3
base-s2|--seed 2
combo-s1|--seed 1 --epochs 3 --student layers-kl:14 --hidden-loss 1.0
ep3-s2|--seed 2 --epochs 3
bf16-s0|--seed 0 --teacher-dtype auto --student-dtype auto
EOF
fi

# the conversion cache is written once, before runs read it side by side
$py -c "from edgekd.models import load_model; load_model('smollm2-135m-instruct')" || exit 1
echo "teacher converted at $(elapsed) s"

run_one() {
  name=${1%%|*}; flags=${1#*|}
  if (( $(elapsed) > budget * 6 / 10 )); then echo "skip $name: past the training budget"; return; fi
  t0=$(date +%s)
  # fp32 on the GPU, the numerics of the CPU recipe, unless the line says otherwise (the last flag wins)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=4 $py -m edgekd distill --task sentiment --teacher-dtype fp32 --student-dtype fp32 $flags \
      --out "$out/runs/$name" >"$out/runs/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s (at $(elapsed) s)"
}
export -f run_one elapsed
export out budget start py
grep -v '^$' "$out/configs.txt" | xargs -P "${SWEEP_PARALLEL:-4}" -I{} bash -c 'run_one "$@"' _ {}

students=$(for d in "$out"/runs/*/; do [ -f "$d/config.json" ] && echo "${d%/}"; done)
echo "trained: $(echo "$students" | wc -w) students at $(elapsed) s"
left=$(( budget - $(elapsed) ))
for set in independent:benchmarks/data/sentiment-independent.jsonl unseen:benchmarks/data/sentiment-unseen.jsonl \
           heldout:tasks/sentiment/heldout.jsonl; do
  # shellcheck disable=SC2086
  timeout $left $py benchmarks/task_eval.py --device cuda --task sentiment --max-new-tokens 12 --prompts "${set#*:}" \
      --json "$out/eval-${set%%:*}.json" $students >"$out/eval-${set%%:*}.log" 2>&1 &
done
wait
echo "done at $(elapsed) s"
