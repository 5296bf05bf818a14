#!/usr/bin/env bash
# Wire encode/decode speed (criterion) and frame sizes, collected into bench-results/wire.json:
# [{name, unit, value, machine}], plus the ratios the design targets.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
# glibc's memcpy uses `rep movsb` for large copies; on AMD Zen that path is up to 25x slower for
# some source/destination offsets, which made identical decodes measure 3.5 us or 83 us from
# run to run. The default here turns it off so the numbers measure our code; run with
# NEUROSHARD_GLIBC_DEFAULTS=1 to measure the stock behaviour. The setting is recorded in the JSON.
if [ -z "${NEUROSHARD_GLIBC_DEFAULTS:-}" ]; then
  export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.cpu.x86_rep_movsb_threshold=1000000000}
fi
cargo bench -p neuroshard-core --bench wire -- --noplot "$@" >&2
python3 - "$CARGO_TARGET_DIR/criterion" <<'PY'
import glob, json, os, platform, sys
root = sys.argv[1]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
machine = f"{cpu} ({os.cpu_count()} cores); GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"
results = []
for est in sorted(glob.glob(f"{root}/wire_*/**/new/estimates.json", recursive=True)):
    bench = json.load(open(os.path.join(os.path.dirname(est), "benchmark.json")))
    ns = json.load(open(est))["median"]["point_estimate"]
    results.append({"name": bench["full_id"], "unit": "ns", "value": round(ns, 1), "machine": machine})
by = {r["name"]: r["value"] for r in results}
for shape in ["1x128x576", "1x1x576"]:
    memcpy = by.get(f"wire/{shape}/memcpy/f16_payload")
    f16 = by.get(f"wire/{shape}/decode_tensor/f16/from_f16/plain")
    memcpy_alloc = by.get(f"wire/{shape}/memcpy_alloc/f16_payload")
    if memcpy and f16:
        results.append({"name": f"wire/{shape}/f16_decode_over_memcpy", "unit": "ratio", "value": round(f16 / memcpy, 3), "machine": machine})
    floor = by.get(f"wire/{shape}/candle_from_slice/f16")
    if floor and f16:
        results.append({"name": f"wire/{shape}/f16_decode_over_candle_from_slice", "unit": "ratio", "value": round(f16 / floor, 3), "machine": machine})
    if memcpy_alloc and f16:
        results.append({"name": f"wire/{shape}/f16_decode_over_memcpy_alloc", "unit": "ratio", "value": round(f16 / memcpy_alloc, 3), "machine": machine})
# Frame sizes for a decode step and a prefill chunk (header + payload).
header = 32 + 3 * 4
for shape, n in [("1x1x576", 576), ("1x128x576", 128 * 576)]:
    blocks = -(-n // 32)
    sizes = {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8": 34 * blocks, "q4": 18 * blocks}
    for codec, payload in sizes.items():
        results.append({"name": f"wire/{shape}/frame_bytes/{codec}", "unit": "bytes", "value": header + payload, "machine": machine})
    results.append({"name": f"wire/{shape}/q4_over_f16_payload", "unit": "ratio", "value": round(sizes["q4"] / sizes["f16"], 4), "machine": machine})
os.makedirs("bench-results", exist_ok=True)
json.dump(results, open("bench-results/wire.json", "w"), indent=1)
for r in results:
    print(f'{r["name"]:60s} {r["value"]:>12} {r["unit"]}')
PY
