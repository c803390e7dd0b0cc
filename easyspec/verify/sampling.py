"""Logits processing and token sampling for the settings in ``SamplingParams`` (easyspec.options).

Everything here is pure tensor code that never synchronises with the host, so
it can run inside a captured CUDA graph: the only Python-level branches depend
on ``SamplingParams`` (fixed per request), never on tensor values, and every
intermediate has a shape known ahead of time.

``process_logits`` follows the order used by HF transformers and vLLM:
temperature, then top-k, then top-p, then min-p, then softmax (the settings
that depend on the tokens so far, penalties and min_tokens, come before, in
easyspec.verify.penalties). The draft model and the target model must be
processed with the same parameters, otherwise rejection sampling would correct
towards the wrong distribution.

min-p keeps a token when its probability is at least min_p times the most
likely token's. Top-k and top-p never drop the most likely token, which after
the shift below scores 0, so the test is score >= log(min_p) on the scores
themselves: no softmax, no sort.

Any temperature > 0 samples. The logits are shifted so that the largest is 0
before they are divided by the temperature, which leaves the distribution
unchanged but means no temperature, however small, can overflow to inf and
turn the softmax into NaN: as the temperature goes to 0 the distribution goes
to the argmax (split evenly between exact ties), as the limit says it should.
Temperatures too small for float32 divide as its smallest normal number, the same limit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from easyspec.options import SamplingParams

__all__ = ["greedy", "process_logits", "process_scores", "sample"]

FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def greedy(logits: Tensor) -> Tensor:
    """Argmax token ids: logits [..., V] -> long [...]."""
    return logits.argmax(dim=-1)


def _top_p_ascending(sorted_scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter on scores sorted ascending [..., n]; dropped entries become -inf.

    As in HF/vLLM, a token is dropped when the mass of it and everything below
    it is <= 1 - top_p, i.e. when the tokens above it already reach top_p, so
    the token that crosses the threshold survives.
    """
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [..., n]
    drop = cumulative <= (1.0 - top_p)  # [..., n]
    # The most likely token always survives, even if rounding says otherwise.
    drop[..., -1] = False
    return sorted_scores.masked_fill(drop, -math.inf)


def process_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Turn raw logits [..., V] into the sampling distribution, float32 [..., V].

    Greedy params give a one-hot of the argmax, so callers can treat greedy and
    stochastic decoding uniformly (sampling a one-hot returns its argmax).
    Each row along the leading dims is processed independently.
    """
    if params.greedy:
        return torch.nn.functional.one_hot(greedy(logits), logits.shape[-1]).to(torch.float32)  # [..., V]
    return process_scores(logits, params).softmax(dim=-1)  # [..., V]


def process_scores(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distribution's log-scores, float32 [..., V]: its softmax is process_logits'
    (its log_softmax the log-probabilities); -inf marks dropped tokens. Sampling params only."""
    vocab = logits.shape[-1]
    # Work in float32: half-precision cumulative sums would move the top-p cut. Shifting the
    # largest logit to 0 first keeps a tiny temperature from dividing its way to inf (see above).
    scores = logits.to(torch.float32)  # [..., V]
    # A temperature below float32's smallest normal number would round to 0 (0 / 0 = NaN) or be flushed
    # to 0 on GPUs; dividing by that number instead gives the same limit, the argmax.
    temperature = max(params.temperature, FLOAT32_TINY)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature  # [..., V], max 0

    # Both filters work on a candidate list sorted ascending, then scatter the
    # survivors into a -inf canvas. Scattering the top-k indices (rather than
    # thresholding at the k-th value) keeps exactly k tokens even with ties.
    candidates: Tensor | None = None
    if 0 < params.top_k < vocab:
        # top-p only ever sees the k survivors, so it sorts k values, not V.
        values, indices = torch.topk(scores, params.top_k, dim=-1)  # [..., top_k], descending
        candidates, candidate_idx = values.flip(-1), indices.flip(-1)
    elif params.top_p < 1:
        candidates, candidate_idx = torch.sort(scores, dim=-1)  # [..., V]
    if candidates is not None:
        if params.top_p < 1:
            candidates = _top_p_ascending(candidates, params.top_p)
        scores = torch.full_like(scores, -math.inf).scatter(-1, candidate_idx, candidates)
    if params.min_p > 0:
        scores = scores.masked_fill(scores < math.log(params.min_p), -math.inf)  # the best scores 0: kept
    return scores  # [..., V]


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on `device` for a 64-bit `seed`. A CPU generator keeps only a seed's low 32 bits
    (seeds 1 and 2**32 + 1, or -1 and 2**63 - 1, gave the same tokens), so there the seed is first
    mixed (splitmix64's finaliser) so that every bit counts; CUDA generators take all 64 bits as is."""
    generator = torch.Generator(device)
    if generator.device.type == "cpu":
        mixed = seed & 0xFFFF_FFFF_FFFF_FFFF
        mixed = ((mixed ^ (mixed >> 30)) * 0xBF58_476D_1CE4_E5B9) & 0xFFFF_FFFF_FFFF_FFFF
        mixed = ((mixed ^ (mixed >> 27)) * 0x94D0_49BB_1331_11EB) & 0xFFFF_FFFF_FFFF_FFFF
        seed = (mixed ^ (mixed >> 31)) & 0xFFFF_FFFF
    return generator.manual_seed(seed)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row: probs [..., V] -> long [...].

    Uses the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with
    probability p_i / sum(p). Unlike ``torch.multinomial`` it needs no
    normalisation, handles any number of leading dims, draws a fixed number of
    random values (so the generator advances deterministically) and is
    graph-capturable.
    """
    probs = probs.to(torch.float32)
    noise = torch.empty_like(probs).exponential_(generator=generator)  # [..., V]
    # An exact zero draw would give 0/0 = NaN for zero-probability tokens, and
    # argmax treats NaN as the maximum; clamping keeps those tokens at 0.
    noise.clamp_min_(FLOAT32_TINY)
    return (probs / noise).argmax(dim=-1)
