"""Log-probabilities of committed tokens (SamplingParams.logprobs), read from the distribution the
verifier judged them by: the base model's logits after the history-dependent settings, then
temperature, top-k, top-p and min-p when sampling (so a dropped token's log-probability is -inf),
and the logits after the history-dependent settings alone, at temperature 1, under greedy decoding
(where the processed distribution is the argmax's one-hot), as vLLM reports them.

A chain's committed token j is judged at row j of the verification; a tree's at the root's row,
then at the rows of the accepted nodes (the row after a node is the one that predicts its child).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["JSON_MIN_LOGPROB", "TokenLogprob", "json_logprob", "token_logprobs"]

# JSON has no -inf: a dropped token's log-probability is written as this, as vLLM's server does.
JSON_MIN_LOGPROB = -9999.0


def json_logprob(value: float) -> float:
    return max(value, JSON_MIN_LOGPROB)


@dataclass(frozen=True)
class TokenLogprob:
    """One committed token, its log-probability and the `top` most likely tokens' (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]

    def to_dict(self) -> dict:
        """As `generate --json` prints it: -inf as JSON_MIN_LOGPROB."""
        return {"token_id": self.token, "logprob": json_logprob(self.logprob),
                "top": [{"token_id": token, "logprob": json_logprob(value)} for token, value in self.top]}


def token_logprobs(scores: Tensor, rows: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """scores [R, V]: log-scores (their log_softmax is the distribution; -inf drops a token);
    rows [n]: the row each committed token [n] was judged at; top: how many of the most likely
    tokens to add. One host transfer."""
    device = scores.device
    index = torch.tensor(rows, dtype=torch.long, device=device)
    log_probs = scores.index_select(0, index).to(torch.float32).log_softmax(dim=-1)  # [n, V]
    chosen = log_probs.gather(1, torch.tensor(tokens, dtype=torch.long, device=device)[:, None])  # [n, 1]
    values, ids = log_probs.topk(top, dim=-1)  # [n, top] each
    # Token ids are exact in float64, so one transfer carries everything.
    packed = torch.cat((chosen.double(), values.double(), ids.double()), dim=1).tolist()  # [n, 1 + 2 * top]
    return [TokenLogprob(token, row[0], tuple(zip(map(int, row[1 + top :]), row[1 : 1 + top], strict=True)))
            for token, row in zip(tokens, packed, strict=True)]
