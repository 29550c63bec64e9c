#!/usr/bin/env bash
# `edgekd check` on aarch64, from this x86 machine (issue 28, item 1).
#
# A phone's or an ARM board's onnxruntime runs other kernels than x86's (NEON, dot-product, i8mm
# paths for MatMulNBits, GroupQueryAttention, GatherBlockQuantized). This runs the bundle's golden
# replay on onnxruntime's aarch64 wheel, under qemu-user emulation, and beside it on x86:
#
#     sudo bash benchmarks/arm64_check.sh BUNDLE [BUNDLE ...]      # root: debootstrap, chroot, binfmt
#     ARM64_PROMPTS=4 ...                                          # golden prompts replayed (default 4)
#     ARM64_CPUS="neoverse-n1 max,sve=off,sme=off" ...             # the emulated CPUs (qemu -cpu), one run each
#
# Once (cached in $ARM64_CACHE, default ~/.cache/edgekd-arm64; a second run starts in seconds): a
# Debian bookworm arm64 root filesystem (debootstrap --foreign, then its second stage under
# qemu-aarch64-static), a venv there, and edgekd's runtime wheel with its dependencies' aarch64 wheels
# (downloaded here, natively, with pip's --platform; installed there with --no-index). Needs
# `apt-get install debootstrap qemu-user-static` and Debian's and PyPI's mirrors.
#
# Speed under emulation means nothing: only the fidelity figures are compared (--no-speed).
#
# The CPUs: onnxruntime picks its aarch64 kernels from the CPU's feature bits (getauxval's HWCAP,
# HWCAP2, where cpuinfo cannot read /proc and /sys), so each emulated CPU is one kernel family:
#   neoverse-n1          NEON + dot product (sdot): Cortex-A76/A78-class phones, Graviton 2
#   max,sve=off,sme=off  + i8mm (smmla) and bf16: Armv8.6+ phones (Cortex-A710/X2 on), Graviton 3 without SVE
# qemu's default CPU ("max") also offers SVE and SME, and emulates them so slowly that a 2-layer
# model's replay took 34 s against 6 s (2026-12-04): the teacher's did not finish in 50 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 BUNDLE [BUNDLE ...]" >&2; exit 2; }
cache=${ARM64_CACHE:-$HOME/.cache/edgekd-arm64}
root=$cache/rootfs
prompts=${ARM64_PROMPTS:-4}
read -r -a cpus <<<"${ARM64_CPUS:-neoverse-n1 max,sve=off,sme=off}"
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
# creation, 2026-12-04). Without them cpuinfo warns and onnxruntime reads the emulated CPU's features
# from getauxval instead (onnxruntime's cpuid_info.cc, ArmLinuxInit). ARM64_SYS=1 binds them, to compare.
if [[ -n ${ARM64_SYS:-} ]]; then
  for fs in proc sys; do mountpoint -q "$root/$fs" || mount --bind "/$fs" "$root/$fs"; done
  trap 'umount "$root/proc" "$root/sys" 2>/dev/null || true' EXIT
fi
hwcaps='import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; h, h2 = f(16), f(26)
print(" ".join(n for n, on in (("dotprod", h >> 20 & 1), ("sve", h >> 22 & 1), ("i8mm", h2 >> 13 & 1), ("bf16", h2 >> 14 & 1), ("sme", h2 >> 23 & 1)) if on))'
mkdir -p "$root/bundles" runs/arm64
rows=()
for bundle in "$@"; do
  name=$(basename "$(realpath "$bundle")")
  rm -rf "${root:?}/bundles/$name" && cp -r "$bundle" "$root/bundles/$name"
  echo "== $name: x86"
  .venv/bin/edgekd check "$bundle" --no-speed --num-prompts "$prompts" --json "runs/arm64/$name.x86.json" || true
  for cpu in "${cpus[@]}"; do
    tag=${cpu%%,*}; [[ $cpu == *sve=off* ]] && tag=$tag-nosve
    echo "== $name: aarch64 $cpu, emulated (features: $(QEMU_CPU=$cpu chroot "$root" /opt/edgekd/bin/python -c "$hwcaps"))"
    QEMU_CPU=$cpu chroot "$root" /opt/edgekd/bin/edgekd check "/bundles/$name" --no-speed --num-prompts "$prompts" \
      --json "/bundles/$name.$tag.json" 2> >(grep -v cpuinfo >&2) || true
    cp "$root/bundles/$name.$tag.json" "runs/arm64/$name.arm64-$tag.json"
    echo "$cpu" >"runs/arm64/$name.arm64-$tag.cpu"
  done
  rows+=("$name")
done

# One contrib operator at a time (benchmarks/arm64_ops.py), here and on each emulated CPU, with and
# without KleidiAI's kernels: which kernel answers otherwise on ARM, and which setting makes it agree.
ops=runs/arm64/ops
"$py" benchmarks/arm64_ops.py build "$ops" >/dev/null
"$py" benchmarks/arm64_ops.py run "$ops" "$ops/x86.npz" >/dev/null
rm -rf "$root/ops" && cp -r "$ops" "$root/ops" && cp benchmarks/arm64_ops.py "$root/ops/"
runs=("$ops/x86.npz")
for cpu in "${cpus[@]}"; do
  tag=${cpu%%,*}; [[ $cpu == *sve=off* ]] && tag=$tag-nosve
  QEMU_CPU=$cpu chroot "$root" /opt/edgekd/bin/python /ops/arm64_ops.py run /ops "/ops/arm64-$tag.npz" >/dev/null 2>&1
  QEMU_CPU=$cpu chroot "$root" /opt/edgekd/bin/python /ops/arm64_ops.py run /ops "/ops/arm64-$tag-no-kleidiai.npz" \
    --config mlas.disable_kleidiai=1 >/dev/null 2>&1
  cp "$root/ops/arm64-$tag.npz" "$root/ops/arm64-$tag-no-kleidiai.npz" "$ops/"
  runs+=("$ops/arm64-$tag.npz" "$ops/arm64-$tag-no-kleidiai.npz")
done
echo
"$py" benchmarks/arm64_ops.py compare "$ops" "${runs[@]}"

"$py" - "${rows[@]}" <<'PYEOF'
import json, pathlib, sys
print("\n| bundle | machine | top-1 vs golden | KL | greedy answers identical | mean common prefix |")
print("|---|---|---|---|---|---|")
for name in sys.argv[1:]:
    for f in sorted(pathlib.Path("runs/arm64").glob(f"{name}.*.json"), key=lambda p: "x86" not in p.name):
        r, arch = json.loads(f.read_text()), f.name[len(name) + 1:-5]
        cpu = f.with_suffix(".cpu")
        machine = f"aarch64 ({cpu.read_text().strip()}, emulated)" if cpu.exists() else "x86_64"
        g = r["fidelity"]["reference"]
        print(f"| {name} | {machine} | {g['top1']:.3f} | {g['kl_mean']:.4f} | {g['greedy_exact']:.2f} | {g['greedy_prefix_tokens']:.1f} |")
PYEOF
