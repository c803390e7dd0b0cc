"""Statistical helpers shared by the verification and sampling tests."""

from __future__ import annotations

import math

import torch


def chi2_critical(df: int, z: float = 4.0) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z=4 is a ~3e-5 false-alarm rate."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi_square(counts: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(statistic, critical value) for observed counts [C] against target probs [C].

    Cells expected to hold fewer than 5 samples are pooled so the chi-square
    approximation holds. Any sample in a zero-probability cell is a failure.
    """
    counts = counts.double()
    expected = target.double() * counts.sum()
    if counts[target == 0].sum() > 0:
        return math.inf, 0.0
    large = expected >= 5
    small = (expected > 0) & ~large
    observed = counts[large]
    wanted = expected[large]
    if small.any():
        observed = torch.cat([observed, counts[small].sum().view(1)])
        wanted = torch.cat([wanted, expected[small].sum().view(1)])
    stat = (((observed - wanted) ** 2) / wanted).sum().item()
    return stat, chi2_critical(observed.numel() - 1)


def logits_with_argmax(argmaxes: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    """Random logits [len(argmaxes), V] whose row-wise argmax is given."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(argmaxes), vocab, generator=g)
    logits[torch.arange(len(argmaxes)), argmaxes] = 10.0
    return logits
