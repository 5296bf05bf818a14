#!/usr/bin/env bash
# The Python client's decode speed against the CLI's on one 3-node SmolLM2 LocalSwarm,
# alternating runs (benches/python_speed.py). Builds the wheel with maturin and installs it into
# target/py-bench-venv. Target: Python within 5% of the CLI.
# Usage: benches/python_speed.sh [reps (5)] [tokens (128)]
# Writes target/bench/python_speed.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
target=$CARGO_TARGET_DIR
reps=${1:-5}; tokens=${2:-128}
model=$(scripts/fetch-model)
cargo build --release --quiet -p neuroshard-core --bin neuroshard
tools="$target/py-build-venv"
[ -x "$tools/bin/maturin" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q maturin==1.16.0; }
rm -rf "$target/bench-wheels"
"$tools/bin/maturin" build --release --quiet -o "$target/bench-wheels"
venv="$target/py-bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$target"/bench-wheels/neuroshard-*.whl
"$venv/bin/pip" install -q numpy
mkdir -p "$target/bench"
"$venv/bin/python" benches/python_speed.py "$target/release/neuroshard" "$model" \
  "$target/bench/python_speed.json" "$reps" "$tokens"
