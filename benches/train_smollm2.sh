#!/usr/bin/env bash
# SmolLM2 trained across node processes on 127.0.0.1 (issue 16's long run; CI runs the short
# ones in tests/suite/swarm_training.rs and tests/python/test_train.py).
#  1. licence text: GPL-3 from /usr/share/common-licenses (on every Debian machine), every 7th
#     paragraph held back, the rest in 128-token windows (about 51 distinct ones); `steps`
#     steps of 2 micro-batches, so each window is seen at most twice; a LoRA adapter (rank 16,
#     every projection) on the Q4_1 base over 3 nodes; the held-back loss before and after
#     (with Apache-2.0 held back instead, this setting overfits the GPL's style: perplexity
#     29.44 -> 31.75);
#  2. a sentence the model cannot know, taught in `fact_steps` steps, then completed by
#     `neuroshard generate --peers --adapter fact` from the same nodes (no restart);
#  3. gradient codecs: the same 8 steps with f32, f16 and q8 frames (three adapters with the
#     same initialisation), loss curves side by side;
#  4. pipelining: LoRA tokens/s with 1 and 4 micro-batches per step (--threads 1 per node, so
#     3 nodes fit on 2 cores; 6 steps each), on the even split (10/10/10 layers) and on one balanced for
#     the work (12/12/6: the last hop also runs the 49,152 x 576 output head and the loss,
#     forward and backward, about as much as 8 layers);
#  5. 3 nodes against one process (one node with every layer, --threads 2): training tokens/s
#     for LoRA (Q4_1 base) and for full training (nodes in --mode f32).
# Writes bench-results/train_smollm2.json.
# Usage: [PARTS="1 2 3 4 5"] benches/train_smollm2.sh [steps (50)] [fact_steps (30)]
# (PARTS picks the parts to run; the JSON holds theirs.)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
steps=${1:-50}; fact_steps=${2:-30}
parts=" ${PARTS:-1 2 3 4 5} "
part() { [[ "$parts" == *" $1 "* ]]; }
model=$(scripts/fetch-model)
cargo build --release --quiet -p neuroshard-core --bin neuroshard
bin="$CARGO_TARGET_DIR/release/neuroshard"
mkdir -p bench-results
tmp=$(mktemp -d)
pids=()
stop_nodes() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
cleanup() { stop_nodes; mkdir -p bench-results/train_logs; cp "$tmp"/node*.log bench-results/train_logs/ 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

lic=/usr/share/common-licenses
# GPL-3 split by paragraph: every 7th is held back (the same style of text, never trained on),
# the rest trains (about 51 windows of 128 tokens).
python3 - "$lic/GPL-3" "$tmp/train.txt" "$tmp/held.txt" <<'PY'
import sys
paragraphs = [p for p in open(sys.argv[1]).read().split("\n\n") if p.strip()]
open(sys.argv[2], "w").write("\n\n".join(p for i, p in enumerate(paragraphs) if i % 7 != 6))
open(sys.argv[3], "w").write("\n\n".join(p for i, p in enumerate(paragraphs) if i % 7 == 6))
PY
echo "The secret password of the NeuroShard swarm is violet tangerine forty-two." > "$tmp/fact.txt"

trainer=$("$bin" id --key-file "$tmp/trainer.key")
n=0
# Not in $(...): the node's pid and the counter must stay in this shell.
start_node() { # threads mode start end [peer]; sets $addr to the node's address line
  local extra=()
  [ -n "${5:-}" ] && extra=(--peers "$5")
  n=$((n + 1))
  "$bin" --threads "$1" node --model "$model" --mode "$2" --start "$3" --end "$4" \
    --trainer "$trainer" --key-file "$tmp/node$n.key" "${extra[@]}" \
    > "$tmp/node$n.addr" 2> "$tmp/node$n.log" &
  pids+=($!)
  for _ in $(seq 1200); do [ -s "$tmp/node$n.addr" ] && break; sleep 0.1; done
  addr=$(head -1 "$tmp/node$n.addr")
}
three_nodes() { # mode [end of slice 1] [end of slice 2]; sets $entry once gossip joined all three
  local a=${2:-10} b=${3:-20}
  start_node 1 "$1" 0 "$a"
  entry=$addr
  start_node 1 "$1" "$a" "$b" "$entry"
  start_node 1 "$1" "$b" 30 "$entry"
  for _ in $(seq 100); do
    [ "$("$bin" peers --peers "$entry" 2>/dev/null | head -1 | grep -o '[0-9]* nodes' | grep -o '[0-9]*')" = 3 ] && break
    sleep 0.3
  done
}
train() { # entry json-name [flags...]
  local entry=$1 name=$2; shift 2
  "$bin" train --peers "$entry" --key-file "$tmp/trainer.key" --json "$tmp/$name.json" "$@" >/dev/null
}
lora=(--lora-rank 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)

pipelining() { # json-name suffix: 1 and 4 micro-batches on the running nodes
  for m in 1 4; do
    train "$entry" "pipe$m$1" --text "$tmp/train.txt" --seq-len 128 --steps 6 --micro-batches "$m" \
      --adapter "pipe$m$1"
  done
}

if part 1 || part 2 || part 3 || part 4; then
  three_nodes exact
fi
if part 1; then
  echo "1. licence text: $steps steps" >&2
  train "$entry" licences --text "$tmp/train.txt" --eval-text "$tmp/held.txt" --seq-len 128 \
    --steps "$steps" --micro-batches 2 --lr 3e-3 --adapter licences "${lora[@]}"
fi
if part 2; then
  echo "2. a sentence in $fact_steps steps" >&2
  train "$entry" fact --text "$tmp/fact.txt" --lines --seq-len 64 --steps "$fact_steps" \
    --micro-batches 2 --lr 1e-2 --adapter fact
  prompt="The secret password of the NeuroShard swarm is"
  "$bin" generate --peers "$entry" --adapter fact --max-tokens 12 --prompt "$prompt" \
    > "$tmp/taught.txt" 2>/dev/null
  "$bin" generate --peers "$entry" --max-tokens 12 --prompt "$prompt" > "$tmp/base.txt" 2>/dev/null
fi
if part 3; then
  echo "3. gradient codecs: f32, f16, q8" >&2
  for codec in f32 f16 q8; do
    train "$entry" "codec_$codec" --text "$tmp/train.txt" --seq-len 128 --steps 8 \
      --micro-batches 2 --lr 3e-3 --adapter "codec-$codec" --codec "$codec"
  done
fi
if part 4; then
  echo "4. pipelining: 1 and 4 micro-batches, layers 10/10/10" >&2
  pipelining ""
  stop_nodes
  echo "4. pipelining: 1 and 4 micro-batches, layers 12/12/6" >&2
  three_nodes exact 12 24
  pipelining _balanced
fi
stop_nodes

if part 5; then
  echo "5. 3 nodes against one process: LoRA and full training" >&2
  start_node 2 exact 0 30
  train "$addr" one_lora --text "$tmp/train.txt" --seq-len 128 --steps 3 --micro-batches 4 --adapter one
  stop_nodes
  start_node 2 f32 0 30
  train "$addr" one_full --text "$tmp/train.txt" --seq-len 128 --steps 2 --micro-batches 4 --full --lr 1e-5
  stop_nodes
  three_nodes f32
  train "$entry" three_full --text "$tmp/train.txt" --seq-len 128 --steps 2 --micro-batches 4 --full --lr 1e-5
  stop_nodes
fi

python3 - "$tmp" <<'PY'
import json, math, os, sys
tmp = sys.argv[1]
load = lambda name: json.load(open(f"{tmp}/{name}.json"))
has = lambda *names: all(os.path.exists(f"{tmp}/{n}.json") for n in names)
rate = lambda name: round(load(name)["tokens_per_s"], 1)
out = {}
if has("licences"):
    lic = load("licences")
    losses = lic["losses"]
    first = sum(losses[:5]) / 5
    last = sum(losses[-5:]) / 5
    out["licences"] = {
        "examples": lic["examples"], "steps": lic["steps"], "micro_batches": lic["micro_batches"],
        "sequences_seen": lic["steps"] * lic["micro_batches"],
        "loss_first5": round(first, 4), "loss_last5": round(last, 4),
        "loss_drop": round(1 - last / first, 3),
        "held_back_loss_before": lic["eval_loss_before"], "held_back_loss_after": lic["eval_loss_after"],
        "held_back_ppl_before": round(math.exp(lic["eval_loss_before"]), 2),
        "held_back_ppl_after": round(math.exp(lic["eval_loss_after"]), 2),
        "tokens_per_s": round(lic["tokens_per_s"], 1),
    }
if has("fact"):
    fact = load("fact")
    taught = open(f"{tmp}/taught.txt").read().strip()
    base = open(f"{tmp}/base.txt").read().strip()
    out["fact"] = {"steps": fact["steps"], "loss_first": fact["losses"][0],
                   "loss_last": fact["losses"][-1], "completion_with_adapter": taught,
                   "completion_base": base, "learned": "violet tangerine" in taught}
if has("codec_f32", "codec_f16", "codec_q8"):
    codecs = {c: load(f"codec_{c}")["losses"] for c in ("f32", "f16", "q8")}
    gap = lambda c: max(abs(a - b) for a, b in zip(codecs[c], codecs["f32"])) / codecs["f32"][0]
    out["codecs"] = {"losses": {c: [round(x, 4) for x in l] for c, l in codecs.items()},
                     "max_gap_to_f32_of_start": {c: round(gap(c), 5) for c in ("f16", "q8")}}
for split, suffix in (("layers_10_10_10", ""), ("layers_12_12_6", "_balanced")):
    if has(f"pipe1{suffix}", f"pipe4{suffix}"):
        out.setdefault("pipelining", {})[split] = {
            "tokens_per_s_m1": rate(f"pipe1{suffix}"), "tokens_per_s_m4": rate(f"pipe4{suffix}"),
            "speedup": round(load(f"pipe4{suffix}")["tokens_per_s"]
                             / load(f"pipe1{suffix}")["tokens_per_s"], 2)}
if has("pipe4", "one_lora", "three_full", "one_full"):
    out["three_nodes_vs_one_process"] = {
        "lora_tokens_per_s": {"three_nodes_m4": rate("pipe4"), "one_process": rate("one_lora")},
        "full_tokens_per_s": {"three_nodes_m4": rate("three_full"), "one_process": rate("one_full")},
    }
json.dump(out, open("bench-results/train_smollm2.json", "w"), indent=1)
print(json.dumps(out, indent=1))
PY
