#!/usr/bin/env bash
# Build the llama.cpp peer for the benchmarks (never for the tests), from the vendor/llama.cpp
# tree inside llama-cpp-python's source package, into one folder (default /work/peers):
#   bin/llama-server, llama-bench, llama-perplexity, llama-quantize and the shared libraries,
#   and the llama-cpp-python bindings (pure Python, ctypes) pointed at those libraries.
# Built without AMX: on VMs whose CPU reports AMX but whose hypervisor does not allow it, a
# GGML_NATIVE build dies with SIGILL on Q8_0/Q4_1.  About 5-10 minutes on 2 cores.
#   bash benchmarks/build_peers.sh [DIR]
# then, for benchmarks/speed.py and the other Python peers:
#   export PYTHONPATH=DIR/src/llama_cpp_python-0.3.36 LLAMA_CPP_LIB_PATH=DIR/build/bin
set -euo pipefail
DIR=${1:-/work/peers}
VERSION=0.3.36
PIP=${PIP:-"$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/pip"}
mkdir -p "$DIR/src"
cd "$DIR/src"
[ -f "llama_cpp_python-$VERSION.tar.gz" ] || "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "llama_cpp_python-$VERSION.tar.gz"
"$PIP" install -q diskcache   # the bindings import it
cmake -S "llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
cmake --build "$DIR/build" -j"$(nproc)" --target llama-server llama-bench llama-perplexity llama-quantize
echo "built: $DIR/build/bin"
echo "export PYTHONPATH=$DIR/src/llama_cpp_python-$VERSION LLAMA_CPP_LIB_PATH=$DIR/build/bin"
