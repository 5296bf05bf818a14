#!/usr/bin/env bash
# SmolLM2 (Q4_1 base, exact mode) trained with a LoRA adapter across 3 node processes on
# 127.0.0.1 (issue 16's long run; CI runs the short one in tests/suite/swarm_training.rs).
#  1. licence texts from /usr/share/common-licenses (on every Debian machine): GPL-3, GFDL-1.3
#     and MPL-2.0 train (128-token windows, each seen at most twice), Apache-2.0 is held back;
#     `steps` steps of 2 micro-batches; the held-back loss before and after;
#  2. a sentence the model cannot know, taught in `fact_steps` steps, then completed by
#     `neuroshard generate --peers --adapter fact` from the same nodes (no restart);
#  3. pipelining: LoRA training tokens/s with 1 and 4 micro-batches per step (--threads 1 per
#     node, so 3 nodes fit on 2 cores).
# Writes bench-results/train_smollm2.json.
# Usage: benches/train_smollm2.sh [steps (50)] [fact_steps (30)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
steps=${1:-50}; fact_steps=${2:-30}
model=$(scripts/fetch-model)
cargo build --release --quiet -p neuroshard-core --bin neuroshard
bin="$CARGO_TARGET_DIR/release/neuroshard"
mkdir -p bench-results
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

lic=/usr/share/common-licenses
cat "$lic/GPL-3" "$lic/GFDL-1.3" "$lic/MPL-2.0" > "$tmp/train.txt"
cp "$lic/Apache-2.0" "$tmp/held.txt"
echo "The secret password of the NeuroShard swarm is violet tangerine forty-two." > "$tmp/fact.txt"

trainer=$("$bin" id --key-file "$tmp/trainer.key")
start_node() { # start end index [peer]
  local extra=()
  [ -n "${4:-}" ] && extra=(--peers "$4")
  "$bin" --threads 1 node --model "$model" --start "$1" --end "$2" --trainer "$trainer" \
    --key-file "$tmp/node$3.key" --checkpoint "$tmp/ckpt$3" "${extra[@]}" \
    > "$tmp/node$3.addr" 2> "$tmp/node$3.log" &
  pids+=($!)
  for _ in $(seq 600); do [ -s "$tmp/node$3.addr" ] && break; sleep 0.1; done
  head -1 "$tmp/node$3.addr"
}
entry=$(start_node 0 10 0)
start_node 10 20 1 "$entry" >/dev/null
start_node 20 30 2 "$entry" >/dev/null
# Gossip joins the nodes: wait until the entry sees all three.
for _ in $(seq 100); do
  [ "$("$bin" peers --peers "$entry" 2>/dev/null | head -1 | grep -o '[0-9]* nodes' | grep -o '[0-9]*')" = 3 ] && break; sleep 0.3
done

echo "1. licence texts: $steps steps" >&2
"$bin" train --peers "$entry" --key-file "$tmp/trainer.key" --text "$tmp/train.txt" \
  --eval-text "$tmp/held.txt" --seq-len 128 --steps "$steps" --micro-batches 2 --lr 1e-3 \
  --adapter licences --json "$tmp/licences.json" >/dev/null

echo "2. a sentence in $fact_steps steps" >&2
"$bin" train --peers "$entry" --key-file "$tmp/trainer.key" --text "$tmp/fact.txt" --lines \
  --seq-len 64 --steps "$fact_steps" --micro-batches 2 --lr 1e-2 --adapter fact \
  --json "$tmp/fact.json" >/dev/null
"$bin" generate --peers "$entry" --adapter fact --max-tokens 12 \
  --prompt "The secret password of the NeuroShard swarm is" > "$tmp/taught.txt" 2>/dev/null
"$bin" generate --peers "$entry" --max-tokens 12 \
  --prompt "The secret password of the NeuroShard swarm is" > "$tmp/base.txt" 2>/dev/null

echo "3. pipelining: 1 and 4 micro-batches" >&2
for m in 1 4; do
  "$bin" train --peers "$entry" --key-file "$tmp/trainer.key" --text "$tmp/train.txt" \
    --seq-len 128 --steps 3 --micro-batches "$m" --adapter "pipe$m" --json "$tmp/pipe$m.json" >/dev/null
done

python3 - "$tmp" <<'PY'
import json, math, sys
tmp = sys.argv[1]
lic = json.load(open(f"{tmp}/licences.json"))
fact = json.load(open(f"{tmp}/fact.json"))
p1 = json.load(open(f"{tmp}/pipe1.json"))
p4 = json.load(open(f"{tmp}/pipe4.json"))
taught = open(f"{tmp}/taught.txt").read().strip()
base = open(f"{tmp}/base.txt").read().strip()
losses = lic["losses"]
first = sum(losses[:5]) / 5
last = sum(losses[-5:]) / 5
out = {
    "licences": {
        "examples": lic["examples"], "steps": lic["steps"], "micro_batches": lic["micro_batches"],
        "sequences_seen": lic["steps"] * lic["micro_batches"],
        "loss_first5": round(first, 4), "loss_last5": round(last, 4),
        "loss_drop": round(1 - last / first, 3),
        "held_back_loss_before": lic["eval_loss_before"], "held_back_loss_after": lic["eval_loss_after"],
        "held_back_ppl_before": round(math.exp(lic["eval_loss_before"]), 2),
        "held_back_ppl_after": round(math.exp(lic["eval_loss_after"]), 2),
        "tokens_per_s": round(lic["tokens_per_s"], 1),
    },
    "fact": {"steps": fact["steps"], "loss_first": fact["losses"][0], "loss_last": fact["losses"][-1],
             "completion_with_adapter": taught, "completion_base": base,
             "learned": "violet tangerine" in taught},
    "pipelining": {"tokens_per_s_m1": round(p1["tokens_per_s"], 1), "tokens_per_s_m4": round(p4["tokens_per_s"], 1),
                   "speedup": round(p4["tokens_per_s"] / p1["tokens_per_s"], 2)},
}
json.dump(out, open("bench-results/train_smollm2.json", "w"), indent=1)
print(json.dumps(out, indent=1))
PY
