#!/usr/bin/env bash
# Single-process SmolLM2 prefill and decode speed, exact and fast modes, best of N runs.
# Writes bench-results/engine_speed.json: [{name, unit, value, machine, ...}].
# Usage: benches/engine_speed.sh [--threads N] [--reps N] [--decode-tokens N] [--prompt-tokens N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
model=$(scripts/fetch-model)
cargo build --release --quiet -p neuroshard-core --bin neuroshard
threads=()
if [ "${1:-}" = "--threads" ]; then threads=(--threads "$2"); shift 2; fi
exec "$CARGO_TARGET_DIR/release/neuroshard" "${threads[@]}" bench --model "$model" \
  --modes f32,exact,fast --json bench-results/engine_speed.json "$@"
