"""Write your own decoding: step an inference session and pick tokens from the logits.

    python examples/python/greedy_session.py [MODEL]
"""

from __future__ import annotations

import sys

import numpy as np

import neuroshard


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else neuroshard.fetch_model()
    with neuroshard.LocalSwarm(model, nodes=3) as swarm, neuroshard.Client(peers=[swarm.address]) as client:
        tokenizer = client.tokenizer
        ids = tokenizer.encode("The future of AI is")
        chosen: list[int] = []
        with client.session(max_length=64) as session:
            logits = session.step(ids)
            for _ in range(24):
                token = int(np.argmax(logits))  # greedy; swap in beam search or constraints here
                chosen.append(token)
                logits = session.step([token])
        print(tokenizer.decode(chosen))


if __name__ == "__main__":
    main()
