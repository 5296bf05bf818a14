#!/usr/bin/env bash
# Honest sessions beside a hostile client: aggregate decode tokens/s and decode latency p95
# (gaps between a session's tokens) of 1 and 16 concurrent sessions on in-process swarms of 1
# and 3 nodes, alone and while one client floods every node (64 garbage requests at a time,
# garbage data streams, redialing whenever it is disconnected or banned). Every text is
# checked against its solo run, with and without the flood. Each point is the best of 3 runs,
# alone and flooded alike (a fresh flooder per run).
#
# The flooder runs in the same process, on the same cores, as the nodes: what it costs
# itself is counted against the honest sessions too.
#
# Usage: benches/flood.sh [--json OUT]   (default target/bench/flood.json)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
json="$root/target/bench/flood.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
mkdir -p "$(dirname "$json")"
model=$(scripts/fetch-model)
echo "== building neuroshard" >&2
cargo build --release -p neuroshard-core --bin neuroshard --quiet
RAYON_NUM_THREADS=2 "$CARGO_TARGET_DIR/release/neuroshard" --threads 2 --log error \
  bench-sessions --model "$model" --nodes 1,3 --sessions 1,16 --prompt-tokens 16 \
  --decode-tokens 32 --reps 3 --flood --json "$json" 2>&1 | grep "sessions" >&2
echo "wrote $json" >&2
