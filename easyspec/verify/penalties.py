"""The settings whose effect depends on the tokens so far: repetition_penalty,
presence_penalty, frequency_penalty and min_tokens.

They change the base model's logits before temperature, top-k, top-p and min-p
(easyspec.verify.sampling), as in HF transformers and vLLM, and under greedy
decoding too: greedy takes the argmax of the changed logits.
  repetition_penalty r: a logit l of a token in the prompt or the output becomes
      l / r when l > 0, else l * r (transformers' RepetitionPenaltyLogitsProcessor);
  frequency_penalty f, presence_penalty p (OpenAI's definition, over the output only):
      l - f * count - p * (count > 0);
  min_tokens m: until m tokens are out, the tokens that would end the request
      (EOS unless ignore_eos, and stop_token_ids) get -inf.

Each position is judged by its own history. One verification scores k + 1
positions in one forward: position j follows the committed tokens and draft
tokens 1..j, and a tree node follows its ancestors, so row j's counts include
exactly those draft tokens (`precedes`). The target at every position is then
the processed distribution plain decoding would use there, and the draft's q is
processed the same way before it samples, which is what keeps speculative
greedy equal to plain greedy and speculative sampling lossless.

Pure tensor code with shapes fixed by the request, no host synchronisation:
`row_counts` and `apply_history` take leading batch dims, which the
statistical tests use to run many sequences at once.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor

from easyspec.options import SamplingParams

__all__ = ["TokenHistory", "apply_history", "chain_precedes", "row_counts"]

FLOAT32_MAX = torch.finfo(torch.float32).max


def chain_precedes(rows: int, drafted: int, device: torch.device | str | None = None) -> Tensor:
    """bool [rows, drafted]: row j of a chain follows draft tokens 0..j-1."""
    return torch.ones(rows, drafted, dtype=torch.bool, device=device).tril(-1)


def row_counts(counts: Tensor, drafted: Tensor, precedes: Tensor) -> Tensor:
    """Each row's output counts, float32 [..., R, V]: the committed counts [..., V] plus one for
    every drafted token [..., n] that precedes the row (precedes: bool [R, n])."""
    rows, n = precedes.shape
    lead = counts.shape[:-1]
    out = counts.to(torch.float32).unsqueeze(-2).expand(*lead, rows, counts.shape[-1]).clone()  # [..., R, V]
    if n:
        index = drafted.unsqueeze(-2).expand(*lead, rows, n)  # [..., R, n]
        out.scatter_add_(-1, index, precedes.to(torch.float32).expand(*lead, rows, n))
    return out


def apply_history(logits: Tensor, params: SamplingParams, prompt_seen: Tensor | None, counts: Tensor | None,
                  generated: Tensor, end_ids: Tensor) -> Tensor:
    """The logits [..., R, V] after the penalties and min_tokens, float32 [..., R, V].

    prompt_seen: bool [..., V], tokens of the prompt; counts: float32 [..., R, V], each row's output
    counts (row_counts); both may be None when no penalty is set. generated: long [..., R], tokens
    generated before each row's; end_ids: long [E], the tokens min_tokens holds back.
    """
    scores = logits.to(torch.float32)
    if params.repetition_penalty != 1:
        seen = prompt_seen.unsqueeze(-2) | (counts > 0)  # [..., R, V]
        penalty = params.repetition_penalty
        scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
        # A penalty far from 1 (1e-40, 1e38) overflows float32, and inf - inf is NaN once the temperature's
        # shift subtracts the largest score: such logits saturate at float32's largest magnitude instead.
        scores = scores.clamp(-FLOAT32_MAX, FLOAT32_MAX)
    if params.frequency_penalty != 0:
        scores = scores - params.frequency_penalty * counts
    if params.presence_penalty != 0:
        scores = scores - params.presence_penalty * (counts > 0).to(torch.float32)
    if params.min_tokens > 0 and end_ids.numel():
        ends = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device).index_fill_(0, end_ids, True)
        hold = (generated < params.min_tokens).unsqueeze(-1)  # [..., R, 1]
        scores = scores.masked_fill(hold & ends, -math.inf)
    return scores


class TokenHistory:
    """What the history-dependent settings read of one request's committed tokens, on one rank's
    device: the prompt's tokens, how often each token was generated, how many were. Every rank
    that samples or drafts with a model keeps one and commits every decision to it."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device: torch.device,
                 end_ids: Collection[int]) -> None:
        """end_ids: the tokens that end the request (EOS unless ignored, stop_token_ids)."""
        self.params, self.device = params, device
        self.generated = 0
        self.end_ids = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)  # [E]
        self.prompt_seen = self.counts = None
        if params.penalized:
            self.prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # [V]
            self.prompt_seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)  # [V]

    @property
    def active(self) -> bool:
        return self.params.uses_history

    def commit(self, tokens: list[int]) -> None:
        self.generated += len(tokens)
        if self.counts is not None and tokens:
            index = torch.tensor(tokens, dtype=torch.long, device=self.device)
            self.counts.index_add_(0, index, torch.ones(len(tokens), device=self.device))

    def adjust(self, logits: Tensor, drafted: Tensor | None = None, precedes: Tensor | None = None) -> Tensor:
        """logits [R, V] as each row's history changes them: the committed tokens, then the drafted
        tokens [n] that precede it (precedes: bool [R, n]; none when drafted is None). Unchanged
        when the request sets nothing history-dependent."""
        if not self.active:
            return logits
        rows = logits.shape[0]
        if drafted is None:
            drafted = torch.zeros(0, dtype=torch.long, device=self.device)
            precedes = torch.zeros(rows, 0, dtype=torch.bool, device=self.device)
        generated = self.generated + precedes.sum(dim=-1)  # [R]
        counts = row_counts(self.counts, drafted, precedes) if self.counts is not None else None
        return apply_history(logits, self.params, self.prompt_seen, counts, generated, self.end_ids)
