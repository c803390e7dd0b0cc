"""The Python API as a vLLM or transformers user calls it: strings as prompts, several open
generators on one Engine (their requests decoded together), and generate_many."""

from __future__ import annotations

import pytest

from easyspec import Engine, EngineOptions, GenerationResult, SamplingParams
from easyspec.options import DEFAULT_MODEL_DIR, OptionsError

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    """The bundled demo base (it has a tokenizer), plain decoding."""
    with Engine(EngineOptions(method="vanilla")) as engine:
        yield engine


def _ids(chunks) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def test_generate_takes_a_string(engine):
    text = "def fibonacci(n):"
    # A string is raw text, encoded with the tokenizer's own special tokens (as vLLM's LLM.generate).
    assert _ids(engine.generate(text, GREEDY)) == _ids(engine.generate(engine.tokenizer.encode(text), GREEDY))
    for bad in ({"prompt": text}, 3):
        with pytest.raises(TypeError, match="a prompt is a str or a list of token ids"):
            engine.generate(bad, GREEDY)
    with pytest.raises(OptionsError, match="prompt token ids must be integers, got 'def'"):
        engine.generate(["def", "f"], GREEDY)


def test_open_generators_share_the_batch(engine):
    expected = _ids(engine.generate([5, 6, 7], GREEDY))
    other = _ids(engine.generate([9, 9, 9], GREEDY))
    first = engine.generate([5, 6, 7], GREEDY)
    head = next(first).token_ids
    second = engine.generate([9, 9, 9], GREEDY)
    # Interleaved, each gets what it gets alone.
    assert next(second).token_ids + _ids(second) == other
    assert head + _ids(first) == expected
    # Closing one early cancels it and leaves the other untouched.
    third = engine.generate([5, 6, 7], GREEDY)
    fourth = engine.generate([9, 9, 9], GREEDY)
    next(third)
    next(fourth)
    third.close()
    assert len(_ids(fourth)) == 11
    assert not engine.has_unfinished()
    assert _ids(engine.generate([5, 6, 7], GREEDY)) == expected


def test_generate_many(engine):
    prompts = ["def add(a, b):", [5, 6, 7], "import os\n"]
    results = engine.generate_many(prompts, GREEDY, progress=False)
    assert [type(r) for r in results] == [GenerationResult] * 3
    for prompt, result in zip(prompts, results, strict=True):
        alone = list(engine.generate(prompt, GREEDY))
        assert result.token_ids == _ids(alone)
        assert result.text == "".join(c.text for c in alone)
        assert result.finish_reason == "length" and result.stats.generated == 12
        assert result.prompt_ids == engine.prompt_ids(prompt)
    # One SamplingParams per prompt; a list of the wrong length is refused before anything runs.
    each = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 5, 7)]
    assert [len(r.token_ids) for r in engine.generate_many(prompts, each, progress=False)] == [3, 5, 7]
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate_many(prompts, each[:2])
    with pytest.raises(TypeError, match="a list of prompts"):
        engine.generate_many("def f():")
    # Without params, the engine's defaults (the demo's generation_config.json sets none: greedy, 128 tokens).
    assert engine.generate_many([[5, 6, 7]], progress=False)[0].token_ids[:12] == results[1].token_ids


def test_progress_lines(caplog):
    """Off a terminal, one line per model loaded and one for a batch of prompts; none with progress off."""
    caplog.set_level("INFO", logger="easyspec")
    for progress in (True, False):
        caplog.clear()
        with Engine(EngineOptions(draft=str(DEFAULT_MODEL_DIR / "draft"), method="sd", progress=progress)) as engine:
            engine.generate_many([[5, 6, 7], "def f("], SamplingParams(max_new_tokens=2))
        lines = [r.getMessage() for r in caplog.records]
        loads = [line for line in lines if line.startswith("loading ")]
        batch = [line for line in lines if line.startswith("prompts: 2 prompts in ")]
        if progress:
            assert [line.split(":")[0] for line in loads] == ["loading base weights", "loading draft weights"]
            assert all(" tensors in " in line for line in loads) and len(batch) == 1
        else:
            assert loads == batch == []
