"""The sampling fields vLLM users send, end to end on tiny models: penalties and min_tokens keep
speculative greedy equal to plain greedy and to an independent reference (transformers' model and
processors), on every drafting method, one process and two; stop_token_ids end a request with
vLLM's stop_reason; log-probabilities are the base's processed distribution at every committed
token, accepted drafts and bonus tokens alike."""

from __future__ import annotations

import json
import shutil
from functools import cache

import pytest
import torch
from engine_cases import PROMPTS, options, run
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from easyspec import Engine, EngineOptions, SamplingParams

PENALIZED = SamplingParams(max_new_tokens=24, ignore_eos=True, repetition_penalty=1.8, presence_penalty=0.4,
                           frequency_penalty=0.3)
# Penalties below 0 / 1 favour repeats, which prompt lookup (ngram) needs to find drafts at all.
REPEATING = SamplingParams(max_new_tokens=24, ignore_eos=True, repetition_penalty=0.7, frequency_penalty=-0.3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: on one thread each op costs microseconds, not a fork and join (several times faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def hf_model(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


@torch.no_grad()
def reference_logprobs(folder, prompt: list[int], output: list[int], params: SamplingParams, ends: list[int]):
    """Log-probabilities [n, V] of each output position as plain decoding sees it, from transformers'
    model and processors (presence and frequency by hand: transformers has none)."""
    model = hf_model(str(folder))
    ids = torch.tensor([prompt + output])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [n, V]: row j predicts output[j]
    rows = []
    for j in range(len(output)):
        before = ids[:, : len(prompt) + j]
        scores = logits[j : j + 1].clone()
        if params.repetition_penalty != 1:
            scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(before, scores)
        counts = torch.bincount(torch.tensor(output[:j], dtype=torch.long), minlength=scores.shape[-1]).float()
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        if params.min_tokens:
            scores = MinNewTokensLengthLogitsProcessor(len(prompt), params.min_tokens, ends)(before, scores)
        if not params.greedy:
            scores = TemperatureLogitsWarper(params.temperature)(before, scores)
            if params.top_k:
                scores = TopKLogitsWarper(params.top_k)(before, scores)
        rows.append(scores.log_softmax(dim=-1)[0])
    return torch.stack(rows)


def reference_greedy(folder, prompt: list[int], params: SamplingParams, ends: list[int]) -> list[int]:
    output: list[int] = []
    for _ in range(params.max_new_tokens):
        output.append(int(reference_logprobs(folder, prompt, output + [0], params, ends)[-1].argmax()))
    return output


@pytest.fixture(scope="module")
def reference(pair_dir) -> dict[str, list[list[int]]]:
    with Engine(options(pair_dir)) as engine:
        ids = {name: [run(engine, p, params)[0] for p in PROMPTS]
               for name, params in (("penalized", PENALIZED), ("repeating", REPEATING))}
        plain = [run(engine, p, SamplingParams(max_new_tokens=24, ignore_eos=True))[0] for p in PROMPTS]
    assert ids["penalized"][0] == reference_greedy(pair_dir / "base", PROMPTS[0], PENALIZED, [])
    assert ids["repeating"][1] == reference_greedy(pair_dir / "base", PROMPTS[1], REPEATING, [])
    # The settings changed the output, so the equalities below compare something.
    assert ids["penalized"] != plain and ids["repeating"] != plain
    return ids


SPECULATIVE = [
    dict(method="sd", draft="near"),
    dict(method="sd", draft="far", num_draft=3),
    dict(method="sd", draft="near", num_draft=6, adaptive_draft=True, max_draft=8),
    dict(method="ngram"),
    dict(method="easyspec", draft="deep", layer_parallel=1),
    dict(method="sd", draft="near", tree_width=3, tree_depth=3),
    dict(method="easyspec", draft="deep", devices=2, calibrate="on-mismatch"),
]


@pytest.mark.parametrize("config", SPECULATIVE, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_penalized_speculative_greedy_equals_plain(pair_dir, reference, config):
    drafted = 0
    with Engine(options(pair_dir, **config)) as engine:
        for name, params in (("penalized", PENALIZED), ("repeating", REPEATING)):
            for prompt, expected in zip(PROMPTS, reference[name], strict=True):
                ids, chunk = run(engine, prompt, params)
                assert ids == expected
                drafted += chunk.stats.drafted
    assert drafted > 0


def test_min_tokens_and_stop_token_ids(pair_dir):
    """A stop token ends the request where it comes (stop_reason: its id), and min_tokens holds it,
    and EOS, back until enough tokens are out; speculative output equals plain output."""
    plain = SamplingParams(max_new_tokens=20, ignore_eos=True)
    with Engine(options(pair_dir)) as vanilla, Engine(options(pair_dir, method="sd", draft="near")) as sd:
        free = run(vanilla, PROMPTS[1], plain)[0]
        stop = free[3]
        first = free.index(stop)
        for engine in (vanilla, sd):
            ids, chunk = run(engine, PROMPTS[1], SamplingParams(max_new_tokens=20, ignore_eos=True,
                                                                 stop_token_ids=(stop, 127)))
            assert ids == free[: first + 1] and (chunk.finish_reason, chunk.stop_reason) == ("stop", stop)
        held = SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=(stop,), min_tokens=first + 3)
        expected = reference_greedy(pair_dir / "base", PROMPTS[1], held, [stop])
        expected = expected[: expected.index(stop) + 1] if stop in expected else expected
        for engine in (vanilla, sd):
            ids, chunk = run(engine, PROMPTS[1], held)
            assert ids == expected and stop not in ids[: first + 2] and len(ids) >= first + 3


def test_min_tokens_holds_eos_back(pair_dir, tmp_path):
    """With EOS set to a token greedy decoding soon emits: the request ends there (stop_reason None),
    unless min_tokens holds it back, or ignore_eos is set (then min_tokens leaves EOS alone)."""
    plain = SamplingParams(max_new_tokens=20, ignore_eos=True)
    with Engine(options(pair_dir)) as vanilla:
        free = run(vanilla, PROMPTS[1], plain)[0]
    eos = free[2]
    folder = tmp_path / "base"
    shutil.copytree(pair_dir / "base", folder)
    for name in ("config.json", "generation_config.json"):
        if not (folder / name).exists():
            continue
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = eos
        (folder / name).write_text(json.dumps(config))
    ends = free.index(eos) + 1
    with Engine(EngineOptions(model=str(folder), method="sd", draft=str(pair_dir / "near"))) as sd:
        ids, chunk = run(sd, PROMPTS[1], SamplingParams(max_new_tokens=20))
        assert ids == free[:ends] and (chunk.finish_reason, chunk.stop_reason) == ("stop", None)
        held = SamplingParams(max_new_tokens=20, min_tokens=ends + 2)
        ids, _ = run(sd, PROMPTS[1], held)
        expected = reference_greedy(folder, PROMPTS[1], held, [eos])
        assert ids == expected[: expected.index(eos) + 1 if eos in expected else None] and eos not in ids[: ends + 1]
        assert run(sd, PROMPTS[1], SamplingParams(max_new_tokens=20, min_tokens=4, ignore_eos=True))[0] == free


@pytest.mark.parametrize("config", [dict(method="vanilla"), dict(method="sd", draft="near"),
                                    dict(method="sd", draft="near", tree_width=2, tree_depth=3)],
                         ids=["vanilla", "sd", "tree"])
def test_logprobs_are_the_processed_base_distribution(pair_dir, config):
    """Every committed token's log-probability and top tokens, accepted draft and bonus tokens alike,
    equal transformers' processed distribution at its position (sampling), or the penalized logits'
    at temperature 1 (greedy)."""
    sampled = SamplingParams(temperature=0.9, top_k=40, seed=3, max_new_tokens=16, ignore_eos=True,
                             repetition_penalty=1.3, frequency_penalty=0.2, logprobs=5)
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True, repetition_penalty=1.3, logprobs=3)
    with Engine(options(pair_dir, **config)) as engine:
        for params in (sampled, greedy):
            chunks = list(engine.generate(PROMPTS[2], params))
            ids = [t for c in chunks for t in c.token_ids]
            entries = [e for c in chunks for e in c.logprobs]
            assert [e.token for e in entries] == ids and all(len(c.logprobs) == len(c.token_ids) for c in chunks)
            want = reference_logprobs(pair_dir / "base", PROMPTS[2], ids, params, [])
            got = torch.tensor([e.logprob for e in entries])
            torch.testing.assert_close(got, want.gather(1, torch.tensor(ids)[:, None])[:, 0], atol=1e-3, rtol=0)
            values, tokens = want.topk(params.logprobs, dim=-1)
            for entry, top_values, top_tokens in zip(entries, values, tokens, strict=True):
                assert [t for t, _ in entry.top] == top_tokens.tolist()
                torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), top_values, atol=1e-3, rtol=0)
    if config["method"] != "vanilla":
        assert chunks[-1].stats.accepted > 0  # accepted drafts were among the tokens checked


def test_no_logprobs_unless_asked(pair_dir):
    with Engine(options(pair_dir)) as engine:
        chunks = list(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True)))
        result = engine.generate_many([PROMPTS[0]], SamplingParams(max_new_tokens=4, ignore_eos=True,
                                                                   logprobs=0), progress=False)[0]
    assert all(c.logprobs is None for c in chunks)
    assert len(result.logprobs) == 4 and all(e.top == () for e in result.logprobs)
