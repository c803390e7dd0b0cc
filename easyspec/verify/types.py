"""Inputs and outputs of the verifier."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Proposal", "Verdict"]


# eq=False: comparing tensors field-wise has no single boolean answer.
@dataclass(frozen=True, eq=False)
class Proposal:
    """Draft tokens for one sequence, with the distribution they were drawn from.

    ``probs`` is the draft distribution q after ``process_logits`` with the
    request's SamplingParams. ``None`` means q is a point mass on each drafted
    token: greedy drafters and model-free drafters (n-gram lookup) use it.
    """

    tokens: Tensor  # long [k]
    probs: Tensor | None = None  # float32 [k, V]

    def __post_init__(self) -> None:
        # Shape checks only read metadata, so they never sync with the device.
        if self.tokens.dim() != 1:
            raise ValueError(f"Proposal.tokens must be 1-D [k], got shape {tuple(self.tokens.shape)}")
        if self.probs is not None and (self.probs.dim() != 2 or self.probs.shape[0] != self.tokens.shape[0]):
            raise ValueError(
                f"Proposal.probs must be [k, V] with k={self.tokens.shape[0]}, got shape {tuple(self.probs.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one Proposal.

    ``tokens`` holds the ``accepted`` draft tokens followed by exactly one
    token from the target (recovered or bonus), so every verification step
    commits at least one token.
    """

    accepted: int  # draft tokens kept, 0..num_drafted
    tokens: list[int]  # len == accepted + 1
    num_drafted: int  # k

    def __post_init__(self) -> None:
        if not 0 <= self.accepted <= self.num_drafted:
            raise ValueError(f"accepted must be in [0, {self.num_drafted}], got {self.accepted}")
        if len(self.tokens) != self.accepted + 1:
            raise ValueError(f"Verdict needs accepted + 1 = {self.accepted + 1} tokens, got {len(self.tokens)}")

    @property
    def all_accepted(self) -> bool:
        """True when every draft token was kept and the last token is a bonus."""
        return self.accepted == self.num_drafted

    @property
    def num_committed(self) -> int:
        return len(self.tokens)

    @property
    def rejected(self) -> int:
        """Number of draft tokens thrown away (their KV entries must be rolled back)."""
        return self.num_drafted - self.accepted
