"""Mistral's sliding window: past the window, outputs equal transformers' (the mask limits every
query to the last `sliding_window` positions on every path: full forwards, prefill pieces, decode,
chain verification and drafting, trees)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import run
from hf_models import make_hf_checkpoint

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.model.checkpoint import load_model
from easyspec.model.config import ConfigError, ModelConfig
from easyspec.options import OptionsError

WINDOW = 8
SPREAD = dict(initializer_range=0.3)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny Mistral with an 8-token window (base), a noisy copy as its draft, and the HF model."""
    root = tmp_path_factory.mktemp("mistral")
    hf = make_hf_checkpoint("mistral", root / "base", seed=5, sliding_window=WINDOW, **SPREAD)
    make_hf_checkpoint("mistral", root / "draft", seed=5, sliding_window=WINDOW, num_hidden_layers=2, **SPREAD)
    return root, hf


def test_config_reads_the_window(mistral):
    root, _ = mistral
    assert load_model(root / "base").config.sliding_window == WINDOW
    with pytest.raises(ConfigError, match="use_sliding_window=true"):
        ModelConfig.from_hf({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True})


def test_forward_matches_transformers_past_the_window(mistral):
    root, hf = mistral
    ours = load_model(root / "base")
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
        full = ours(tokens[0], torch.arange(40))
        cache = ours.allocate_cache(64)
        parts = [ours(tokens[0, :13], torch.arange(13), cache, kv_len=64)]
        for i in range(13, 40):
            parts.append(ours(tokens[0, i : i + 1], torch.tensor([i]), cache, kv_len=64))
    torch.testing.assert_close(full, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(parts), ref, atol=1e-4, rtol=1e-5)
    # Without the window the logits past it differ: the test compares something real.
    ours.config = ours.config.replace(sliding_window=None)
    with torch.no_grad():
        assert not torch.allclose(ours(tokens[0], torch.arange(40))[WINDOW:], ref[WINDOW:], atol=1e-3)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_generation_matches_transformers_on_every_path(mistral, device):
    """On CUDA the fused kernels (decode attention reading the windowed mask) and CUDA graphs run."""
    root, hf = mistral
    prompt = [3, 17, 5, 99, 42, 8, 1, 64, 23, 77, 12, 9, 30, 2, 50, 6, 71, 11, 4, 88]  # longer than the window
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    for config in ({}, {"method": "sd", "draft": "draft"}, {"method": "sd", "draft": "draft", "tree_width": 2,
                                                            "tree_depth": 3}):
        if "draft" in config:
            config = {**config, "draft": str(root / config["draft"])}
        with Engine(EngineOptions(model=str(root / "base"), device=device, dtype="float32", **config)) as engine:
            assert run(engine, prompt, params)[0] == expected, config


def test_tree_deeper_than_the_window_is_refused(mistral):
    root, _ = mistral
    with pytest.raises(OptionsError, match="sliding_window \\(8\\) must be longer than the tree is deep"):
        Engine(EngineOptions(model=str(root / "base"), draft=str(root / "draft"), method="sd", tree_width=2,
                             tree_depth=8))
