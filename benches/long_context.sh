#!/usr/bin/env bash
# Long prompts against llama.cpp on the same GGUF and thread count, in one run, alternating:
# prefill tokens/s, decode tokens/s at that context, and peak RSS (from /usr/bin/time -v).
#
# The llama.cpp side is `llama-batched-bench`, built here from the llama.cpp sources vendored
# in the llama-cpp-python 0.3.36 sdist (cmake comes from PyPI), with the fixed command line
#   llama-batched-bench -m M -c 8192 -b 2048 -ub 512 -npp 6000 -ntg 64 -npl 1 -t 2 -tb 2
# (S_PP is prefill, S_TG decode at that context). The neuroshard side is
#   neuroshard bench --modes exact --prompt-tokens 6000 --decode-tokens 64 --decode-after-prompt
# which also checks nothing but speed; the exactness of long prompts is tests/suite/long_context.
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

llama_dir="$target/llamacpp"
bench_bin="$llama_dir/build/bin/llama-batched-bench"
if [ ! -x "$bench_bin" ]; then
  echo "== building llama-batched-bench from the llama-cpp-python 0.3.36 sdist" >&2
  venv="$target/bench-venv"
  [ -x "$venv/bin/cmake" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q cmake; }
  mkdir -p "$llama_dir"
  [ -f "$llama_dir"/llama_cpp_python-0.3.36.tar.gz ] ||
    "$venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$llama_dir"
  tar xzf "$llama_dir"/llama_cpp_python-0.3.36.tar.gz -C "$llama_dir"
  src="$llama_dir/llama_cpp_python-0.3.36/vendor/llama.cpp"
  "$venv/bin/cmake" -S "$src" -B "$llama_dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF >&2
  "$venv/bin/cmake" --build "$llama_dir/build" --target llama-batched-bench -j"$(nproc)" >&2
fi

runs="$target/bench/long_context_runs"
rm -rf "$runs"
mkdir -p "$runs"
for rep in $(seq 1 "$reps"); do
  echo "== rep $rep: llama.cpp" >&2
  /usr/bin/time -v "$bench_bin" -m "$model" -c 8192 -b 2048 -ub 512 -npp "$prompt" -ntg 64 \
    -npl 1 -t "$threads" -tb "$threads" > "$runs/llama_$rep.out" 2> "$runs/llama_$rep.time"
  echo "== rep $rep: neuroshard" >&2
  RAYON_NUM_THREADS=$threads /usr/bin/time -v "$ns" --threads "$threads" bench --model "$model" \
    --modes exact --prompt-tokens "$prompt" --decode-tokens 64 --decode-after-prompt --reps 1 \
    --json "$runs/neuroshard_$rep.json" > "$runs/neuroshard_$rep.out" 2> "$runs/neuroshard_$rep.time"
done

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

def neuroshard(rep):
    records = json.load(open(os.path.join(runs, f"neuroshard_{rep}.json")))
    get = lambda metric: next(r["value"] for r in records if f"_{metric}_" in r["name"])
    return get("prefill"), get("decode")

machine = "unknown"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        machine = f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cpus"
        break
best = {}
for rep in range(1, reps + 1):
    for side, (pp, tg) in (("llamacpp", llama(rep)), ("neuroshard", neuroshard(rep))):
        rss = peak_rss(os.path.join(runs, f"{'llama' if side == 'llamacpp' else 'neuroshard'}_{rep}.time"))
        b = best.setdefault(side, {"prefill": 0.0, "decode": 0.0, "rss": None})
        b["prefill"] = max(b["prefill"], pp)
        b["decode"] = max(b["decode"], tg)
        b["rss"] = rss if b["rss"] is None else min(b["rss"], rss)
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
json.dump(records, open(out, "w"), indent=1)
print(f"prefill {ns['prefill']:.1f} vs {lc['prefill']:.1f} tok/s ({ratios['prefill']:.2f}x), "
      f"decode {ns['decode']:.1f} vs {lc['decode']:.1f} tok/s ({ratios['decode']:.2f}x), "
      f"peak RSS {ns['rss'] / 1e9:.2f} vs {lc['rss'] / 1e9:.2f} GB ({ratios['rss']:.2f}x)")
print(f"wrote {out}")
EOF
