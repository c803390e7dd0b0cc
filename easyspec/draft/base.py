"""The drafter interface: what the engine asks of anything that proposes tokens.

The engine calls `start` once per request with the prompt and the first
committed token, then per round `propose(num_draft)` and `observe(verdict)`.
Every rank holds a Drafter (easyspec.draft.setup builds them); on a rank that
does not draft it is the receiving end of the drafting ranks' proposal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from easyspec.runtime.stats import StageTimer
from easyspec.verify.types import Proposal, TreeProposal, Verdict


class Drafter(ABC):
    @abstractmethod
    def start(self, prompt_ids: list[int], first_token: int, timer: StageTimer) -> None:
        """Begin a request: the prompt and the token the base model sampled after it."""

    @abstractmethod
    def propose(self, num_draft: int, timer: StageTimer) -> Proposal | TreeProposal:
        """Up to num_draft draft tokens following everything committed so far (a tree
        drafter returns a tree of its own fixed shape instead)."""

    @abstractmethod
    def observe(self, verdict: Verdict) -> None:
        """The tokens the verifier committed this round."""
