"""Fixtures shared by the Python tests: paths to the reference fixtures, the SmolLM2 model,
the CLI binary, and one SmolLM2 LocalSwarm for the whole session."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pytest

import neuroshard

ROOT = Path(__file__).resolve().parents[2]


def fixtures() -> Path:
    return Path(os.environ.get("NEUROSHARD_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def smollm2_path() -> str:
    return neuroshard.fetch_model()


def cli_binary() -> str:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = Path(os.environ.get("NEUROSHARD_BIN", target / "release" / "neuroshard"))
    assert path.exists(), f"{path} missing: build it with cargo build --release"
    return str(path)


def read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """A minimal safetensors reader (8-byte header length, JSON header, raw data)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        raw = data[8 + n + begin : 8 + n + end]
        out[name] = np.frombuffer(raw, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


@pytest.fixture(scope="session")
def smollm2_reference() -> dict:
    return json.loads((fixtures() / "smollm2" / "reference.json").read_text())


@pytest.fixture(scope="session")
def swarm() -> Iterator[neuroshard.LocalSwarm]:
    with neuroshard.LocalSwarm(smollm2_path(), nodes=3) as s:
        yield s


@pytest.fixture(scope="session")
def client(swarm: neuroshard.LocalSwarm) -> Iterator[neuroshard.Client]:
    with neuroshard.Client(peers=[swarm.address]) as c:
        yield c
