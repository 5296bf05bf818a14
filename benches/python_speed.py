"""Decode tokens/s of the Python client against the CLI, on one SmolLM2 LocalSwarm(nodes=3).

Runs alternate (Python, CLI, Python, ...), so each pair is measured under the same machine load.
Writes JSON records {name, unit, value, machine}: best of each side, their ratio, and the
median of the paired ratios. Target: Python within 5% of the CLI (ratio >= 0.95).

Usage: python benches/python_speed.py CLI_BINARY MODEL OUT.json [reps] [tokens]
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import neuroshard

PROMPT = "The future of AI is"


def main() -> None:
    cli, model, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 128
    pairs = []
    with neuroshard.LocalSwarm(model, nodes=3) as swarm, neuroshard.Client(peers=[swarm.address]) as client:
        for rep in range(reps):
            py = client.generate_details(PROMPT, max_tokens=tokens, ignore_eos=True)["decode_tokens_per_sec"]
            run = subprocess.run(
                [cli, "generate", "--peers", swarm.address, "--prompt", PROMPT,
                 "--max-tokens", str(tokens), "--ignore-eos"],
                capture_output=True, text=True, timeout=300,
            )
            if run.returncode != 0:
                sys.exit(f"CLI failed: {run.stderr}")
            found = re.search(r"decode ([0-9.]+) tok/s", run.stderr)
            if not found:
                sys.exit(f"no decode rate in the CLI's output: {run.stderr}")
            pairs.append((py, float(found.group(1))))
            print(f"rep {rep + 1}: python {py:.1f} tok/s, cli {pairs[-1][1]:.1f} tok/s", file=sys.stderr)
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {neuroshard.THREADS} threads"
    py_best = max(p for p, _ in pairs)
    cli_best = max(c for _, c in pairs)
    ratios = sorted(p / c for p, c in pairs)
    records = [
        {"name": "python_client_decode_swarm3", "unit": "tokens/s", "value": round(py_best, 1)},
        {"name": "cli_client_decode_swarm3", "unit": "tokens/s", "value": round(cli_best, 1)},
        {"name": "python_over_cli_best", "unit": "ratio", "value": round(py_best / cli_best, 3)},
        {"name": "python_over_cli_paired_median", "unit": "ratio", "value": round(ratios[len(ratios) // 2], 3)},
    ]
    for record in records:
        record["machine"] = machine
        print(f'{record["name"]:32s} {record["value"]:>8} {record["unit"]}')
    with open(out_path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
