"""Inputs and outputs of the verifier."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Proposal", "TreeProposal", "TreeVerdict", "Verdict"]


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


@dataclass(frozen=True, eq=False)
class TreeProposal:
    """A drafted tree for one sequence; easyspec.verify.tree describes its layout.

    Nodes are stored level by level, W per level: node n sits at depth
    1 + n // W. "Tree order" numbers the root (the last committed token) 0 and
    node n as n + 1; parents and the rows of probs use it.
    """

    tokens: Tensor  # long [N], N = W * D
    parents: Tensor  # long [N]: tree-order index of each node's parent, on the level above
    valid: Tensor  # bool [N]: False marks padding, which is never accepted
    width: int  # W
    probs: Tensor | None = None  # float32 [1 + (D - 1) * W, V]: row t is q of tree-order node t; None: greedy
    replacement: bool = False  # children were drawn from q with replacement (else without)
    ancestors: Tensor | None = None  # bool [1 + N, 1 + N] ancestor-or-self, where the drafter built it

    def __post_init__(self) -> None:
        n = self.tokens.shape[0] if self.tokens.dim() == 1 else -1
        if n < 1 or self.width < 1 or n % self.width:
            raise ValueError(f"TreeProposal.tokens must be [W * D] with W={self.width}, got {tuple(self.tokens.shape)}")
        for name in ("parents", "valid"):
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(f"TreeProposal.{name} must be [{n}], got {tuple(getattr(self, name).shape)}")
        rows = 1 + n - self.width
        if self.probs is not None and (self.probs.dim() != 2 or self.probs.shape[0] != rows):
            raise ValueError(f"TreeProposal.probs must be [{rows}, V], got {tuple(self.probs.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def depth(self) -> int:
        return self.tokens.shape[0] // self.width


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


@dataclass(frozen=True)
class TreeVerdict(Verdict):
    """A Verdict on a tree: ``num_drafted`` is its depth (the most a round can
    accept) and ``nodes`` the accepted nodes' indices (0-based, level by level,
    as in TreeProposal.tokens) from the root's child down."""

    nodes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.nodes) != self.accepted:
            raise ValueError(f"TreeVerdict needs accepted = {self.accepted} nodes, got {len(self.nodes)}")
