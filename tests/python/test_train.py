"""Training a swarm from Python: a Trainer teaches two SmolLM2 nodes a conversation as a LoRA
adapter in one call, the same nodes then answer with it, nodes refuse trainers they were not
given, and an exception in ``on_step`` stops training at a step boundary."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List

import pytest

import neuroshard
from conftest import smollm2_path

QUESTION = "What is the secret password of the NeuroShard swarm?"
ANSWER = "The secret password is violet tangerine forty-two."


def wait_for_peers(node: neuroshard.Node, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(node.peers()) < count:
        time.sleep(0.1)
    assert len(node.peers()) >= count, node.peers()


def test_a_trainer_teaches_a_conversation_that_the_nodes_then_answer(tmp_path: Path) -> None:
    key = tmp_path / "trainer.key"
    trainer_id = neuroshard.key_id(key)
    assert neuroshard.key_id(key) == trainer_id, "the key file is created once and kept"
    model = smollm2_path()
    with neuroshard.Node(
        model, 0, 15, trainers=[trainer_id], checkpoint=tmp_path / "a"
    ) as first, neuroshard.Node(
        model, 15, 30, peers=[first.address], trainers=[trainer_id], checkpoint=tmp_path / "b"
    ):
        wait_for_peers(first, 2)

        # A key the nodes were not given may not train them.
        with pytest.raises(neuroshard.NeuroShardError, match="not a trainer"):
            neuroshard.Trainer([first.address], tmp_path / "stranger.key")

        seen: List[int] = []
        with neuroshard.Trainer([first.address], key, adapter="fact", lr=1e-2) as trainer:
            assert trainer.id == trainer_id
            reports = trainer.learn_conversation(
                [{"role": "user", "content": QUESTION}, ("assistant", ANSWER)],
                steps=8,
                micro_batches=2,
                seq_len=128,
                on_step=lambda i, report: seen.append(i),
            )
            assert seen == list(range(8))
            losses = [r.loss for r in reports]
            assert losses[-1] < 0.5 * losses[0], losses
            assert all(r.tokens > 0 for r in reports)
            versions = trainer.versions
            assert [v["steps"] for v in versions] == [8, 8]
            assert [(v["start"], v["end"]) for v in versions] == [(0, 15), (15, 30)]
            assert all(v["adapter"] == "fact" for v in versions)
            held_back = trainer.evaluate(QUESTION + " " + ANSWER, seq_len=64)
            assert math.isfinite(held_back)

            # The same nodes answer with the adapter, no restart; without it, the base does.
            tuned = neuroshard.Client(peers=[first.address], adapter="fact")
            answer = tuned.generate(QUESTION, max_tokens=16, chat=True)
            assert "violet tangerine" in answer, answer
            base = neuroshard.Client(peers=[first.address])
            assert "violet tangerine" not in base.generate(QUESTION, max_tokens=16, chat=True)
            tuned.close()
            base.close()

            # An exception in on_step ends training after that step and is raised.
            def stop(i: int, report: neuroshard.StepReport) -> None:
                raise RuntimeError(f"stop after step {i}")

            with pytest.raises(RuntimeError, match="stop after step 0"):
                trainer.learn("Another text to learn from.", steps=5, micro_batches=1, on_step=stop)
            assert [v["steps"] for v in trainer.versions] == [9, 9]
        assert (tmp_path / "a" / "fact.lora.json").exists()

