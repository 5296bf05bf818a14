"""ShardEngine through Python: tiny-llama parity, sessions, errors, no global side effects."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import neuroshard
from conftest import fixtures, read_safetensors

TINY = str(fixtures() / "tiny-llama")


def reference():
    return read_safetensors(fixtures() / "tiny-llama" / "reference.safetensors")


def test_logits_match_the_reference_split_over_two_engines() -> None:
    ref = reference()
    first = neuroshard.ShardEngine(TINY, 0, 2)
    last = neuroshard.ShardEngine(TINY, 2, 4)
    hidden = first.forward(tokens=ref["input_ids"])
    assert hidden.dtype == np.float32 and hidden.shape == (2, 12, 64)
    logits = last.forward(hidden=hidden)
    assert logits.shape == (2, 12, 256)
    assert np.abs(logits - ref["logits"]).max() < 1e-4
    # int32 ids and a plain list work too.
    again = last.forward(hidden=first.forward(tokens=ref["input_ids"].astype(np.int32)))
    assert np.array_equal(again, logits)
    assert first.config["hidden_size"] == 64 and first.config["layers"] == 4
    assert (first.config["start"], first.config["end"], last.config["end"]) == (0, 2, 4)
    assert first.config["vocab_size"] == 256
    stats = last.stats()
    assert stats["forward_calls"] == 2 and stats["positions_processed"] == 48


def test_session_steps_equal_the_full_pass() -> None:
    ref = reference()
    engine = neuroshard.ShardEngine(TINY, 0, 4)
    ids = ref["input_ids"][:1]
    engine.open_session(5)
    engine.forward(tokens=ids[:, :11], session=5)
    step = engine.forward(tokens=ids[:, 11:], session=5, position=11)
    assert step.shape == (1, 1, 256)
    assert np.abs(step[0, 0] - ref["logits"][0, 11]).max() < 1e-4
    assert engine.stats()["sessions_open"] == 1 and engine.stats()["kv_cache_bytes"] > 0
    with pytest.raises(neuroshard.SessionExistsError):
        engine.open_session(5)
    with pytest.raises(neuroshard.PositionGapError):
        engine.forward(tokens=ids[:, :1], session=5, position=40)
    with pytest.raises(neuroshard.SessionTooLongError):
        engine.forward(tokens=ids[:, :2], session=5, position=engine.config["max_positions"] - 1)
    engine.close_session(5)
    with pytest.raises(neuroshard.UnknownSessionError):
        engine.forward(tokens=ids, session=5)
    with pytest.raises(neuroshard.UnknownSessionError):
        engine.close_session(5)


def test_bad_input_raises_typed_errors(tmp_path) -> None:
    with pytest.raises(neuroshard.ModelFileError):
        neuroshard.ShardEngine(str(tmp_path / "missing.gguf"), 0, 1)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises((neuroshard.UnknownFormatError, neuroshard.CorruptModelError)):
        neuroshard.ShardEngine(str(junk), 0, 1)
    with pytest.raises(neuroshard.SliceOutOfRangeError):
        neuroshard.ShardEngine(TINY, 3, 9)
    with pytest.raises(ValueError):
        neuroshard.ShardEngine(TINY, 0, 1, mode="turbo")
    first = neuroshard.ShardEngine(TINY, 0, 2)
    last = neuroshard.ShardEngine(TINY, 2, 4)
    with pytest.raises(neuroshard.TokenOutOfRangeError):
        first.forward(tokens=np.array([[300]]))
    with pytest.raises(neuroshard.HiddenSizeError):
        last.forward(hidden=np.zeros((1, 3, 65), dtype=np.float32))
    with pytest.raises(neuroshard.BadInputError):
        first.forward(hidden=np.zeros((1, 3, 64), dtype=np.float32))
    with pytest.raises(neuroshard.BadInputError):
        first.forward(tokens=np.array([1, 2, 3]))
    with pytest.raises(neuroshard.BadInputError):
        first.forward()
    with pytest.raises(neuroshard.BadInputError):
        first.forward(tokens=np.array([[-1]]))
    with pytest.raises(neuroshard.TokenizerError):
        neuroshard.Tokenizer.from_file(str(tmp_path / "nothing.json"))


def test_every_error_kind_has_its_own_class() -> None:
    classes = dict(neuroshard._native._error_classes())
    assert len(classes) == len(set(classes.values())) >= 26
    for kind, name in classes.items():
        cls = getattr(neuroshard, name)
        assert issubclass(cls, neuroshard.NeuroShardError) and cls is not neuroshard.NeuroShardError
        with pytest.raises(cls) as info:
            neuroshard._native._raise_error(kind)
        assert type(info.value) is cls and str(info.value)


def test_loading_leaves_the_environment_and_threads_unchanged() -> None:
    script = f"""
import os, neuroshard
def threads():
    return len(os.listdir('/proc/self/task'))
env, before = dict(os.environ), threads()
engine = neuroshard.ShardEngine({TINY!r}, 0, 4)
tok = neuroshard.Tokenizer.from_file({neuroshard.fetch_model()!r})
assert dict(os.environ) == env, 'environment changed'
assert threads() == before, f'threads {{before}} -> {{threads()}}'
print('unchanged', before, neuroshard.THREADS)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("unchanged")


def test_tokenizer_round_trip_and_chat_template(smollm2_reference: dict) -> None:
    tok = neuroshard.Tokenizer.from_file(neuroshard.fetch_model())
    ids = tok.encode(smollm2_reference["prompt"])
    assert ids == smollm2_reference["input_ids"]
    assert tok.decode(ids) == smollm2_reference["prompt"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "Hi" in text and text != "Hi"
    assert tok.eos_token_ids and tok.vocab_size > 1000
    assert os.environ.get("RAYON_NUM_THREADS") == str(neuroshard.THREADS)


def test_a_lora_adapter_trains_saves_and_loads(tmp_path) -> None:
    ref = reference()
    ids = ref["input_ids"][:1]
    engine = neuroshard.ShardEngine(TINY, 0, 4)
    base = engine.forward(tokens=ids)
    engine.create_adapter("notes", rank=4, targets=["q_proj", "v_proj", "down_proj"])
    assert engine.adapters() == ["notes"]
    # A fresh adapter changes nothing.
    assert np.array_equal(engine.forward(tokens=ids, adapter="notes"), base)
    losses = [engine.train_adapter("notes", ids, lr=1e-2) for _ in range(5)]
    assert losses[-1] < 0.9 * losses[0], losses
    version = engine.adapter_version("notes")
    assert version["steps"] == 5 and len(version["state"]) == 64
    # The base weights are untouched; the adapter's outputs moved.
    assert np.array_equal(engine.forward(tokens=ids), base)
    tuned = engine.forward(tokens=ids, adapter="notes")
    assert not np.array_equal(tuned, base)
    engine.save_adapter("notes", tmp_path)
    restored = neuroshard.ShardEngine(TINY, 0, 4)
    restored.load_adapter("notes", tmp_path)
    assert restored.adapter_version("notes") == version
    assert np.array_equal(restored.forward(tokens=ids, adapter="notes"), tuned)
    with pytest.raises(neuroshard.BadInputError):
        engine.forward(tokens=ids, adapter="missing")
    with pytest.raises(neuroshard.TrainingError):
        neuroshard.ShardEngine(TINY, 0, 2).train_adapter("x", ids)
