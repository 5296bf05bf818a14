#!/usr/bin/env bash
# Long prompts against llama.cpp on the same GGUF and thread count, in one run, alternating:
# prefill tokens/s, decode tokens/s at that context, and peak RSS (from /usr/bin/time -v).
#
# The llama.cpp side is `llama-batched-bench` (benches/build_llama_batched_bench.sh builds it
# from the llama.cpp sources vendored in the llama-cpp-python 0.3.36 sdist), fixed command line
#   llama-batched-bench -m M -c 8192 -b 2048 -ub 512 -npp 6000 -ntg 64 -npl 1 -t 2 -tb 2
# (S_PP is prefill, S_TG decode at that context; its KV cache is f16). The neuroshard side is
#   neuroshard bench --modes exact --prompt-tokens 6000 --decode-tokens 64 --decode-after-prompt
# twice: with an f16 KV cache (--kv-dtype f16, the comparison with llama.cpp's f16 cache) and
# with the default f32 cache (reported too). The f16 run's decoded tokens are compared with the
# f32 run's (`decode_tokens_agree_f16_f32`); the exactness of long prompts is checked by
# tests/suite/long_context.
#
# Usage: benches/long_context.sh [--reps N] [--prompt-tokens N] [--json OUT]
# Writes JSON records {name, unit, value, machine, ...} (default target/bench/long_context.json).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
reps=2
prompt=6000
json="$root/target/bench/long_context.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --prompt-tokens) prompt=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
target=$CARGO_TARGET_DIR
mkdir -p "$(dirname "$json")" "$target/bench"
threads=2

model=$(scripts/fetch-model)
echo "== building neuroshard" >&2
cargo build --release -p neuroshard-core --bin neuroshard --quiet
ns="$target/release/neuroshard"

bench_bin=$(benches/build_llama_batched_bench.sh)

runs="$target/bench/long_context_runs"
rm -rf "$runs"
mkdir -p "$runs"
for rep in $(seq 1 "$reps"); do
  echo "== rep $rep: llama.cpp" >&2
  /usr/bin/time -v "$bench_bin" -m "$model" -c 8192 -b 2048 -ub 512 -npp "$prompt" -ntg 64 \
    -npl 1 -t "$threads" -tb "$threads" > "$runs/llama_$rep.out" 2> "$runs/llama_$rep.time"
  for kv in f16 f32; do
    echo "== rep $rep: neuroshard, $kv KV" >&2
    RAYON_NUM_THREADS=$threads /usr/bin/time -v "$ns" --threads "$threads" bench --model "$model" \
      --modes exact --prompt-tokens "$prompt" --decode-tokens 64 --decode-after-prompt --reps 1 \
      --kv-dtype "$kv" --json "$runs/neuroshard_${kv}_$rep.json" \
      > "$runs/neuroshard_${kv}_$rep.out" 2> "$runs/neuroshard_${kv}_$rep.time"
  done
done

# The same length of prose through a 3-node loopback swarm of separate node processes (layers
# 0-10, 10-20, 20-30; lossless f32 frames) and through one process: the texts must be equal.
echo "== swarm: 3 node processes vs one process" >&2
text="$runs/prompt.txt"
python3 - "$prompt" "$text" <<'PY'
import sys
n, out = int(sys.argv[1]), sys.argv[2]
base = ("The history of computing is a story of machines that learned to share work. "
        "Early computers filled rooms; later, networks of small machines cooperated. ")
