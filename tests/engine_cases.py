"""Prompts and a generate-all helper shared by the engine-level tests."""

from __future__ import annotations

import torch

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.model.checkpoint import load_model
from easyspec.runtime.runner import ModelRunner

PROMPTS = [[1, 2, 3], [5, 9, 4, 4, 7, 1, 2], [100, 3, 27, 27, 27, 8]]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    """(generated ids, the last chunk)."""
    ids, chunk = [], None
    for chunk in engine.generate(prompt, params):
        ids += chunk.token_ids
    return ids, chunk


def options(pair_dir, **config) -> EngineOptions:
    """Options for the test pair's base; a `draft` is named by its folder in pair_dir."""
    if "draft" in config:
        config["draft"] = str(pair_dir / config["draft"])
    return EngineOptions(model=str(pair_dir / "base"), **config)


def assert_kv_matches_prefill(runner: ModelRunner, folder, fed: list[int], n: int) -> None:
    """The runner's first n cache slots of every layer equal a fresh prefill of `fed`."""
    fresh = load_model(folder)
    cache = fresh.allocate_cache(runner.cache.max_len)
    with torch.no_grad():
        fresh(torch.tensor(fed), torch.arange(len(fed)), cache)
    for layer in range(len(cache.keys)):
        torch.testing.assert_close(runner.cache.keys[layer][:, :n], cache.keys[layer][:, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(runner.cache.values[layer][:, :n], cache.values[layer][:, :n],
                                   atol=1e-4, rtol=1e-4)
