#!/usr/bin/env python3
"""Detection matrix over separate node processes (SmolLM2, 127.0.0.1).

Six `neuroshard node` processes serve SmolLM2 as two ranges of three replicas (layers 0..15
and 15..30). For every lying behaviour and both ranges, the lowest-id replica of that range
is restarted with `--behaviour NAME`, and `neuroshard generate --redundancy 3` runs a greedy
generation through them. A cell passes when the generated text equals the honest text, the
client's reputation table (`--trust-report`) bans the liar and nobody else, and the first
vote finding against the liar comes within 3 votes. An honest run of `--honest-tokens`
tokens first must produce no finding at all (each token is one client vote and three
receiver votes).

Usage: trust_matrix.py BIN MODEL OUT.json [--tokens N] [--honest-tokens N]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

PROMPT = "The capital of France is"
BEHAVIOURS = ["noise", "scale", "skip-layer", "wrong-weights", "stale", "zeros", "slow",
              "equivocate", "bad-upstream"]
SLICES = [(0, 15), (0, 15), (0, 15), (15, 30), (15, 30), (15, 30)]


class Swarm:
    """Six node processes; `liar` = (index, behaviour) lies."""

    def __init__(self, bin_path, model, keys, liar=None, tables=None, variants=None):
        self.procs = []
        self.addresses = []
        try:
            for i, (start, end) in enumerate(SLICES):
                cmd = [bin_path, "node", "--model", model, "--start", str(start),
                       "--end", str(end), "--key-file", keys[i]]
                # Each cell is its own experiment: the nodes' tables start empty.
                if tables:
                    cmd += ["--reputation", f"{tables}-node{i}.json"]
                if self.addresses:
                    cmd += ["--peers", self.addresses[0]]
                if liar and liar[0] == i:
                    cmd += ["--behaviour", liar[1]]
                env = dict(os.environ, RAYON_NUM_THREADS="1")
                if variants:
                    mode, kernel, threads = variants[i % len(variants)]
                    cmd += ["--mode", mode]
                    env.update(NEUROSHARD_KERNEL_PATH=kernel, RAYON_NUM_THREADS=str(threads))
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
                self.procs.append(p)
                line = p.stdout.readline().strip()
                if "@" not in line:
                    raise RuntimeError(f"node {i} printed no address: {line!r}")
                self.addresses.append(line)
            self.wait_for_gossip(bin_path)
        except BaseException:
            self.stop()
            raise

    def ids(self):
        return [a.split("@")[0] for a in self.addresses]

    def wait_for_gossip(self, bin_path, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([bin_path, "peers", "--peers", self.addresses[0],
                                  "--reputation", os.path.join(tempfile.gettempdir(), "ns-peers-table.json")],
                                 capture_output=True, text=True, timeout=20).stdout
            m = re.search(r"(\d+) nodes", out)
            if m and int(m.group(1)) == len(SLICES):
                return
            time.sleep(0.3)
        raise RuntimeError("the entry node did not learn all six nodes by gossip")

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def generate(bin_path, swarm, tokens, report, k=3, trust=()):
    # A fresh client table per run (the default file in the data directory would carry
    # one cell's bans into the next).
    cmd = [bin_path, "generate", "--peers", swarm.addresses[0], "--redundancy", str(k),
           "--prompt", PROMPT, "--max-tokens", str(tokens), "--ignore-eos",
           "--trust-report", report, "--reputation", report + ".table"]
    for node in trust:
        cmd += ["--trust", node]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, RAYON_NUM_THREADS="1"))
    if r.returncode != 0:
        raise RuntimeError(f"generate failed: {r.stderr[-2000:]}")
    votes = [l[len("vote: "):] for l in r.stderr.splitlines() if l.startswith("vote: ")]
    prompt_tokens = int(re.search(r"(\d+) prompt tokens", r.stderr).group(1))
    decode = float(re.search(r"decode ([0-9.]+) tok/s", r.stderr).group(1))
    return r.stdout, votes, json.load(open(report)), prompt_tokens, decode, time.time() - t0


def vote_index(finding, prompt_tokens):
    """The 1-based vote a finding came from (vote 1 is the prompt step)."""
    pos = int(re.search(r"position (\d+)", finding).group(1))
    return 1 if pos == 0 else pos - prompt_tokens + 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--honest-tokens", type=int, default=100)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--speed-reps", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    keys = [os.path.join(tmp, f"node{i}.key") for i in range(len(SLICES))]
    results = {"prompt": PROMPT, "tokens": args.tokens, "cells": []}

    swarm = Swarm(args.bin, args.model, keys, tables=os.path.join(tmp, "honest"))
    try:
        ids = swarm.ids()
        text, votes, table, prompt_tokens, decode, _ = generate(
            args.bin, swarm, args.honest_tokens, os.path.join(tmp, "honest.json"))
        banned = [r["node"] for r in table if r["state"] == "banned"]
        steps = args.honest_tokens
        results["honest"] = {
            "tokens": steps,
            "client_votes": steps,
            "receiver_votes": 3 * steps,
            "findings": votes,
            "banned": banned,
            "decode_tokens_per_sec": decode,
        }
        print(f"honest: {steps} tokens, {4 * steps} votes (client + 3 receivers), "
              f"{len(votes)} findings, {len(banned)} banned, decode {decode:.1f} tok/s",
              flush=True)
        honest_text, _, _, _, _, _ = generate(args.bin, swarm, args.tokens,
                                              os.path.join(tmp, "short.json"))
        # Decode speed with 1, 2 and 3 replicas per range on the same six processes,
        # alternating, best of `--speed-reps` (all six share this machine's cores, so k
        # replicas cost about k times the compute here; on separate machines they run side
        # by side). Every node is pinned as trusted: without trusted nodes a vote takes at
        # least 3 replicas (plain majority), so k = 2 would run 3.
        speed = {1: 0.0, 2: 0.0, 3: 0.0}
        speed_findings = []
        for _ in range(args.speed_reps):
            for k in (1, 2, 3):
                _, found, _, _, decode, _ = generate(args.bin, swarm, args.speed_tokens,
                                                     os.path.join(tmp, f"speed{k}.json"), k=k,
                                                     trust=ids)
                speed[k] = max(speed[k], decode)
                speed_findings += found
        results["decode_tokens_per_sec"] = {f"k{k}": v for k, v in speed.items()}
        results["speed_findings"] = speed_findings
        votes = votes + speed_findings
        print("decode tokens/s: " + ", ".join(f"k={k} {v:.1f}" for k, v in speed.items()),
              flush=True)
    finally:
        swarm.stop()
    failures = []
    if votes or banned:
        failures.append(f"honest run flagged: {votes} {banned}")

    # Honest replicas that compute differently: each range's three replicas run exact mode
    # with the best kernels on 1 thread, f32 mode on 2 threads, and exact mode with the
    # scalar kernels (their receipts declare different arithmetic, so votes compare them
    # tolerantly). None may be flagged.
    kernel = "avx2" if "avx2" in open("/proc/cpuinfo").read() else "scalar"
    variants = [("exact", kernel, 1), ("f32", kernel, 2), ("exact", "scalar", 1)]
    swarm = Swarm(args.bin, args.model, keys, tables=os.path.join(tmp, "mixed"),
                  variants=variants)
    try:
        _, mixed_votes, mixed_table, _, mixed_decode, _ = generate(
            args.bin, swarm, args.honest_tokens, os.path.join(tmp, "mixed.json"))
    finally:
        swarm.stop()
    mixed_banned = [r["node"] for r in mixed_table if r["state"] == "banned"]
    results["honest_mixed"] = {
        "variants": [list(v) for v in variants],
        "tokens": args.honest_tokens,
        "client_votes": args.honest_tokens,
        "receiver_votes": 3 * args.honest_tokens,
        "findings": mixed_votes,
        "banned": mixed_banned,
        "decode_tokens_per_sec": mixed_decode,
    }
    print(f"honest, mixed modes/kernels/threads: {args.honest_tokens} tokens, "
          f"{4 * args.honest_tokens} votes, {len(mixed_votes)} findings, "
          f"{len(mixed_banned)} banned", flush=True)
    if mixed_votes or mixed_banned:
        failures.append(f"mixed honest run flagged: {mixed_votes} {mixed_banned}")

    for behaviour in BEHAVIOURS:
        for rng in (0, 1):
            if rng == 1 and behaviour in ("equivocate", "bad-upstream"):
                continue  # the last range has one receiver, the client
            members = [i for i, s in enumerate(SLICES) if s == SLICES[3 * rng]]
            liar = min(members, key=lambda i: ids[i])
            swarm = Swarm(args.bin, args.model, keys, liar=(liar, behaviour),
                          tables=os.path.join(tmp, f"{behaviour}-{rng}"))
            try:
                text, votes, table, prompt_tokens, decode, secs = generate(
                    args.bin, swarm, args.tokens, os.path.join(tmp, f"{behaviour}-{rng}.json"))
            finally:
                swarm.stop()
            liar_id = ids[liar]
            state = {r["node"]: r for r in table}
            against = [v for v in votes if liar_id[:10] in v]
            first = min((vote_index(v, prompt_tokens) for v in against), default=None)
            others_banned = [n for n, r in state.items()
                             if n != liar_id and r["state"] == "banned"]
            cell = {
                "behaviour": behaviour,
                "range": rng,
                "liar_is_lowest_id": True,
                "text_equals_honest": text == honest_text,
                "liar_state": state.get(liar_id, {}).get("state", "probation"),
                "liar_reason": state.get(liar_id, {}).get("reason", ""),
                "identified_at_vote": first,
                "honest_banned": others_banned,
                "seconds": round(secs, 1),
            }
            ok = (cell["text_equals_honest"] and cell["liar_state"] == "banned"
                  and first is not None and first <= 3 and not others_banned)
            cell["pass"] = ok
            results["cells"].append(cell)
            print(f"{behaviour:>13} range {rng}: {'ok' if ok else 'FAIL'} "
                  f"(vote {first}, {cell['liar_state']}: {cell['liar_reason']})", flush=True)
            if not ok:
                failures.append(f"{behaviour} range {rng}: {cell}")
    results["failures"] = failures
    json.dump(results, open(args.out, "w"), indent=1)
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
