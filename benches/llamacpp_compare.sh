#!/usr/bin/env bash
# neuroshard (exact mode) against llama.cpp on the same SmolLM2 GGUF and thread count: prefill
# of a ~256-token prompt and 128-token greedy decode, alternating runs, best of N; checks that
# neuroshard's tokens equal the reference. Writes bench-results/llamacpp_compare.json.
#
# llama.cpp comes from llama-cpp-python, built from source into its own venv on first use
# (target/llamacpp-venv, ~10 minutes on 2 cores; later runs reuse it).
# Usage: benches/llamacpp_compare.sh [--threads N (2)] [--reps N (3)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
threads=2; reps=3
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
model=$(scripts/fetch-model)
venv="$CARGO_TARGET_DIR/llamacpp-venv"
if ! "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "llamacpp_compare: building llama-cpp-python into $venv (once, several minutes) ..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  # Native CPU flags, as a user building llama.cpp on this machine would get.
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet numpy llama-cpp-python==0.3.36
fi
cargo build --release --quiet -p neuroshard-core --bin neuroshard
exec "$venv/bin/python" benches/llamacpp_compare.py \
  --binary "$CARGO_TARGET_DIR/release/neuroshard" --model "$model" \
  --reference "$root/../shared/fixtures/smollm2/reference.json" \
  --threads "$threads" --reps "$reps" --json bench-results/llamacpp_compare.json
