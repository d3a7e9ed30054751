#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the same llama.cpp sources as the installed
# llama-cpp-python (its sdist vendors them), for bench/serve_load.py --engine and the tests
# marked `real` in tests/test_real_scale.py (tests/support/engines.py finds it).
#
#   bench/build_llama_server.sh                 # into ~/.cache/crecli-llama-server
#   bench/build_llama_server.sh /opt/llama      # into another folder (outside the repo)
#   JOBS=4 CMAKE_ARGS="-DGGML_CUDA=on" bench/build_llama_server.sh
#
# Only the `llama-server` target is built (a few minutes on 2 cores), in Release, with
# llama.cpp's CPU defaults; CMAKE_ARGS is passed to cmake as pip passes it to
# llama-cpp-python's build, so give it the flags your llama-cpp-python was built with.
# No web UI (nothing is downloaded at build time), no TLS. The path of the binary is the
# last line printed; export CRE_LLAMA_SERVER=<it> if you built it elsewhere than the default.
set -euo pipefail

PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=${1:-$HOME/.cache/crecli-llama-server}
JOBS=${JOBS:-2}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')}

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
case "$OUT/" in
  "$REPO/"*) echo "build folder $OUT is inside the repository ($REPO); pick another" >&2; exit 2 ;;
esac

SDIST="$OUT/sdist"
SRC="$OUT/src"
BUILD="$OUT/build"
mkdir -p "$SDIST" "$SRC"

# pip's cache serves the sdist offline once it was downloaded (or llama-cpp-python was built from it).
ARCHIVE="$SDIST/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$ARCHIVE" ]; then
  "$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$SDIST" >&2
fi
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
  tar -xzf "$ARCHIVE" -C "$SRC" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

# shellcheck disable=SC2086 # CMAKE_ARGS is a list of flags, as pip reads it
cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DBUILD_SHARED_LIBS=OFF ${CMAKE_ARGS:-} >&2
cmake --build "$BUILD" --target llama-server -j "$JOBS" >&2
"$BUILD/bin/llama-server" --version >&2 || true
echo "$BUILD/bin/llama-server"
