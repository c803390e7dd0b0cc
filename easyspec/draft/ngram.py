"""Prompt-lookup drafting: no model, just the request's own tokens.

If the last n committed tokens (n from `max_ngram` down to `min_ngram`) occurred
earlier, propose the tokens that followed that earlier occurrence (the most
recent one). Its q is a point mass on each token (`Proposal.probs` is None), so
stochastic verification stays exact. Useful on code, edits and summaries, where
outputs copy spans of their input.
"""

from __future__ import annotations

import torch

from easyspec.draft.base import Drafter, ProposeSteps
from easyspec.runtime.stats import StageTimer
from easyspec.verify.types import Proposal, Verdict


class NgramDrafter(Drafter):
    def __init__(self, device: torch.device, min_ngram: int = 1, max_ngram: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.device = device
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []

    def start(self, prompt_ids: list[int], first_token: int, timer: StageTimer, prefilled: bool = False) -> None:
        self.tokens = []
        # n-gram -> (end of its latest occurrence, end of the one before), kept up to
        # date per token so a lookup costs O(max_ngram) however long the context.
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}
        self._extend([*prompt_ids, first_token])

    def _extend(self, new_tokens: list[int]) -> None:
        for token in new_tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                key = tuple(self.tokens[end - n : end])
                latest = self.index.get(key)
                self.index[key] = (end, latest[0] if latest else -1)

    def lookup(self, num_draft: int) -> list[int]:
        seq = self.tokens
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            _, earlier = self.index.get(tuple(seq[-n:]), (0, -1))
            if earlier > 0:
                return seq[earlier : earlier + num_draft]
        return []

    def propose_steps(self, num_draft: int) -> ProposeSteps:
        """The lookup's tokens, with no forward at all (a generator that yields nothing)."""
        yield from ()
        return Proposal(torch.tensor(self.lookup(num_draft), dtype=torch.long, device=self.device))

    def observe(self, verdict: Verdict) -> None:
        self._extend(verdict.tokens)

    def skip(self, tokens: list[int]) -> None:
        self._extend(tokens)
