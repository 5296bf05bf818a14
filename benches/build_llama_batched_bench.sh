#!/usr/bin/env bash
# Builds llama.cpp's `llama-batched-bench` once, from the llama.cpp sources vendored in the
# llama-cpp-python 0.3.36 sdist (cmake from PyPI, -DGGML_NATIVE=ON -DLLAMA_CURL=OFF), under
# $CARGO_TARGET_DIR/llamacpp, and prints its path on stdout. Progress goes to stderr; safe to
# run any number of times (a built binary is reused).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-"$root/target"}
llama_dir="$target/llamacpp"
bench_bin="$llama_dir/build/bin/llama-batched-bench"
if [ ! -x "$bench_bin" ]; then
  echo "== building llama-batched-bench from the llama-cpp-python 0.3.36 sdist" >&2
  venv="$target/bench-venv"
  [ -x "$venv/bin/cmake" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q cmake; }
  mkdir -p "$llama_dir"
  [ -f "$llama_dir"/llama_cpp_python-0.3.36.tar.gz ] ||
    "$venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$llama_dir"
  tar xzf "$llama_dir"/llama_cpp_python-0.3.36.tar.gz -C "$llama_dir"
  src="$llama_dir/llama_cpp_python-0.3.36/vendor/llama.cpp"
  "$venv/bin/cmake" -S "$src" -B "$llama_dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF >&2
  "$venv/bin/cmake" --build "$llama_dir/build" --target llama-batched-bench -j"$(nproc)" >&2
fi
echo "$bench_bin"
