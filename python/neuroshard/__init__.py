"""NeuroShard: run one language model whose layers are split across many machines.

>>> import neuroshard
>>> path = neuroshard.fetch_model()
>>> with neuroshard.LocalSwarm(path, nodes=3) as swarm:
...     client = neuroshard.Client(peers=[swarm.address])
...     print(client.generate("The future of AI is", max_tokens=24))

The compute thread count is fixed once per process, here, before the native library loads:
``NEUROSHARD_THREADS`` (or ``RAYON_NUM_THREADS``) if set, else the cores this process may use.
Loading an engine or starting a node never changes the environment or starts compute threads.
"""

from __future__ import annotations

import asyncio
import os as _os
from typing import AsyncIterator, Iterator, Optional, Sequence


def _thread_setting() -> str:
    # Environment changes are only safe while no native thread reads the environment: this
    # runs at import, before the native library is loaded.
    explicit = _os.environ.get("NEUROSHARD_THREADS") or _os.environ.get("RAYON_NUM_THREADS")
    if explicit:
        return explicit
    try:
        return str(len(_os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return str(_os.cpu_count() or 1)


_threads = _thread_setting()
for _var in ("RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"):
    _os.environ.setdefault(_var, _threads)

from . import _native  # noqa: E402
from ._native import (  # noqa: E402
    InferenceSession,
    LocalSwarm,
    Node,
    PeerInfo,
    ReceiptChain,
    Reputation,
    ShardEngine,
    StepReport,
    TextStream,
    Tokenizer,
    Trainer,
    agree,
    distance,
    fraud_proof,
    key_id,
    tally,
    verify_chain,
    verify_receipt,
    version,
)
from ._native import NeuroShardError  # noqa: E402
from ._native import (  # noqa: E402
    BadInputError,
    CorruptModelError,
    GenerationError,
    HiddenDtypeError,
    HiddenSizeError,
    InternalError,
    InvalidConfigError,
    IoError,
    MissingTensorError,
    ModelFileError,
    NetworkError,
    PositionGapError,
    SessionExistsError,
    SessionsFullError,
    SessionTooLongError,
    SliceOutOfRangeError,
    TensorError,
    TensorShapeError,
    TokenizerError,
    TokenOutOfRangeError,
    TrainingError,
    UnknownFormatError,
    UnknownSessionError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
    WireError,
    WrongWeightsError,
)
from ._fetch import fetch_model  # noqa: E402

THREADS: int = _native._init_runtime(int(_threads))
"""Compute threads of this process (fixed at import)."""

__version__: str = version()


class Client(_native.Client):
    """A client of one swarm, connected through any of its nodes (``peers``: address lines
    ``<id>@<ip:port>`` or plain ``host:port``). Several threads may use one client at once;
    blocking calls release the GIL and Ctrl-C interrupts them."""

    async def agenerate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
        ignore_eos: bool = False,
    ) -> str:
        """:meth:`generate` without blocking the event loop."""
        return await asyncio.to_thread(
            self.generate,
            prompt,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            list(stop) if stop is not None else None,
            chat,
            ignore_eos,
        )

    async def astream(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
        ignore_eos: bool = False,
    ) -> AsyncIterator[str]:
        """:meth:`stream` as an async iterator (each piece is awaited off the event loop)."""
        pieces: Iterator[str] = self.stream(
            prompt,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            list(stop) if stop is not None else None,
            chat,
            ignore_eos,
        )
        done = object()
        while True:
            piece = await asyncio.to_thread(next, pieces, done)
            if piece is done:
                return
            assert isinstance(piece, str)
            yield piece


__all__ = [
    "THREADS",
    "Client",
    "InferenceSession",
    "LocalSwarm",
    "Node",
    "PeerInfo",
    "ReceiptChain",
    "Reputation",
    "ShardEngine",
    "StepReport",
    "TextStream",
    "Tokenizer",
    "Trainer",
    "fetch_model",
    "agree",
    "distance",
    "fraud_proof",
    "key_id",
    "tally",
    "verify_chain",
    "verify_receipt",
    "NeuroShardError",
    "BadInputError",
    "CorruptModelError",
    "GenerationError",
    "HiddenDtypeError",
    "HiddenSizeError",
    "InternalError",
    "InvalidConfigError",
    "IoError",
    "MissingTensorError",
    "ModelFileError",
    "NetworkError",
    "PositionGapError",
    "SessionExistsError",
    "SessionsFullError",
    "SessionTooLongError",
    "SliceOutOfRangeError",
    "TensorError",
    "TensorShapeError",
    "TokenizerError",
    "TokenOutOfRangeError",
    "TrainingError",
    "UnknownFormatError",
    "UnknownSessionError",
    "UnsupportedArchitectureError",
    "UnsupportedDtypeError",
    "WireError",
    "WrongWeightsError",
]
