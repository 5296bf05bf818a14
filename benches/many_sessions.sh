#!/usr/bin/env bash
# Many concurrent sessions against llama.cpp on the same GGUF and thread count, in one run,
# alternating: aggregate decode tokens/s at 1, 4, 8 and 16 parallel sessions.
#
# llama.cpp side (built by benches/long_context.sh's recipe, shared below), fixed command line:
#   llama-batched-bench -m M -c 8192 -b 2048 -ub 512 -npp 16 -ntg 64 -npl 1,4,8,16 -t 2 -tb 2
# (S_TG per row is the aggregate decode rate). The neuroshard side is
#   neuroshard bench-sessions --nodes 1,3 --sessions 1,4,8,16 --prompt-tokens 16 --decode-tokens 64
# plus the engine alone (--engine-too: batched ShardEngine::forward_batch steps, no network),
# on an in-process swarm of 1 and of 3 nodes (each node batches the decode steps that reach it),
# which also checks that every session's text equals its solo run's.
#
# Usage: benches/many_sessions.sh [--reps N] [--json OUT]
# Writes JSON records {name, unit, value, machine, ...} (default target/bench/many_sessions.json).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
reps=2
json="$root/target/bench/many_sessions.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
target=$CARGO_TARGET_DIR
mkdir -p "$(dirname "$json")"
threads=2

model=$(scripts/fetch-model)
echo "== building neuroshard" >&2
cargo build --release -p neuroshard-core --bin neuroshard --quiet
ns="$target/release/neuroshard"
bench_bin=$(benches/build_llama_batched_bench.sh)

runs="$target/bench/many_sessions_runs"
rm -rf "$runs"
mkdir -p "$runs"
for rep in $(seq 1 "$reps"); do
  echo "== rep $rep: llama.cpp" >&2
  "$bench_bin" -m "$model" -c 8192 -b 2048 -ub 512 -npp 16 -ntg 64 -npl 1,4,8,16 \
    -t "$threads" -tb "$threads" > "$runs/llama_$rep.out" 2> "$runs/llama_$rep.err"
  echo "== rep $rep: neuroshard" >&2
  RAYON_NUM_THREADS=$threads "$ns" --threads "$threads" bench-sessions --model "$model" \
    --engine-too --nodes 1,3 --sessions 1,4,8,16 --prompt-tokens 16 --decode-tokens 64 \
    --json "$runs/neuroshard_$rep.json" 2> "$runs/neuroshard_$rep.err"
  grep "sessions:" "$runs/neuroshard_$rep.err" >&2 || true
done

python3 - "$runs" "$reps" "$json" <<'EOF'
import json, os, sys

runs, reps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def llama(rep):
    # Table rows: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    rates = {}
    for line in open(os.path.join(runs, f"llama_{rep}.out")):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            rates[int(cells[2])] = float(cells[7])
    if not rates:
        raise SystemExit(f"no llama-batched-bench table in llama_{rep}.out")
    return rates

machine = "unknown"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        machine = f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cpus"
        break
best_llama, best_ns = {}, {}
for rep in range(1, reps + 1):
    for n, rate in llama(rep).items():
        best_llama[n] = max(best_llama.get(n, 0.0), rate)
    for r in json.load(open(os.path.join(runs, f"neuroshard_{rep}.json"))):
        key = (r.get("nodes", 0), r["sessions"])  # nodes 0: the engine alone, no network
        if r["value"] > best_ns.get(key, {"value": 0.0})["value"]:
            best_ns[key] = r
records = []
for n, rate in sorted(best_llama.items()):
    records.append({"name": f"sessions_decode_llamacpp_sessions{n}", "unit": "tokens/s",
                    "value": rate, "machine": machine, "threads": 2, "reps": reps})
for (nodes, n), r in sorted(best_ns.items()):
    one = best_ns.get((nodes, 1), r)["value"]
    rec = dict(r)
    rec["reps"] = reps
    rec["over_one_session"] = round(r["value"] / one, 3)
    if n in best_llama:
        rec["over_llamacpp"] = round(r["value"] / best_llama[n], 3)
    records.append(rec)
json.dump(records, open(out, "w"), indent=1)
label = lambda k: "engine only" if k == 0 else f"{k} node(s)"
print(f"{'sessions':>8} {'llama.cpp':>10} " + " ".join(f"{label(k):>16}" for k in sorted({k[0] for k in best_ns})))
for n in sorted(best_llama):
    cells = []
    for nodes in sorted({k[0] for k in best_ns}):
        r = best_ns.get((nodes, n))
        cells.append(f"{r['value']:7.1f} ({r['value'] / best_llama[n]:.2f}x)" if r else " " * 16)
    print(f"{n:>8} {best_llama[n]:>10.1f} " + " ".join(f"{c:>16}" for c in cells))
print(f"wrote {out}")
EOF
