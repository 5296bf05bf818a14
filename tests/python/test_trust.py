"""Trust from Python: the vote rule and comparison, the reputation table, signed receipts,
and a replicated generation (two ranges of three SmolLM2 replicas) that writes the reference
text and leaves every honest node unbanned."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import neuroshard
from conftest import smollm2_path

# Three replicas (ids from fixed keys, as a node's key file holds them).
KEYS = [bytes([seed]) * 32 for seed in (1, 2, 3)]
CHAINS = [neuroshard.ReceiptChain(k) for k in KEYS]
IDS = [c.node for c in CHAINS]


def honest_outputs(width: int = 64, rows: int = 2) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal(width * rows).astype(np.float32)


def test_comparison_tolerates_rounding_and_catches_noise() -> None:
    a = honest_outputs()
    rounded = a.astype(np.float16).astype(np.float32)
    noisy = a + 0.01 * float(np.sqrt(np.mean(a**2))) * honest_outputs()[::-1].copy()
    rel, max_abs = neuroshard.distance(a, rounded, 64)
    assert 0 < rel < 2e-3 and max_abs < 2e-2
    assert neuroshard.agree(a, rounded, 64)
    assert not neuroshard.agree(a, rounded, 64, comparison="exact")
    assert not neuroshard.agree(a, noisy, 64)
    nan = a.copy()
    nan[3] = np.nan
    assert not neuroshard.agree(nan, nan, 64)
    with pytest.raises(ValueError):
        neuroshard.agree(a, a, 64, comparison="lenient")


def test_tally_outvotes_one_liar_and_needs_a_majority() -> None:
    a = honest_outputs()
    liar = a * 1.02
    verdict = neuroshard.tally(IDS, {IDS[0]: liar, IDS[1]: a, IDS[2]: a.copy()}, 64)
    assert verdict is not None
    assert verdict["deviating"] == [IDS[0]]
    assert sorted(verdict["agreeing"]) == sorted(IDS[1:])
    # The winner is the agreeing group's lowest id, whatever the order of the dict.
    assert verdict["winner"] == min(IDS[1:])
    # One honest answer of three expected is no majority.
    assert neuroshard.tally(IDS, {IDS[1]: a}, 64) is None
    with pytest.raises(ValueError):
        neuroshard.tally(["not-an-id"], {}, 64)


def test_a_trusted_referee_overrules_colluders_and_settles_a_split() -> None:
    a = honest_outputs()
    lie = a * 1.02
    low, mid, high = sorted(IDS)
    referee = neuroshard.ReceiptChain(bytes([9] * 32)).node
    # Two colluders (the lowest ids) win the plain vote; the referee's replay overrules them.
    colluding = {low: lie, mid: lie.copy(), high: a}
    plain = neuroshard.tally(IDS, colluding, 64)
    assert plain is not None and plain["winner"] == low
    judged = neuroshard.tally(IDS, colluding, 64, referee=(referee, a.copy()))
    assert judged is not None
    assert judged["winner"] == high
    assert sorted(judged["deviating"]) == [low, mid]
    # Three different answers: no majority, which the referee decides.
    split = {low: a * 1.5, mid: a, high: a * 0.5}
    assert neuroshard.tally(IDS, split, 64) is None
    settled = neuroshard.tally(IDS, split, 64, referee=(referee, a.copy()))
    assert settled is not None and settled["agreeing"] == [mid]
    with pytest.raises(ValueError):
        neuroshard.tally(IDS, split, 64, referee=("not-an-id", a))


def test_reputation_promotes_bans_and_persists(tmp_path: Path) -> None:
    table = neuroshard.Reputation()
    node, liar, pinned = IDS
    assert table.state(node) == "probation" and table.may_route(node)
    for _ in range(20):
        table.agreed(node)
    assert table.state(node) == "trusted"
    table.deviated(liar, "outvoted in a test")
    assert table.state(liar) == "banned" and not table.may_route(liar)
    table.pin(pinned)
    table.timed_out(pinned)
    assert table.state(pinned) == "trusted"
    path = tmp_path / "reputation.json"
    table.save(path)
    again = neuroshard.Reputation.load(path)
    rows = {r["node"]: r for r in again.table()}
    assert rows[liar]["state"] == "banned" and "outvoted" in rows[liar]["reason"]
    assert rows[node]["state"] == "trusted" and rows[pinned]["pinned"]
    # A corrupt table is an error, never a silent reset of the bans.
    path.write_text("{not json")
    with pytest.raises(ValueError):
        neuroshard.Reputation.load(path)


def test_receipts_verify_chain_and_prove_fraud() -> None:
    chain = neuroshard.ReceiptChain(KEYS[0])
    inp, out, other, weight = (bytes([b]) * 32 for b in (10, 11, 12, 13))
    first = chain.issue(7, 0, 5, inp, out, weight)
    second = chain.issue(7, 5, 1, bytes([14]) * 32, out, weight)
    r = neuroshard.verify_receipt(first)
    assert r["node"] == IDS[0] and r["session"] == 7 and r["count"] == 5
    assert r["input"] == inp and r["output"] == out and r["prev"] == bytes(32)
    rows = neuroshard.verify_chain([first, second])
    assert rows[1]["prev"] != bytes(32)
    with pytest.raises(ValueError):
        neuroshard.verify_chain([second, first])
    # One signer, one input, two outputs: fraud, provable by anyone.
    lie = chain.issue(7, 0, 5, inp, other, weight)
    assert neuroshard.fraud_proof(first, lie) == IDS[0]
    assert neuroshard.fraud_proof(first, second) is None
    # A flipped byte breaks the signature.
    forged = bytearray(first)
    forged[len(forged) // 2] ^= 1
    with pytest.raises(ValueError):
        neuroshard.verify_receipt(bytes(forged))


def test_a_replicated_generation_writes_the_reference_text(smollm2_reference) -> None:
    with neuroshard.LocalSwarm(smollm2_path(), nodes=2, replicas=3) as swarm:
        with neuroshard.Client(peers=swarm.addresses(), redundancy=3) as client:
            out = client.generate_details(
                smollm2_reference["prompt"], max_tokens=8, ignore_eos=True
            )
            assert smollm2_reference["greedy_text"].startswith(out["text"])
            assert len(out["replicas"]) == 2 and all(len(r) == 3 for r in out["replicas"])
            assert out["votes"] == []
            table = client.trust_table()
            assert table and all(r["state"] != "banned" for r in table)
            assert all(r["agreed"] > 0 for r in table)
            path = Path(os.environ.get("TMPDIR", "/tmp")) / "neuroshard-test-reputation.json"
            client.save_reputation(path)
            client.load_reputation(path)
            assert {r["node"] for r in client.trust_table()} == {r["node"] for r in table}
