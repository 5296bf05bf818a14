"""The `openai` package (from PyPI) against `neuroshard serve`, unchanged but for `base_url`:
chat and text completions, streaming and not, models, errors mapped to its exception
classes. Greedy `/v1/completions` text for the reference prompt equals the reference."""

from __future__ import annotations

import subprocess
from typing import Iterator

import openai
import pytest

import neuroshard
from conftest import cli_binary


@pytest.fixture(scope="module")
def api(swarm: neuroshard.LocalSwarm) -> Iterator[openai.OpenAI]:
    proc = subprocess.Popen(
        [cli_binary(), "serve", "--peers", swarm.address, "--http", "127.0.0.1:0",
         "--model-name", "smollm2", "--api-key", "sk-test"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_completions_reproduce_the_reference(api: openai.OpenAI, smollm2_reference: dict) -> None:
    want = smollm2_reference["greedy_text"]
    n = len(smollm2_reference["greedy_ids"])
    out = api.completions.create(
        model="smollm2", prompt=smollm2_reference["prompt"], temperature=0, max_tokens=n
    )
    assert out.choices[0].text == want
    assert out.usage is not None and out.usage.completion_tokens == n
    assert out.usage.prompt_tokens == len(smollm2_reference["input_ids"])
    pieces = api.completions.create(
        model="smollm2", prompt=smollm2_reference["prompt"], temperature=0, max_tokens=n,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == want


def test_chat_streaming_equals_non_streaming(api: openai.OpenAI) -> None:
    messages: list = [{"role": "user", "content": "What is the capital of France?"}]
    out = api.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=32
    )
    text = out.choices[0].message.content
    assert text is not None and "Paris" in text
    assert out.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == out.usage.completion_tokens  # type: ignore[union-attr]


def test_models_and_errors(api: openai.OpenAI) -> None:
    assert "smollm2" in [m.id for m in api.models.list()]
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="smollm2", prompt="hello " * 9000, max_tokens=1)
    assert "context" in str(err.value)
    bad_key = openai.OpenAI(base_url=str(api.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
