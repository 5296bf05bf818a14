"""llama.cpp (via llama-cpp-python) against neuroshard on the same GGUF, same thread count.

Run through benches/llamacpp_compare.sh, which prepares the venv and the neuroshard binary.
Both sides are timed in the same run, alternating, best of N each:

- prefill: tokens/s for one ~256-token prompt (the text neuroshard's `bench` uses);
- decode: tokens/s for 128 greedy tokens after an 8-token prompt (end-of-text ignored).

Exactness is checked too: neuroshard's greedy continuation of the reference prompt must equal
`../shared/fixtures/smollm2/reference.json` (Hugging Face transformers on the dequantised
weights); llama.cpp's is reported next to it (it quantises activations to 8 bits, so it may
flip a near-tie). Writes a JSON list of {name, unit, value, machine, ...} records.
"""

import argparse
import json
import statistics
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from llama_cpp import Llama

# The same text neuroshard's `bench` command repeats to the requested prompt length.
BENCH_TEXT = (
    "The history of computing is a story of machines that learned to share work. "
    "Early computers filled rooms; later, networks of small machines cooperated. "
)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cpus"
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LlamaCpp:
    """llama.cpp with greedy decoding driven token by token, as neuroshard's loop does."""

    def __init__(self, model: str, threads: int):
        self.llm = Llama(
            model_path=model,
            n_ctx=1024,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def last_argmax(self) -> int:
        # llama-cpp-python >= 0.3 no longer copies the last row into `scores` unless every
        # row's logits are kept (which would slow the prefill); read llama.cpp's buffer.
        n_vocab = self.llm.n_vocab()
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    def prefill(self, tokens: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return len(tokens) / (time.perf_counter() - t0)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """n greedy tokens after `prompt`; decode tokens/s counts the n-1 single-token steps
        after the first token (as neuroshard does: the first comes from the prefill)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = [self.last_argmax()]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([out[-1]])
            out.append(self.last_argmax())
        elapsed = time.perf_counter() - t0
        return out, (n - 1) / elapsed if n > 1 else 0.0


def neuroshard_bench(binary: str, model: str, threads: int, prompt_tokens: int, decode: int):
    """One `neuroshard bench` run in exact mode; returns (prefill, decode, decode token ids)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        subprocess.run(
            [binary, "--threads", str(threads), "bench", "--model", model, "--modes", "exact",
             "--reps", "1", "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode),
             "--json", path],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        records = {r["name"]: r for r in json.load(open(path))}
    pre = records["smollm2_single_process_prefill_exact"]
    dec = records["smollm2_single_process_decode_exact"]
    return pre["value"], dec["value"], dec.get("decode_token_ids", [])


def neuroshard_reference_text(binary: str, model: str, threads: int, prompt: str, n: int) -> str:
    out = subprocess.run(
        [binary, "--threads", str(threads), "generate", "--model", model, "--prompt", prompt,
         "--max-tokens", str(n), "--ignore-eos"],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.rstrip("\n")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    llama = LlamaCpp(args.model, args.threads)
    base = llama.tokenize(BENCH_TEXT)
    long_prompt = (base * (args.prompt_tokens // len(base) + 1))[: args.prompt_tokens]
    short_prompt = long_prompt[:8]

    best = {"llama_prefill": 0.0, "llama_decode": 0.0, "ns_prefill": 0.0, "ns_decode": 0.0}
    llama_tokens, ns_tokens = [], []
    # Per-rep ratios of runs next to each other: robust to the machine's slow and fast phases.
    paired = {"prefill": [], "decode": []}
    for rep in range(1, args.reps + 1):
        # Alternating, so both sides see the same machine conditions.
        lp = llama.prefill(long_prompt)
        llama_tokens, ld = llama.greedy(short_prompt, args.decode_tokens)
        np_, nd, ns_tokens = neuroshard_bench(
            args.binary, args.model, args.threads, args.prompt_tokens, args.decode_tokens
        )
        print(
            f"rep {rep}: llama.cpp prefill {lp:.1f} decode {ld:.1f} | "
            f"neuroshard prefill {np_:.1f} decode {nd:.1f} tok/s",
            file=sys.stderr,
        )
        best["llama_prefill"] = max(best["llama_prefill"], lp)
        best["llama_decode"] = max(best["llama_decode"], ld)
        best["ns_prefill"] = max(best["ns_prefill"], np_)
        best["ns_decode"] = max(best["ns_decode"], nd)
        paired["prefill"].append(np_ / lp)
        paired["decode"].append(nd / ld)

    reference = json.load(open(args.reference))
    ref_ids = reference["greedy_ids"]
    llama_ref, _ = llama.greedy(reference["input_ids"], len(ref_ids))
    ns_text = neuroshard_reference_text(
        args.binary, args.model, args.threads, reference["prompt"], len(ref_ids)
    )

    m = machine()
    common = {"machine": m, "threads": args.threads, "reps": args.reps}
    records = [
        {"name": "llamacpp_prefill", "unit": "tokens/s", "value": round(best["llama_prefill"], 1),
         "prompt_tokens": len(long_prompt), **common},
        {"name": "neuroshard_exact_prefill", "unit": "tokens/s", "value": round(best["ns_prefill"], 1),
         "prompt_tokens": len(long_prompt), **common},
        {"name": "prefill_neuroshard_over_llamacpp", "unit": "ratio",
         "value": round(best["ns_prefill"] / best["llama_prefill"], 3), "target": 1.0, **common},
        {"name": "llamacpp_decode", "unit": "tokens/s", "value": round(best["llama_decode"], 1),
         "decode_tokens": args.decode_tokens, **common},
        {"name": "neuroshard_exact_decode", "unit": "tokens/s", "value": round(best["ns_decode"], 1),
         "decode_tokens": args.decode_tokens, **common},
        {"name": "decode_neuroshard_over_llamacpp", "unit": "ratio",
         "value": round(best["ns_decode"] / best["llama_decode"], 3), "target": 1.2, **common},
        {"name": "prefill_ratio_paired_median", "unit": "ratio",
         "value": round(statistics.median(paired["prefill"]), 3), "target": 1.0, **common},
        {"name": "decode_ratio_paired_median", "unit": "ratio",
         "value": round(statistics.median(paired["decode"]), 3), "target": 1.2, **common},
        {"name": "neuroshard_reference_text_identical", "unit": "bool",
         "value": ns_text == reference["greedy_text"], **common},
        {"name": "llamacpp_reference_tokens_identical", "unit": "tokens",
         "value": common_prefix(llama_ref, ref_ids), "of": len(ref_ids), **common},
        {"name": "decode_tokens_identical_prefix", "unit": "tokens",
         "value": common_prefix(llama_tokens, ns_tokens), "of": args.decode_tokens, **common},
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(records, f, indent=1)
    for r in records:
        print(f'{r["name"]:40s} {r["value"]!s:>8} {r["unit"]}')
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if ns_text == reference["greedy_text"] else 1


if __name__ == "__main__":
    sys.exit(main())
