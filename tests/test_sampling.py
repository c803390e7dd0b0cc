"""Tests for easyspec.verify.sampling: params validation, logits processing, sampling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from distribution_checks import chi2_critical
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from easyspec.options import SamplingError, SamplingParams
from easyspec.verify.sampling import greedy, process_logits, sample, seeded_generator

# (temperature, top_k, top_p) combinations covering each filter alone, both
# together, degenerate values (k >= V, k == 1) and tight/loose nucleus sizes.
SETTINGS = [
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.3, 10, 1.0),
    (1.0, 1, 1.0),
    (1.0, 0, 0.9),
    (2.0, 0, 0.3),
    (0.5, 5, 0.8),
    (0.8, 20, 0.95),
    (1.0, 50, 0.7),
    (1.0, 100, 1.0),
]
VOCAB = 50


def _reference_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Brute-force float64 processing of one row of logits [V].

    Returns (probs [V], ambiguous) where ambiguous flags rows whose nucleus
    cut lands within rounding distance of top_p, where float32 may differ.
    """
    scores = row.double() / temperature
    order = torch.argsort(scores, descending=True).tolist()
    kept = order[:top_k] if 0 < top_k < len(order) else order
    ambiguous = False
    if top_p < 1:
        mass = torch.softmax(scores[kept], dim=0).tolist()  # aligned with kept, descending
        cumulative = 0.0
        nucleus = []
        for token, p in zip(kept, mass, strict=True):
            nucleus.append(token)
            cumulative += p
            ambiguous |= abs(cumulative - top_p) < 1e-5
            if cumulative >= top_p:
                break
        kept = nucleus
    probs = torch.zeros_like(scores)
    probs[kept] = torch.softmax(scores[kept], dim=0)
    return probs, ambiguous


def _random_logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 2.0  # [rows, V]


# ---------------------------------------------------------------- SamplingParams


def test_default_params_are_greedy() -> None:
    params = SamplingParams()
    assert params.greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_stop_fields_take_what_vllm_takes():
    """A vLLM user writes stop="\\n" or stop=["a", "b"] and stop_token_ids=[2]; None means none."""
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[2, 3]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()
    hash(SamplingParams(stop=["a"]))  # still a frozen, hashable value


def test_every_bit_of_a_seed_counts_on_the_cpu():
    """A CPU generator keeps a seed's low 32 bits only: these pairs once gave identical samples."""
    def draws(seed: int) -> list[float]:
        return torch.rand(8, generator=seeded_generator("cpu", seed)).tolist()

    for a, b in ((1, 2**32 + 1), (-1, 2**63 - 1), (0, -(2**63))):
        assert draws(a) != draws(b)
    assert draws(12345) == draws(12345)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0, got -1"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"temperature": "0.5"}, "temperature must be a finite number"),
        ({"top_p": math.inf}, "top_p must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
        ({"top_k": -1}, "top_k must be an int >= 0, got -1"),
        ({"top_k": 2.5}, "top_k must be an int"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"seed": "7"}, "seed must be None or a 64-bit signed integer"),
        ({"seed": 2**63}, r"64-bit signed integer \(-2\*\*63 to 2\*\*63 - 1\), got 9223372036854775808"),
        ({"seed": -(2**63) - 1}, "seed must be None or a 64-bit signed integer"),
        ({"seed": True}, "seed must be None"),
        ({"stop": [b"x"]}, "stop must be a str or a list or tuple of str"),
        ({"stop": {"x"}}, "stop must be a str or a list or tuple of str"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"min_p": math.nan}, "min_p must be a finite number"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
        ({"min_tokens": 5, "max_new_tokens": 4}, r"min_tokens must be an int from 0 to max_new_tokens \(4\), got 5"),
        ({"min_tokens": -1}, "min_tokens must be an int from 0"),
        ({"stop_token_ids": [2.0]}, "stop_token_ids must be a list or tuple of token ids"),
        ({"stop_token_ids": (2, -1)}, "stop_token_ids must be a list or tuple of token ids"),
        ({"skip_special_tokens": 1}, "skip_special_tokens must be True or False"),
        ({"logprobs": 21}, "logprobs must be None or an int from 0 to 20, got 21"),
        ({"logprobs": True}, "logprobs must be None or an int"),
    ],
)
def test_invalid_params_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(SamplingError, match=message) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field in kwargs  # the server names it as the request's field


def test_seed_range_ends_are_accepted() -> None:
    for seed in (-(2**63), 2**63 - 1):
        assert SamplingParams(seed=seed).seed == seed


def test_params_are_frozen() -> None:
    params = SamplingParams(temperature=1.0, stop=("\n",), seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 2.0  # type: ignore[misc]


# ---------------------------------------------------------------- process_logits


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_only_is_scaled_softmax(temperature: float) -> None:
    logits = _random_logits(8, seed=0)
    probs = process_logits(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1))


@pytest.mark.parametrize("temperature", [1e-320, 1e-46, 1e-40, 1e-30, 1e-7])
def test_tiny_temperature_is_the_argmax_not_nan(temperature: float) -> None:
    """Dividing raw logits by 1e-40 overflows to inf and the softmax to NaN; the limit is the argmax.
    1e-46 and 1e-320 are positive (they sample) but round to 0 in float32, where 0 / 0 is NaN."""
    logits = _random_logits(8, seed=4) * 30
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.9), (5, 0.9)):
        probs = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        assert torch.isfinite(probs).all()
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())
        assert torch.equal(sample(probs, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_tiny_temperature_splits_exact_ties_evenly() -> None:
    logits = torch.tensor([[3.0, 7.0, 7.0, -2.0]])
    probs = process_logits(logits, SamplingParams(temperature=1e-40))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))


