#!/usr/bin/env bash
# Calibrates the tolerant vote on SmolLM2: honest replicas that differ in mode (exact, f32),
# kernel path (scalar, avx2), thread count (1, 2) and frame precision (f32, f16) recompute
# every range on a reference run's inputs (exact, best kernel path, 2 threads); each variant
# reports its worst distance to the reference, and the mildest distance of each attack.
# Writes target/bench/trust_calibration.json: every variant's rows, the worst honest and the
# mildest attack distances, and the margin between them under the default tolerance.
# Usage: benches/trust_calibration.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
target=$CARGO_TARGET_DIR
model=$(scripts/fetch-model)
# scripts/test.sh sets NEUROSHARD_PREBUILT=1: its workspace build already linked the example
# (a build of this package alone would unify features differently and recompile).
[ -n "${NEUROSHARD_PREBUILT:-}" ] ||
  cargo build --release --quiet -p neuroshard-core --features internals --example trust_calibration
bin="$target/release/examples/trust_calibration"
out="$target/bench/trust"
mkdir -p "$out"
RAYON_NUM_THREADS=2 "$bin" "$model" "$out/ref.bin"
paths=(scalar)
grep -q avx2 /proc/cpuinfo && paths+=(avx2)
for mode in exact f32; do
  for path in "${paths[@]}"; do
    for threads in 1 2; do
      NEUROSHARD_KERNEL_PATH=$path RAYON_NUM_THREADS=$threads "$bin" "$model" "$out/ref.bin" \
        --mode "$mode" --against "$out/$mode-$path-$threads.json" 2>/dev/null
    done
  done
done
python3 - "$out" "$target/bench/trust_calibration.json" <<'PY'
import glob, json, os, sys
out_dir, dest = sys.argv[1], sys.argv[2]
variants = [json.load(open(f)) for f in sorted(glob.glob(f"{out_dir}/*-*-*.json"))]
honest = {"rel_l2": 0.0, "max_abs": 0.0}
attacks = {}
for v in variants:
    for r in v["rows"]:
        if r["kind"].startswith("honest"):
            for k in honest:
                honest[k] = max(honest[k], r[k])
        else:
            a = attacks.setdefault(r["kind"], {"rel_l2": float("inf"), "max_abs": float("inf")})
            if r["rel_l2"] < a["rel_l2"]:
                attacks[r["kind"]] = {"rel_l2": r["rel_l2"], "max_abs": r["max_abs"]}
tolerance = {"rel_l2": 2e-3, "max_abs": 2e-2}
mildest = min(a["rel_l2"] for a in attacks.values())
summary = {
    "tolerance": tolerance,
    "worst_honest": honest,
    "mildest_attack": attacks,
    "margin_honest_to_threshold_rel_l2": tolerance["rel_l2"] / max(honest["rel_l2"], 1e-12),
    "margin_threshold_to_mildest_attack_rel_l2": mildest / tolerance["rel_l2"],
    "variants": variants,
}
json.dump(summary, open(dest, "w"), indent=1)
print(f"worst honest: rel_l2 {honest['rel_l2']:.3e}, max_abs {honest['max_abs']:.3e}")
for k, a in sorted(attacks.items()):
    print(f"mildest {k:18s}: rel_l2 {a['rel_l2']:.3e}, max_abs {a['max_abs']:.3e}")
print(f"threshold rel_l2 {tolerance['rel_l2']:.0e}: {summary['margin_honest_to_threshold_rel_l2']:.1f}x above the worst honest, "
      f"{summary['margin_threshold_to_mildest_attack_rel_l2']:.1f}x below the mildest attack")
# The vote's cost against the fastest honest step: exact mode, 2 threads, the best kernel path.
best_path = "avx2" if any(v["kernel_path"] == "avx2" for v in variants) else "scalar"
cost = next(v for v in variants if v["mode"] == "exact" and v["threads"] == 2 and v["kernel_path"] == best_path)["vote_cost"]
summary["vote_cost"] = cost
for r in cost["per_range"]:
    print(f"vote cost range {r['range']} (width {r['width']}): {r['vote_ms']:.3f} ms against {r['compute_ms']:.3f} ms compute ({100 * r['vote_over_step']:.1f}%), signing {r['sign_ms']:.3f} ms")
print(f"votes of one decode step (k = 3, every range): {100 * cost['votes_over_decode_step']:.1f}% of its compute")
for point in variants[0]["detection_curve"]:
    print(f"detection {point['attack']:5s} {point['magnitude']:<7.4g}: {point['detection_rate']:.2f}")
summary["detection_curve"] = variants[0]["detection_curve"]
json.dump(summary, open(dest, "w"), indent=1)
for v in variants:
    worst = max((r for r in v["rows"] if r["kind"].startswith("honest")), key=lambda r: r["rel_l2"])
    print(f"  {v['mode']:5s} {v['kernel_path']:6s} {v['threads']} threads: worst honest rel_l2 {worst['rel_l2']:.3e} ({worst['kind']}, range {worst['range']})")
# The calibration's invariant: every honest variant agrees under the default tolerance and
# every attack is rejected by it (scripts/test.sh runs this script).
agrees = lambda d: d["rel_l2"] <= tolerance["rel_l2"] and d["max_abs"] <= tolerance["max_abs"]
if not agrees(honest):
    sys.exit(f"an honest variant falls outside the tolerance: {honest}")
caught = [k for k, a in attacks.items() if agrees(a)]
if caught:
    sys.exit(f"attacks inside the tolerance: {caught}")
PY
