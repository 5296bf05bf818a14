"""``python -m neuroshard node|generate|swarm ...``: the CLI's main commands from Python.

Output follows the CLI: generated text on stdout, progress on stderr, a node's address line
first on stdout.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import List, Optional

import neuroshard


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")


def _stream(client: neuroshard.Client, args: argparse.Namespace) -> None:
    for piece in client.stream(
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuroshard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate through a swarm")
    g.add_argument("--peers", nargs="+", required=True, help="node addresses")
    _add_sampling(g)

    s = sub.add_parser("swarm", help="start a local swarm and generate through it")
    s.add_argument("--model", default=None, help="model path (default: fetch SmolLM2)")
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--replicas", type=int, default=1)
    _add_sampling(s)

    n = sub.add_parser("node", help="serve a slice of layers until Ctrl-C")
    n.add_argument("--model", required=True)
    n.add_argument("--start", type=int, required=True)
    n.add_argument("--end", type=int, required=True)
    n.add_argument("--port", type=int, default=0)
    n.add_argument("--peers", nargs="*", default=[])

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            with neuroshard.Client(peers=args.peers) as client:
                _stream(client, args)
        elif args.command == "swarm":
            model = args.model or neuroshard.fetch_model()
            with neuroshard.LocalSwarm(model, nodes=args.nodes, replicas=args.replicas) as swarm:
                with neuroshard.Client(peers=[swarm.address]) as client:
                    _stream(client, args)
        else:
            with neuroshard.Node(args.model, args.start, args.end, port=args.port, peers=args.peers) as node:
                print(node.address, flush=True)
                print(f"node serving layers {args.start}..{args.end}; Ctrl-C to stop", file=sys.stderr)
                stop = threading.Event()
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                try:
                    while not stop.wait(0.2):
                        pass
                except KeyboardInterrupt:
                    pass
    except neuroshard.NeuroShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
