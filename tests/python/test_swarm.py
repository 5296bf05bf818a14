"""A SmolLM2 LocalSwarm(nodes=3) driven from Python: text, streams, logits sessions, asyncio,
threads, Ctrl-C, exit without close, and speed against the CLI."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import numpy as np
import pytest

import neuroshard
from conftest import ROOT, cli_binary, smollm2_path

N = 24  # the reference's greedy tokens


def test_generate_equals_the_reference_and_the_cli(client, swarm, smollm2_reference) -> None:
    text = client.generate(smollm2_reference["prompt"], max_tokens=N, ignore_eos=True)
    assert text == smollm2_reference["greedy_text"]
    cli = subprocess.run(
        [cli_binary(), "--threads", "1", "generate", "--peers", swarm.address,
         "--prompt", smollm2_reference["prompt"], "--max-tokens", str(N), "--ignore-eos"],
        capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip("\n") == text


def test_stream_pieces_join_to_the_same_text(client, smollm2_reference) -> None:
    pieces = list(client.stream(smollm2_reference["prompt"], max_tokens=N, ignore_eos=True))
    assert len(pieces) > 1
    assert "".join(pieces) == smollm2_reference["greedy_text"]


def test_stop_strings_cut_the_text(client, smollm2_reference) -> None:
    full = smollm2_reference["greedy_text"]
    stop = " not"
    text = client.generate(smollm2_reference["prompt"], max_tokens=N, stop=[stop])
    assert text == full[: full.index(stop)]
    streamed = "".join(client.stream(smollm2_reference["prompt"], max_tokens=N, stop=[stop]))
    assert streamed == text


def test_session_step_logits_follow_the_greedy_path(client, smollm2_reference) -> None:
    with client.session(max_length=64) as session:
        logits = session.step(smollm2_reference["input_ids"])
        assert logits.dtype == np.float32 and logits.ndim == 1 and logits.shape[0] > 1000
        top5 = list(np.argsort(-logits)[:5])
        assert top5 == smollm2_reference["last_logits_top5_ids"]
        assert abs(float(logits[top5[0]]) - smollm2_reference["last_logits_top5_values"][0]) < 1e-3
        chosen = []
        for _ in range(N):
            token = int(np.argmax(logits))
            chosen.append(token)
            logits = session.step([token])
        assert chosen == smollm2_reference["greedy_ids"]
        assert session.position == len(smollm2_reference["input_ids"]) + N
        with pytest.raises(neuroshard.SessionTooLongError):
            session.step([1] * 64)


def test_asyncio_variants(client, smollm2_reference) -> None:
    async def run() -> Tuple[str, List[str]]:
        text = await client.agenerate(smollm2_reference["prompt"], max_tokens=N, ignore_eos=True)
        pieces = [p async for p in client.astream(smollm2_reference["prompt"], max_tokens=N, ignore_eos=True)]
        return text, pieces

    text, pieces = asyncio.run(run())
    assert text == smollm2_reference["greedy_text"]
    assert "".join(pieces) == text


def test_two_threads_generate_at_once_interleaved(client, smollm2_reference) -> None:
    events: List[Tuple[float, int]] = []
    texts = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        parts = []
        for piece in client.stream(smollm2_reference["prompt"], max_tokens=48, ignore_eos=True):
            with lock:
                events.append((time.monotonic(), i))
            parts.append(piece)
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert texts[0] == texts[1] and texts[0].startswith(smollm2_reference["greedy_text"])
    order = [i for _, i in sorted(events)]
    # Interleaved: each thread received pieces before the other thread's last one.
    last = {i: max(k for k, j in enumerate(order) if j == i) for i in (0, 1)}
    first = {i: order.index(i) for i in (0, 1)}
    assert first[0] < last[1] and first[1] < last[0], order
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 4, order


def test_peers_cover_every_layer(client) -> None:
    peers = client.peers()
    assert len(peers) == 3
    spans = sorted((p.start, p.end) for p in peers)
    assert spans == [(0, 10), (10, 20), (20, 30)]
    assert all("@" in p.address and p.capacity > 0 for p in peers)


def test_network_errors_are_typed() -> None:
    with pytest.raises(neuroshard.NetworkError):
        neuroshard.Client(peers=["not-an-address"])
    with pytest.raises(neuroshard.NetworkError):
        neuroshard.Client(peers=[])


def test_node_serves_and_sees_its_peers(swarm) -> None:
    with neuroshard.Node(smollm2_path(), 0, 10, peers=[swarm.address]) as node:
        assert "@" in node.address
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(node.peers()) < 4:
            time.sleep(0.1)
        assert len(node.peers()) >= 4, node.peers()
    node.close()  # closing twice is fine


SIGINT_SCRIPT = """
import signal, sys, neuroshard
# A shell that starts the suite in the background (`cmd &` without job control) makes SIGINT
# ignored for the whole tree, and Python then installs no handler: restore Python's own.
signal.signal(signal.SIGINT, signal.default_int_handler)
swarm = neuroshard.LocalSwarm(neuroshard.fetch_model(), nodes=3)
client = neuroshard.Client(peers=[swarm.address])
print("ready", flush=True)
try:
    out = client.generate_details("The future of AI is", max_tokens=4000, ignore_eos=True)
    # Not expected: says how the generation ended, so a failure can be understood.
    print(f"finished {out['finish_reason']} after {len(out['tokens'])} tokens", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_sigint_interrupts_a_long_generate_within_a_second() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # let the generation get under way (not a synchronisation point)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline().strip()
        elapsed = time.monotonic() - sent
        assert line == "interrupted", f"{line} ({elapsed:.2f} s after SIGINT)"
        assert elapsed < 1.0, f"KeyboardInterrupt after {elapsed:.2f} s"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


EXIT_SCRIPT = """
import sys, neuroshard
leave_mid_stream = sys.argv[1] == "1"
swarm = neuroshard.LocalSwarm(neuroshard.fetch_model(), nodes=3)
client = neuroshard.Client(peers=[swarm.address])
pieces = client.stream("The future of AI is", max_tokens=64, ignore_eos=True)
first = next(pieces)
if leave_mid_stream:
    print("left", flush=True)
    sys.exit(0)  # no close(), a stream in flight
rest = "".join(pieces)
client.close()
swarm.close()
print("done", flush=True)
"""


def test_twenty_interpreters_exit_cleanly() -> None:
    for run in range(20):
        mid = run % 2
        out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(mid)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, f"run {run}: rc {out.returncode}\n{out.stderr}"
        assert out.stdout.strip() == ("left" if mid else "done"), out.stdout


def test_decode_speed_is_not_far_below_the_cli(client, swarm, smollm2_reference) -> None:
    """A regression guard, not the speed target: the Python client's decode rate stays within
    20% of the CLI's (alternating runs, best of 3 each). It catches per-token overhead such as a
    GIL held across the network wait or a debug build, which cost far more than 20%.

    The target (within 5%) is measured by `benches/python_speed.sh`, best of 5 alternating
    runs: single runs on the 2-core CI machine vary by up to ~10%, since the swarm shares the
    cores with whichever client runs, so a 5% bound here fails on noise.
    """
    tokens = 128
    py_best, cli_best = 0.0, 0.0
    for _ in range(3):
        out = client.generate_details(smollm2_reference["prompt"], max_tokens=tokens, ignore_eos=True)
        py_best = max(py_best, out["decode_tokens_per_sec"])
        cli = subprocess.run(
            [cli_binary(), "generate", "--peers", swarm.address, "--prompt",
             smollm2_reference["prompt"], "--max-tokens", str(tokens), "--ignore-eos"],
            capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        m = re.search(r"decode ([0-9.]+) tok/s", cli.stderr)
        assert m, cli.stderr
        cli_best = max(cli_best, float(m.group(1)))
    print(f"decode: python {py_best:.1f} tok/s, cli {cli_best:.1f} tok/s")
    assert py_best >= 0.8 * cli_best, (py_best, cli_best)


def test_python_m_neuroshard_generate_gives_the_cli_text(swarm, smollm2_reference) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "neuroshard", "generate", "--peers", swarm.address, "--prompt",
         smollm2_reference["prompt"], "--max-tokens", str(N)],
        capture_output=True, text=True, timeout=120, cwd=ROOT / "tests",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == smollm2_reference["greedy_text"]