@pytest.mark.parametrize("top_k", [1, 3, 17])
def test_top_k_keeps_exactly_k(top_k: int) -> None:
    logits = _random_logits(16, seed=1)
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=top_k))
    assert ((probs > 0).sum(dim=-1) == top_k).all()
    expected_support = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, logits.topk(top_k, dim=-1).indices, True)
    assert torch.equal(probs > 0, expected_support)


def test_top_k_ties_still_keep_exactly_k() -> None:
    logits = torch.zeros(3, 10)  # every token tied
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=4))
    assert ((probs > 0).sum(dim=-1) == 4).all()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    torch.testing.assert_close(probs[probs > 0], torch.full((12,), 0.25))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.45, [1.0, 0.0, 0.0]),  # first token alone reaches 0.45
        (0.6, [0.625, 0.375, 0.0]),  # 0.5 < 0.6: the crossing token (0.3) is kept
        (0.85, [0.5, 0.3, 0.2]),
    ],
)
def test_top_p_keeps_crossing_token(top_p: float, expected: list[float]) -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    torch.testing.assert_close(probs, torch.tensor(expected))


def test_tiny_top_p_keeps_argmax() -> None:
    logits = _random_logits(6, seed=2)
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
    torch.testing.assert_close(probs, one_hot)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_matches_brute_force_reference(temperature: float, top_k: int, top_p: float) -> None:
    logits = _random_logits(64, seed=3)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = process_logits(logits, params)
    checked = 0
    for row, got in zip(logits, probs, strict=True):
        want, ambiguous = _reference_probs(row, temperature, top_k, top_p)
        if ambiguous:
            continue
        checked += 1
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    assert checked >= 60


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_matches_transformers_warpers(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    logits = _random_logits(64, seed=4)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)  # unused by these warpers
    scores = logits.clone()
    for warper in warpers:
        scores = warper(input_ids, scores)
    want = torch.softmax(scores, dim=-1)
    got = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_min_p_keeps_tokens_at_least_min_p_of_the_best() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = process_logits(logits, SamplingParams(temperature=1.0, min_p=0.3))  # keeps p >= 0.15
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert torch.equal(process_logits(logits, SamplingParams(temperature=1.0, min_p=1.0)), torch.eye(4)[0])


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=3, top_p=0.5)])
def test_greedy_params_give_one_hot(params: SamplingParams) -> None:
    logits = _random_logits(5, seed=5)
    probs = process_logits(logits, params)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())


def test_rows_are_independent_and_leading_dims_kept() -> None:
    logits = _random_logits(12, seed=6).view(3, 4, VOCAB)  # [3, 4, V]
    params = SamplingParams(temperature=0.9, top_k=7, top_p=0.8)
    batched = process_logits(logits, params)
    assert batched.shape == (3, 4, VOCAB)
    rowwise = torch.stack([process_logits(row, params) for row in logits.view(12, VOCAB)])
    torch.testing.assert_close(batched.view(12, VOCAB), rowwise)
    torch.testing.assert_close(batched.sum(-1), torch.ones(3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_gives_float32(dtype: torch.dtype) -> None:
    logits = _random_logits(4, seed=7).to(dtype)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    probs = process_logits(logits, params)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, process_logits(logits.float(), params))


def test_masked_logits_stay_masked() -> None:
    logits = _random_logits(2, seed=8)
    logits[:, :10] = -math.inf  # e.g. tokens banned upstream
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=20, top_p=0.9))
    assert (probs[:, :10] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


# ---------------------------------------------------------------- sample / greedy


def test_greedy_is_argmax() -> None:
    logits = _random_logits(9, seed=9)
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))


def test_sample_is_deterministic_given_generator_state() -> None:
    probs = torch.softmax(_random_logits(1000, seed=10), dim=-1)  # [1000, V]
    first = sample(probs, torch.Generator().manual_seed(123))
    again = sample(probs, torch.Generator().manual_seed(123))
    other = sample(probs, torch.Generator().manual_seed(124))
    assert first.dtype == torch.long and first.shape == (1000,)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_frequencies_match_probs() -> None:
    g = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.randn(8, generator=g), dim=0)
    probs[3] = 0.0  # a zero-probability token must never be drawn
    probs /= probs.sum()
    trials = 200_000
    tokens = sample(probs.expand(trials, -1), g)  # [trials]
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[3] == 0
    support = probs > 0
    expected = probs[support].double() * trials
    stat = (((counts[support] - expected) ** 2) / expected).sum().item()
    assert stat < chi2_critical(int(support.sum()) - 1), stat


def test_sample_one_hot_returns_its_index() -> None:
    probs = torch.nn.functional.one_hot(torch.tensor([[4, 0], [9, 2]]), 10).float()  # [2, 2, 10]
    assert torch.equal(sample(probs, None), torch.tensor([[4, 0], [9, 2]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_process_and_sample_capture_in_cuda_graph() -> None:
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    static_logits = _random_logits(256, seed=12).cuda()  # [256, V]
    # CUDA graphs need a warm-up on a side stream before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample(process_logits(static_logits, params), None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_probs = process_logits(static_logits, params)
        static_tokens = sample(static_probs, None)

    fresh = _random_logits(256, seed=13).cuda()
    static_logits.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_probs, process_logits(fresh, params))
    assert (static_probs.gather(1, static_tokens[:, None]) > 0).all()
    first = static_tokens.clone()
    graph.replay()  # the RNG offset advances on every replay
    assert not torch.equal(first, static_tokens)
