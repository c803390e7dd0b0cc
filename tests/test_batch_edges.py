"""Edges of batched decoding (issue 22) that the main batch tests do not reach: a tree near the end
of a row whose context is not a multiple of the KV bucket, and the engine's bookkeeping when
generate() iterators and step() callers share it."""

from __future__ import annotations

import pytest
from conftest import SPREAD
from engine_cases import options, run
from hf_models import make_hf_checkpoint

from easyspec import Engine, SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    """base/ and near/ (base plus noise) reaching 512 positions: room for a context past one KV bucket."""
    import torch

    root = tmp_path_factory.mktemp("long-pair")
    base = make_hf_checkpoint("llama3", root / "base", seed=0, num_hidden_layers=2, max_position_embeddings=512,
                              **SPREAD)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(root / "near", safe_serialization=True)
    return root


def test_tree_near_the_end_of_a_later_row(long_pair):
    """--max-context 300: a tree past slot 256 has a row-local mask 512 wide (rounded up to the KV
    bucket), which runs past the cache for the last row. The request in row 1 still gets, token for
    token, what it gets alone in row 0."""
    long_prompt = [(7 * i) % 120 + 1 for i in range(250)]
    with Engine(options(long_pair, method="sd", draft="near", tree_width=2, tree_depth=3, draft_token_budget=64,
                        max_num_seqs=2, max_context=300)) as engine:
        alone = run(engine, long_prompt, GREEDY)[0]
        results = engine.generate_many([[1, 2, 3], long_prompt], GREEDY, progress=False)
    assert results[1].token_ids == alone
    assert results[1].stats.rounds > 0 and results[1].stats.drafted > 0  # it went through tree rounds