# ~30 tokens per sentence pair: a little over n tokens; generate reports the exact count.
open(out, "w").write(base * (n // 30 + 1))
PY
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
addrs=()
for slice in "0 10" "10 20" "20 30"; do
  set -- $slice
  fifo="$runs/node_$1.addr"
  "$ns" --threads 1 node --model "$model" --start "$1" --end "$2" \
    ${addrs:+--peers "${addrs[0]#*@}"} > "$fifo" 2> "$runs/node_$1.log" &
  pids+=($!)
  for _ in $(seq 1 600); do grep -q @ "$fifo" 2>/dev/null && break; sleep 0.1; done
  addrs+=("$(head -1 "$fifo")")
done
# Gossip: wait (bounded) until the entry node lists all three.
for _ in $(seq 1 300); do
  "$ns" peers --peers "${addrs[0]}" 2>/dev/null | grep -q ", 3 nodes" && break
  sleep 0.2
done
"$ns" --threads "$threads" generate --peers "${addrs[@]}" --codec f32 --prompt "$(cat "$text")" \
  --max-tokens 16 --ignore-eos --step-timeout-ms 120000 > "$runs/swarm.txt" 2> "$runs/swarm.err"
"$ns" --threads "$threads" generate --model "$model" --prompt "$(cat "$text")" \
  --max-tokens 16 --ignore-eos > "$runs/single.txt" 2> "$runs/single.err"
cleanup
trap - EXIT

python3 - "$runs" "$reps" "$json" <<'EOF'
import json, os, re, sys

runs, reps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def peak_rss(path):
    for line in open(path):
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) * 1024
    raise SystemExit(f"no peak RSS in {path}")

def llama(rep):
    # The table row: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in open(os.path.join(runs, f"llama_{rep}.out")):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            return float(cells[5]), float(cells[7])
    raise SystemExit(f"no llama-batched-bench table in llama_{rep}.out")

def neuroshard(kv, rep):
    records = json.load(open(os.path.join(runs, f"neuroshard_{kv}_{rep}.json")))
    get = lambda metric: next(r for r in records if f"_{metric}_" in r["name"])
    return get("prefill")["value"], get("decode")["value"], get("decode")["decode_token_ids"]

machine = "unknown"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        machine = f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cpus"
        break
sides = {"llamacpp": lambda rep: (*llama(rep), None), "neuroshard": lambda rep: neuroshard("f16", rep),
         "neuroshard_f32kv": lambda rep: neuroshard("f32", rep)}
times = {"llamacpp": "llama_{rep}.time", "neuroshard": "neuroshard_f16_{rep}.time",
         "neuroshard_f32kv": "neuroshard_f32_{rep}.time"}
best, tokens = {}, {}
for rep in range(1, reps + 1):
    for side, read in sides.items():
        pp, tg, ids = read(rep)
        rss = peak_rss(os.path.join(runs, times[side].format(rep=rep)))
        b = best.setdefault(side, {"prefill": 0.0, "decode": 0.0, "rss": None})
        b["prefill"] = max(b["prefill"], pp)
        b["decode"] = max(b["decode"], tg)
        b["rss"] = rss if b["rss"] is None else min(b["rss"], rss)
        tokens[side] = ids
records = []
for side, b in best.items():
    for metric, unit in (("prefill", "tokens/s"), ("decode", "tokens/s"), ("rss", "bytes")):
        records.append({"name": f"long_prompt_{metric}_{side}", "unit": unit, "value": b[metric],
                        "machine": machine, "threads": 2, "reps": reps})
ns, lc = best["neuroshard"], best["llamacpp"]
ratios = {"prefill": ns["prefill"] / lc["prefill"], "decode": ns["decode"] / lc["decode"],
          "rss": ns["rss"] / lc["rss"]}
for metric, value in ratios.items():
    records.append({"name": f"long_prompt_{metric}_ratio", "unit": "neuroshard/llama.cpp",
                    "value": round(value, 3), "machine": machine})
def generated(name):
    err = open(os.path.join(runs, f"{name}.err")).read()
    m = re.search(r"(\d+) prompt tokens, \d+ generated .*prefill ([0-9.]+) tok/s", err)
    if not m:
        raise SystemExit(f"no generation summary in {name}.err:\n{err}")
    return int(m.group(1)), float(m.group(2)), open(os.path.join(runs, f"{name}.txt")).read()
(n_swarm, pp_swarm, text_swarm), (n_single, pp_single, text_single) = generated("swarm"), generated("single")
records.append({"name": "long_prompt_swarm3_processes_prefill", "unit": "tokens/s", "value": pp_swarm,
                "prompt_tokens": n_swarm, "text_equals_single_process": text_swarm == text_single,
                "machine": machine})
records.append({"name": "long_prompt_single_process_prefill", "unit": "tokens/s", "value": pp_single,
                "prompt_tokens": n_single, "machine": machine})
a, b = tokens["neuroshard"], tokens["neuroshard_f32kv"]
agree = sum(x == y for x, y in zip(a, b)) / max(len(b), 1)
records.append({"name": "decode_tokens_agree_f16_f32", "unit": "fraction", "value": round(agree, 4),
                "machine": machine})
json.dump(records, open(out, "w"), indent=1)
f32 = best["neuroshard_f32kv"]
print(f"f16 KV: prefill {ns['prefill']:.1f} vs {lc['prefill']:.1f} tok/s ({ratios['prefill']:.2f}x), "
      f"decode {ns['decode']:.1f} vs {lc['decode']:.1f} tok/s ({ratios['decode']:.2f}x), "
      f"peak RSS {ns['rss'] / 1e9:.2f} vs {lc['rss'] / 1e9:.2f} GB ({ratios['rss']:.2f}x)")
print(f"f32 KV: prefill {f32['prefill']:.1f} tok/s, decode {f32['decode']:.1f} tok/s, "
      f"peak RSS {f32['rss'] / 1e9:.2f} GB; f16/f32 decoded tokens agree {agree:.1%}")
print(f"swarm of 3 node processes: {n_swarm} prompt tokens, prefill {pp_swarm:.1f} tok/s against "
      f"{pp_single:.1f} in one process; texts {'equal' if text_swarm == text_single else 'DIFFER'}")
print(f"wrote {out}")
if text_swarm != text_single:
    raise SystemExit("the swarm's text differs from the single process's")
EOF
