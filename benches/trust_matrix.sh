#!/usr/bin/env bash
# The Trust detection matrix over separate node processes: SmolLM2 in two ranges of three
# replicas on 127.0.0.1, one lying replica per cell (every `--behaviour`, in the first range
# and as a receiver in the second, always the lowest node id of its range), plus an honest
# run of 100 tokens (400 votes) that must flag nobody. Writes target/bench/trust_matrix.json.
# Builds `neuroshard` with the `adversary` feature (a separate build of the binary).
# Usage: benches/trust_matrix.sh [tokens per cell (6)] [honest tokens (100)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
model=$(scripts/fetch-model)
cargo build --release --quiet -p neuroshard-core --bin neuroshard --features adversary
mkdir -p "$CARGO_TARGET_DIR/bench"
# The adversary build goes to its own name, so the default binary stays honest.
cp "$CARGO_TARGET_DIR/release/neuroshard" "$CARGO_TARGET_DIR/release/neuroshard-adversary"
python3 benches/trust_matrix.py "$CARGO_TARGET_DIR/release/neuroshard-adversary" "$model" \
  "$CARGO_TARGET_DIR/bench/trust_matrix.json" --tokens "${1:-6}" --honest-tokens "${2:-100}"
