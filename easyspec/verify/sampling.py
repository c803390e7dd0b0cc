"""Logits processing and token sampling for the settings in ``SamplingParams`` (easyspec.options).

Everything here is pure tensor code that never synchronises with the host, so
it can run inside a captured CUDA graph: the only Python-level branches depend
on ``SamplingParams`` (fixed per request), never on tensor values, and every
intermediate has a shape known ahead of time.

``process_logits`` follows the order used by HF transformers and vLLM:
temperature, then top-k, then top-p, then softmax. The draft model and the
target model must be processed with the same parameters, otherwise rejection
sampling would correct towards the wrong distribution.

Any temperature > 0 samples. The logits are shifted so that the largest is 0
before they are divided by the temperature, which leaves the distribution
unchanged but means no temperature, however small, can overflow to inf and
turn the softmax into NaN: as the temperature goes to 0 the distribution goes
to the argmax (split evenly between exact ties), as the limit says it should.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from easyspec.options import SamplingParams

__all__ = ["greedy", "process_logits", "sample"]


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
    vocab = logits.shape[-1]
    if params.greedy:
        return torch.nn.functional.one_hot(greedy(logits), vocab).to(torch.float32)  # [..., V]

    # Work in float32: half-precision cumulative sums would move the top-p cut. Shifting the
    # largest logit to 0 first keeps a tiny temperature from dividing its way to inf (see above).
    scores = logits.to(torch.float32)  # [..., V]
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / params.temperature  # [..., V], max 0

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

    return scores.softmax(dim=-1)  # [..., V]


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
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / noise).argmax(dim=-1)
