"""Engine behaviour at the edges: tiny temperatures, what `accepted` counts, bad values that reach
the worker, and a failure on rank 0 that must not leave the other ranks stuck."""

from __future__ import annotations

import pytest
from engine_cases import GREEDY, PROMPTS, options, run

from easyspec import Engine, EngineOptions, RequestFailed, SamplingParams
from easyspec.options import OptionsError


@pytest.fixture(scope="module")
def reference(pair_dir):
    with Engine(EngineOptions(model=str(pair_dir / "base"))) as engine:
        return [run(engine, p)[0] for p in PROMPTS]


def _tampered(params: SamplingParams, **values: object) -> SamplingParams:
    """Params holding values that validation would refuse, set behind the frozen dataclass's back:
    how a value that slips past the checks, or a bug on rank 0, reaches the worker."""
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


TINY_T = [
    dict(method="vanilla"),
    dict(method="sd", draft="near"),
    dict(method="sd", draft="near", tree_width=2, tree_depth=3),
    dict(method="easyspec", draft="deep", layer_parallel=1),
]


@pytest.mark.parametrize("config", TINY_T, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_tiny_temperature_equals_greedy(pair_dir, reference, config):
    """1e-40 overflowed logits / T to inf and gave NaN probabilities (token 0 every step); its limit is
    the argmax, so every method must give plain greedy decoding's tokens."""
    params = SamplingParams(temperature=1e-40, seed=1, max_new_tokens=GREEDY.max_new_tokens, ignore_eos=True)
    with Engine(options(pair_dir, **config)) as engine:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            assert run(engine, prompt, params)[0] == expected


def test_accepted_counts_only_committed_draft_tokens(pair_dir):
    """The base drafting for itself accepts all 8 draft tokens, but max_new_tokens 2 commits the
    prefill's token and one draft token: accepted is 1, not 8 (vLLM's num_accepted_tokens)."""
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with Engine(options(pair_dir, method="sd", draft="base", num_draft=8)) as engine:
        ids, chunk = run(engine, PROMPTS[0], params)
        stats = chunk.stats
        assert len(ids) == 2 and (stats.rounds, stats.drafted, stats.accepted) == (1, 8, 1)
        assert stats.mean_accepted_length == 2.0 and stats.acceptance_rate == 1 / 8
        assert stats.accepted_per_position == [1, 0, 0, 0, 0, 0, 0, 0]
        assert stats.accepted_histogram == [0, 1, 0, 0, 0, 0, 0, 0, 0]
        # Uncut rounds count all their accepted tokens: 8 + 8, then 1 in the last round, cut to one token.
        ids, chunk = run(engine, PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
        assert len(ids) == 20 and (chunk.stats.rounds, chunk.stats.accepted) == (3, 17)


def test_prompt_ids_must_be_integers(pair_dir):
    with Engine(EngineOptions(model=str(pair_dir / "base"))) as engine:
        for prompt in ([1, 2.0, 3], [1, True]):
            with pytest.raises(OptionsError, match="prompt token ids must be integers"):
                run(engine, prompt)


@pytest.mark.parametrize("devices", [1, 2])
def test_rank0_failure_fails_the_request_and_the_engine_goes_on(pair_dir, reference, devices):
    """A temperature that is not a number fails in the first sampling step: rank 0 raises RequestFailed,
    every rank stops the request together, and the next request is answered right (before: rank 1
    waited in a collective for good). A seed int64 cannot hold is refused before it is queued."""
    with Engine(options(pair_dir, devices=devices, timeout_s=60)) as engine:
        with pytest.raises(OptionsError, match="does not fit a signed 64-bit integer"):
            run(engine, PROMPTS[0], _tampered(SamplingParams(seed=1), seed=2**70))
        with pytest.raises(RequestFailed):
            run(engine, PROMPTS[0], _tampered(SamplingParams(temperature=1.0), temperature="hot"))
        assert run(engine, PROMPTS[1])[0] == reference[1]
