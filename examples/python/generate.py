"""Start a local 3-node swarm and stream text through it.

    python examples/python/generate.py [MODEL]
"""

from __future__ import annotations

import sys

import neuroshard


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else neuroshard.fetch_model()
    with neuroshard.LocalSwarm(model, nodes=3) as swarm:
        with neuroshard.Client(peers=[swarm.address]) as client:
            for piece in client.stream("The future of AI is", max_tokens=24):
                print(piece, end="", flush=True)
            print()
            for peer in client.peers():
                print(f"# node {peer.id[:10]} serves layers {peer.start}..{peer.end}", file=sys.stderr)


if __name__ == "__main__":
    main()
