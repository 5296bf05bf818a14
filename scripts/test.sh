#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and all tests (optimised build).
# Installs what it needs (the SmolLM2 model via scripts/fetch-model); safe to run repeatedly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# One target dir for every build the scripts run (cargo, later maturin and the C build).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}

fixtures=${NEUROSHARD_FIXTURES:-"$root/../shared/fixtures"}
if [ ! -d "$fixtures" ]; then
  echo "test.sh: reference fixtures not found at $fixtures (set NEUROSHARD_FIXTURES)" >&2
  exit 1
fi
export NEUROSHARD_FIXTURES=$fixtures

echo "== model"
scripts/fetch-model >/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings

echo "== cargo test (release)"
# One test at a time: network tests must not compete for the 2 cores (timeouts), and the
# heavy model tests already use every core.
cargo test --release --workspace -- --test-threads=1
