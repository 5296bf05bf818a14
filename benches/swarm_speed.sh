#!/usr/bin/env bash
# 3-node loopback swarm vs single process, same model, mode and token count, alternating runs,
# best of N. Writes bench-results/swarm_speed.json with both decode rates and their ratio.
# Usage: benches/swarm_speed.sh [reps (5)] [tokens (128)] [mode (fast)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
reps=${1:-5}; tokens=${2:-128}; mode=${3:-fast}
model=$(scripts/fetch-model)
cargo build --release --quiet -p neuroshard-core --bin neuroshard
bin="$CARGO_TARGET_DIR/release/neuroshard"
mkdir -p bench-results
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$reps"); do
  "$bin" generate --model "$model" --prompt "The future of AI is" --max-tokens "$tokens" --ignore-eos --mode "$mode" 2>"$tmp/single.$i" >/dev/null
  "$bin" swarm --model "$model" --nodes 3 --prompt "The future of AI is" --max-tokens "$tokens" --ignore-eos --mode "$mode" --json "$tmp/swarm.$i.json" 2>/dev/null >/dev/null
  echo "rep $i: $(tail -1 "$tmp/single.$i" | grep -o 'decode [0-9.]* tok/s') single, $(python3 -c "import json;print(round(json.load(open('$tmp/swarm.$i.json'))['decode_tokens_per_sec'],1))") tok/s swarm" >&2
done
python3 - "$tmp" "$reps" "$tokens" "$mode" <<'PY'
import glob, json, os, re, sys
tmp, reps, tokens, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
single = max(float(re.search(r"decode ([0-9.]+) tok/s", open(f).read().splitlines()[-1]).group(1)) for f in glob.glob(f"{tmp}/single.*"))
runs = [json.load(open(f)) for f in glob.glob(f"{tmp}/swarm.*.json")]
best = max(runs, key=lambda r: r["decode_tokens_per_sec"])
swarm = best["decode_tokens_per_sec"]
machine = runs[0]["machine"]
out = [
    {"name": f"smollm2_decode_single_process_{mode}", "unit": "tokens/s", "value": round(single, 1), "machine": machine},
    {"name": f"smollm2_decode_swarm3_loopback_{mode}", "unit": "tokens/s", "value": round(swarm, 1), "machine": machine},
    {"name": f"smollm2_decode_swarm3_over_single_{mode}", "unit": "ratio", "value": round(swarm / single, 3), "machine": machine},
]
# Runs alternate, so each rep is a pair measured under the same machine load: the median of the
# paired ratios is less sensitive to a noisy neighbour than best-over-best.
pairs = []
for i in range(1, reps + 1):
    s1 = float(re.search(r"decode ([0-9.]+) tok/s", open(f"{tmp}/single.{i}").read().splitlines()[-1]).group(1))
    s3 = json.load(open(f"{tmp}/swarm.{i}.json"))["decode_tokens_per_sec"]
    pairs.append(s3 / s1)
pairs.sort()
out.append({"name": f"smollm2_decode_swarm3_over_single_{mode}_paired_median", "unit": "ratio", "value": round(pairs[len(pairs) // 2], 3), "machine": machine})
# Per hop of the best swarm run: network round trip and compute per step.
for i, h in enumerate(best.get("per_hop", [])):
    out.append({"name": f"swarm3_hop{i}_ping_rtt_{mode}", "unit": "ms", "value": round(h["ping_rtt_ms_median"], 3), "machine": machine})
    out.append({"name": f"swarm3_hop{i}_compute_per_step_{mode}", "unit": "ms", "value": round(h["compute_ms_per_step"], 3), "machine": machine})
json.dump(out, open("bench-results/swarm_speed.json", "w"), indent=1)
for r in out:
    print(f'{r["name"]:45s} {r["value"]:>8} {r["unit"]}')
PY
