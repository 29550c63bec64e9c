#!/usr/bin/env bash
# `edgekd check` on aarch64, from this x86 machine (issue 28, item 1).
#
# A phone's or an ARM board's onnxruntime runs other kernels than x86's (NEON, dot-product, i8mm
# paths for MatMulNBits, GroupQueryAttention, GatherBlockQuantized). This runs the bundle's golden
# replay on onnxruntime's aarch64 wheel, under qemu-user emulation, and beside it on x86:
#
#     sudo bash benchmarks/arm64_check.sh BUNDLE [BUNDLE ...]      # root: debootstrap, chroot, binfmt
#     ARM64_PROMPTS=4 ...                                          # golden prompts replayed (default 4)
#
# Once (cached in $ARM64_CACHE, default ~/.cache/edgekd-arm64; a second run starts in seconds): a
# Debian bookworm arm64 root filesystem (debootstrap --foreign, then its second stage under
# qemu-aarch64-static), a venv there, and edgekd's runtime wheel with its dependencies' aarch64 wheels
# (downloaded here, natively, with pip's --platform; installed there with --no-index). Needs
# `apt-get install debootstrap qemu-user-static` and Debian's and PyPI's mirrors.
#
# Speed under emulation means nothing: only the fidelity figures are compared (--no-speed).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 BUNDLE [BUNDLE ...]" >&2; exit 2; }
cache=${ARM64_CACHE:-$HOME/.cache/edgekd-arm64}
root=$cache/rootfs
prompts=${ARM64_PROMPTS:-4}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$cache"

# qemu-user for aarch64 binaries (F: the interpreter is opened now, so it works inside the chroot)
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
  [[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
fi

if [[ ! -f $root/.edgekd-rootfs ]]; then
  echo "building the arm64 root filesystem in $root (once; minutes)"
  rm -rf "$root"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian
  chroot "$root" /debootstrap/debootstrap --second-stage
  chroot "$root" python3 -m venv /opt/edgekd
  touch "$root/.edgekd-rootfs"
fi

# edgekd's runtime (no torch) into the arm64 venv, from wheels fetched here for aarch64
wheel_dir=$root/wheels
rm -rf "$wheel_dir" && mkdir -p "$wheel_dir"
"$py" -m pip wheel -q --no-deps --no-build-isolation . -w "$wheel_dir"
ort=$("$py" -c "import onnxruntime; print(onnxruntime.__version__)")  # the release the bundles were checked with
"$py" -m pip download -q --only-binary=:all: --python-version 311 --implementation cp \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  -d "$wheel_dir" "onnxruntime==$ort" numpy tokenizers jinja2 typer rich
whl=$(cd "$wheel_dir" && ls edgekd-*.whl)
chroot "$root" /opt/edgekd/bin/pip install -q --no-index --find-links /wheels --force-reinstall "/wheels/$whl"
chroot "$root" /opt/edgekd/bin/python -c "import platform, onnxruntime; print('arm64 side:', platform.machine(), 'onnxruntime', onnxruntime.__version__)"

# /proc and /sys are left out by default: bound in from this x86 host they show an x86 CPU, and
# onnxruntime's cpuinfo then picked kernels that crashed under qemu (segmentation fault at session
# creation, 2026-12-04). Without them cpuinfo warns and onnxruntime takes its portable ARM kernels.
# ARM64_SYS=1 binds them, to compare.
if [[ -n ${ARM64_SYS:-} ]]; then
  for fs in proc sys; do mountpoint -q "$root/$fs" || mount --bind "/$fs" "$root/$fs"; done
  trap 'umount "$root/proc" "$root/sys" 2>/dev/null || true' EXIT
fi
echo "arm64 /proc/cpuinfo as qemu shows it: $(chroot "$root" grep -m1 -E '^(Features|flags)' /proc/cpuinfo 2>/dev/null | cut -c1-120)"
mkdir -p "$root/bundles" runs/arm64
rows=()
for bundle in "$@"; do
  name=$(basename "$(realpath "$bundle")")
  rm -rf "${root:?}/bundles/$name" && cp -r "$bundle" "$root/bundles/$name"
  echo "== $name: x86"
  .venv/bin/edgekd check "$bundle" --no-speed --num-prompts "$prompts" --json "runs/arm64/$name.x86.json" || true
  echo "== $name: aarch64 (emulated)"
  chroot "$root" /opt/edgekd/bin/edgekd check "/bundles/$name" --no-speed --num-prompts "$prompts" \
    --json "/bundles/$name.arm64.json" || true
  cp "$root/bundles/$name.arm64.json" "runs/arm64/$name.arm64.json"
  rows+=("$name")
done

"$py" - "${rows[@]}" <<'PYEOF'
import json, sys
print("\n| bundle | machine | top-1 vs golden | KL | greedy answers identical | mean common prefix |")
print("|---|---|---|---|---|---|")
for name in sys.argv[1:]:
    for arch in ("x86", "arm64"):
        r = json.load(open(f"runs/arm64/{name}.{arch}.json"))
        f = r["fidelity"]["reference"]
        print(f"| {name} | {arch} ({r.get('environment', {}).get('machine', arch)}) | {f['top1']:.3f} | {f['kl_mean']:.4f} | "
              f"{f['greedy_exact']:.2f} | {f['greedy_prefix_tokens']:.1f} |")
PYEOF
