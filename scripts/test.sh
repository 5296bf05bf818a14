#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, docs, the Rust tests (optimised build), the C
# API test (also under valgrind), the examples, and the Python package's tests against a wheel
# installed into a fresh venv (with the `openai` package and the web chat in headless
# Chromium). Installs what it needs (the SmolLM2 model, maturin, numpy, pytest, mypy, openai,
# selenium, Debian's chromium and chromium-driver) and is safe to run repeatedly. Prints the
# wall time of every phase.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# One target dir for every build: cargo, maturin, the external example and the C test.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-"$root/target"}
target=$CARGO_TARGET_DIR

fixtures=${NEUROSHARD_FIXTURES:-"$root/../shared/fixtures"}
if [ ! -d "$fixtures" ]; then
  echo "test.sh: reference fixtures not found at $fixtures (set NEUROSHARD_FIXTURES)" >&2
  exit 1
fi
export NEUROSHARD_FIXTURES=$fixtures
export NEUROSHARD_MODELS=${NEUROSHARD_MODELS:-"$root/models"}

suite_start=$SECONDS
phase_name=""
phase_start=$SECONDS
timings=()
phase() {
  if [ -n "$phase_name" ]; then
    timings+=("$(printf '%-28s %4ds' "$phase_name" $((SECONDS - phase_start)))")
    echo "-- $phase_name: $((SECONDS - phase_start)) s"
  fi
  phase_name=$1
  phase_start=$SECONDS
  [ -n "$phase_name" ] && echo "== $phase_name"
  return 0
}

phase "model"
model=$(scripts/fetch-model)

phase "cargo fmt --check"
cargo fmt --all -- --check

phase "dependency graphs shared"
# The wheel and the external example must build every dependency with the workspace's features,
# or they compile the whole graph again (see neuroshard-py/Cargo.toml).
scripts/check-dep-graphs

phase "cargo clippy"
cargo clippy --release --workspace --all-targets --features neuroshard-core/internals -- -D warnings

phase "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps -p neuroshard-core --quiet

phase "cargo test (release)"
# One test at a time: network tests must not compete for the 2 cores (timeouts), and the
# heavy model tests already use every core. neuroshard-ffi's `header` test regenerates
# include/neuroshard.h (and fails when the committed copy was stale).
# `cargo build --lib` links libneuroshard (.so/.a) for the C test, with the units `cargo test`
# reuses; `cargo test` builds the rest (tests, binaries, the examples run below). Benches are
# only checked (clippy above); they run in the bench scripts. The Python extension is left to
# maturin (below): pyo3's build script reads the interpreter config maturin writes, and
# building it here too would compile pyo3, numpy and the extension twice.
workspace=(--release --workspace --exclude neuroshard-py --features neuroshard-core/internals)
cargo build "${workspace[@]}" --lib
cargo test "${workspace[@]}" -- --test-threads=1

phase "C header up to date"
if ! git diff --exit-code -- include/neuroshard.h; then
  echo "include/neuroshard.h is stale: cargo test regenerated it; commit the new header" >&2
  exit 1
fi

phase "C test"
cc -std=c11 -Wall -Wextra -Werror -O1 -g -Iinclude tests/c/test_neuroshard.c \
  -L"$target/release" -lneuroshard -lm -o "$target/test_neuroshard"
cc -std=c11 -Wall -Wextra -Werror -O1 -Iinclude examples/c/generate.c \
  -L"$target/release" -lneuroshard -o "$target/example_generate_c"
export LD_LIBRARY_PATH="$target/release${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$target/test_neuroshard" tiny "$fixtures"
expected="$target/smollm2_greedy_text.txt"
python3 -c 'import json,sys; sys.stdout.write(json.load(open(sys.argv[1]))["greedy_text"])' \
  "$fixtures/smollm2/reference.json" > "$expected"
"$target/test_neuroshard" swarm "$model" "$expected"
"$target/example_generate_c" "$model" | tee "$target/example_c.out"
grep -qF "$(cat "$expected")" "$target/example_c.out"

phase "C test under valgrind"
if ! command -v valgrind >/dev/null; then
  apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
  --show-leak-kinds=definite "$target/test_neuroshard" tiny "$fixtures" > "$target/valgrind.out"
tail -1 "$target/valgrind.out"

phase "Rust examples"
# `cargo test` above built the examples (target/release/examples).
"$target/release/examples/generate" "$model" | grep -qF "$(cat "$expected")"
"$target/release/examples/swarm" "$model" | grep -qF "$(cat "$expected")"
NEUROSHARD_EXAMPLE_SECS=1 "$target/release/examples/node" "$model" 0 30 | grep -q '@127.0.0.1:'
# The many-sessions bench, small (benches/many_sessions.sh runs the full one): it fails when a
# batched session's text differs from its solo run.
"$target/release/neuroshard" bench-sessions --model "$model" --nodes 1,3 --sessions 1,3 \
  --decode-tokens 8 --engine-too --json "$target/bench_sessions_ci.json" 2>&1 | grep 'sessions:'
# The tolerant vote's calibration on SmolLM2 (honest modes, kernel paths, threads and frame
# precisions against the attacks; ~25 s): fails when an honest variant leaves the default
# tolerance or an attack falls inside it.
NEUROSHARD_PREBUILT=1 benches/trust_calibration.sh | tail -3
# A project outside the workspace, built like a user's: the workspace lockfile pins every
# version (cargo metadata only adds the project's own entry), then --locked. Its dependencies
# are the workspace build's (scripts/check-dep-graphs); only neuroshard-core compiles again.
cp Cargo.lock examples/rust/Cargo.lock
cargo metadata --offline --format-version 1 --manifest-path examples/rust/Cargo.toml >/dev/null
cargo run --release --locked --quiet --manifest-path examples/rust/Cargo.toml -- "$model" \
  | grep -qF "$(cat "$expected")"
rm -f examples/rust/Cargo.lock

phase "Python wheel"
tools="$target/py-build-venv"
[ -x "$tools/bin/maturin" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q maturin==1.16.0; }
rm -rf "$target/wheels"
"$tools/bin/maturin" build --release --quiet -o "$target/wheels"
venv="$target/py-test-venv"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q numpy pytest mypy "openai>=1.40,<4" "selenium>=4.20,<5" \
  "$target"/wheels/neuroshard-*.whl

# `pip install .` from the repo root builds the same extension in the same target dir (fresh).
venv_src="$target/py-src-venv"
rm -rf "$venv_src"
python3 -m venv "$venv_src"
CARGO_TARGET_DIR="$target" "$venv_src/bin/pip" install -q .
"$venv_src/bin/python" -c 'import neuroshard, sys; print("pip install . ->", neuroshard.__version__, neuroshard.THREADS, "threads")'

phase "Python stubs and types"
(cd "$target" && "$venv/bin/python" -m mypy.stubtest neuroshard._native)
"$venv/bin/python" -m mypy --strict examples/python

phase "Chromium (web chat test)"
# Debian's Chromium and ChromeDriver (playwright's own browser download is not reachable).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi

phase "pytest"
export NEUROSHARD_BIN="$target/release/neuroshard"
(cd tests/python && "$venv/bin/python" -m pytest -q -p no:cacheprovider .)
for example in examples/python/*.py; do
  "$venv/bin/python" "$example" "$model" | grep -qF "$(cat "$expected")"
done

phase ""
echo "== wall time per phase"
printf '%s\n' "${timings[@]}"
echo "total $((SECONDS - suite_start)) s"
