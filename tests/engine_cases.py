"""Prompts and a generate-all helper shared by the engine-level tests."""

from __future__ import annotations

from easyspec import Engine, SamplingParams

PROMPTS = [[1, 2, 3], [5, 9, 4, 4, 7, 1, 2], [100, 3, 27, 27, 27, 8]]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    """(generated ids, the last chunk)."""
    ids, chunk = [], None
    for chunk in engine.generate(prompt, params):
        ids += chunk.token_ids
    return ids, chunk
