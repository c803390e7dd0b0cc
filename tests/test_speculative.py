"""Speculative greedy output is token-identical to plain greedy decoding (float32).

Covered: a draft equal to the base (all accepted), a noisy copy (mostly accepted),
an unrelated draft (mostly rejected), n-gram lookup, EasySpec with every
calibration and parallel policy, on one process and on two over gloo.
"""

from __future__ import annotations

import pytest
from engine_cases import GREEDY, PROMPTS, assert_kv_matches_prefill, options, run

from easyspec import Engine, EngineOptions, SamplingParams


@pytest.fixture(scope="module")
def reference(pair_dir):
    with Engine(EngineOptions(model=str(pair_dir / "base"))) as engine:
        return [run(engine, p)[0] for p in PROMPTS]


ONE_PROCESS = [
    dict(method="sd", draft="base"),
    dict(method="sd", draft="near"),
    dict(method="sd", draft="far", num_draft=3),
    dict(method="sd", draft="near", num_draft=6, adaptive_draft=True, max_draft=8),
    dict(method="ngram"),
    dict(method="easyspec", draft="deep", layer_parallel=1),
]


@pytest.mark.parametrize("config", ONE_PROCESS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_one_process_greedy_equals_plain(pair_dir, reference, config):
    with Engine(options(pair_dir, **config)) as engine:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            ids, chunk = run(engine, prompt)
            stats = chunk.stats
            assert ids == expected
            assert stats.rounds > 0 and stats.generated == len(ids)
            assert stats.mean_accepted_length == pytest.approx(1 + stats.accepted / stats.rounds)


def test_acceptance_tracks_draft_quality(pair_dir):
    # 21 = the prefill's token + 4 rounds of 4 draft tokens and a bonus: no round is cut short by
    # max_new_tokens, where draft tokens accepted but not emitted would not count as accepted.
    params = SamplingParams(max_new_tokens=21, ignore_eos=True)
    rates = {}
    for name in ("base", "near", "far"):
        opts = EngineOptions(model=str(pair_dir / "base"), draft=str(pair_dir / name), method="sd")
        with Engine(opts) as engine:
            rates[name] = run(engine, PROMPTS[1], params)[1].stats.acceptance_rate
    assert rates["base"] == 1.0
    assert rates["near"] > rates["far"]


TWO_PROCESSES = [
    dict(method="vanilla"),
    dict(method="sd", draft="near", draft_tp=1),
    dict(method="sd", draft="near", draft_tp=2),
    dict(method="ngram"),
    dict(method="easyspec", draft="deep", calibrate="every-round"),
    dict(method="easyspec", draft="deep", calibrate="on-mismatch", parallel_policy="attention+tp-mlp"),
    dict(method="easyspec", draft="deep", calibrate="never", parallel_policy="layer", groups="0,1-2,3-4,5,6-7"),
]


@pytest.mark.parametrize("config", TWO_PROCESSES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_two_processes_greedy_equals_plain(pair_dir, reference, config):
    with Engine(options(pair_dir, devices=2, **config)) as engine:
        for prompt, expected in zip(PROMPTS[:2], reference[:2], strict=True):
            assert run(engine, prompt)[0] == expected


def test_sampling_is_seeded_and_stops(pair_dir):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_new_tokens=16, ignore_eos=True)
    opts = EngineOptions(model=str(pair_dir / "base"), draft=str(pair_dir / "near"), method="sd")
    with Engine(opts) as engine:
        first, last = run(engine, PROMPTS[0], params)
        stats = last.stats
        second, _ = run(engine, PROMPTS[0], params)
    assert first == second and len(first) == 16 and stats.drafted > 0


def test_cancelling_two_processes_keeps_ranks_in_step(pair_dir, reference):
    opts = EngineOptions(model=str(pair_dir / "base"), draft=str(pair_dir / "deep"), method="easyspec", devices=2)
    with Engine(opts) as engine:
        stream = engine.generate(PROMPTS[0], GREEDY)
        next(stream)
        next(stream)
        stream.close()  # cancel mid-request
        assert run(engine, PROMPTS[1])[0] == reference[1]


def test_kv_rollback_equals_fresh_prefill(pair_dir):
    """After rounds with rejections, the KV of every committed position equals a fresh
    prefill of the committed tokens: rejected entries were overwritten, never read."""
    opts = EngineOptions(model=str(pair_dir / "base"), draft=str(pair_dir / "far"), method="sd", num_draft=3)
    with Engine(opts) as engine:
        prompt = PROMPTS[1]
        ids, chunk = run(engine, prompt)
        stats = chunk.stats
        assert stats.accepted < stats.drafted  # some drafts were rejected and rolled back
        fed = prompt + ids[:-1]  # the newest token has not been through either model yet
        worker = engine.worker
        assert_kv_matches_prefill(worker.base, pair_dir / "base", fed, len(fed))
        assert_kv_matches_prefill(worker.drafting.runner, pair_dir / "far", fed, len(fed) - 1)
