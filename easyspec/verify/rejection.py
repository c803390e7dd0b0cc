"""Verification of draft tokens against the target (base) model.

The drafter proposes k tokens x_1..x_k. One forward pass of the target model
over them yields k + 1 distributions: p_1..p_k at the positions that predict
x_1..x_k, and p_{k+1} at the position after the last draft token. The
verifier turns these into committed tokens, using three terms throughout the
package:

* accepted tokens: the leading draft tokens the verifier keeps (0..k of them);
* recovered token: the replacement for the first rejected draft token. Under
  stochastic decoding it is sampled from the residual norm(max(p_i - q_i, 0));
  under greedy decoding it is the target's argmax at that position;
* bonus token: the token appended when all k drafts were accepted, taken from
  p_{k+1} (sampled, or its argmax under greedy decoding).

Each call therefore commits accepted + 1 tokens: the accepted drafts plus
exactly one recovered or bonus token.

Greedy and stochastic decoding are verified by separate functions. Greedy
verification compares argmaxes and needs no randomness. Stochastic
verification is standard speculative sampling (accept x_i with probability
min(1, p_i(x_i) / q_i(x_i)), else resample from the residual), which makes
every committed token distributed exactly as if it had been sampled from the
target alone, whatever the draft distribution q is, as long as the drafts were
really sampled from q.

Both functions keep all work on the tensors' device and read results back with
a single host transfer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.verify.sampling import greedy, sample
from easyspec.verify.types import Proposal, Verdict

__all__ = ["verify_greedy", "verify_stochastic"]


def check_target(proposal: Proposal, target: Tensor, name: str) -> None:
    """target: one row per draft token (chain or tree) plus one, over the draft's vocabulary."""
    k = proposal.num_tokens
    if target.dim() != 2 or target.shape[0] != k + 1:
        raise ValueError(f"{name} must be [k + 1, V] with k={k} draft tokens, got shape {tuple(target.shape)}")
    if proposal.probs is not None and proposal.probs.shape[-1] != target.shape[-1]:
        raise ValueError(f"draft vocab {proposal.probs.shape[-1]} != target vocab {target.shape[-1]} in {name}")


def _count_accepted(accept: Tensor) -> Tensor:
    """Length of the leading run of True in accept [k], as a long scalar on device."""
    # cumprod zeroes everything from the first rejection on; works for k == 0.
    return accept.to(torch.long).cumprod(dim=0).sum()


def _commit(draft: Tensor, final: Tensor, num_accepted: Tensor, k: int) -> Verdict:
    """Read back the outcome with one host transfer and build the Verdict."""
    packed = torch.cat([draft, final, num_accepted.view(1)]).tolist()  # [k + 2]
    accepted = packed[k + 1]
    return Verdict(accepted=accepted, tokens=packed[:accepted] + [packed[k]], num_drafted=k)


def verify_greedy(proposal: Proposal, target_logits: Tensor) -> Verdict:
    """Keep drafts while they equal the target's argmax.

    target_logits [k + 1, V] (logits or probabilities; only the argmax is
    used). With an empty draft this reduces to plain greedy decoding.
    """
    check_target(proposal, target_logits, "target_logits")
    k = proposal.num_tokens
    device = target_logits.device
    draft = proposal.tokens.to(device=device, dtype=torch.long)  # [k]
    best = greedy(target_logits)  # [k + 1]
    num_accepted = _count_accepted(best[:k] == draft)  # []
    # Accepted drafts equal the argmax, so the committed tokens are exactly
    # best[:accepted + 1]; the last one is the recovered or bonus token.
    final = best.index_select(0, num_accepted.view(1))  # [1]
    return _commit(draft, final, num_accepted, k)


def _draft_probs_padded(proposal: Proposal, draft: Tensor, p: Tensor) -> Tensor:
    """The draft distributions q as float32 [k + 1, V] on p's device.

    A point-mass proposal becomes one-hot rows, so both kinds of drafter share
    one code path. The extra last row is zero: there is no draft token at the
    bonus position, which makes the residual there p_{k+1} itself.
    """
    k = draft.shape[0]
    q = torch.zeros_like(p)  # [k + 1, V]
    if proposal.probs is None:
        q[:k].scatter_(1, draft.view(k, 1), 1.0)
    else:
        q[:k].copy_(proposal.probs)
    return q


def verify_stochastic(proposal: Proposal, target_probs: Tensor, generator: torch.Generator | None) -> Verdict:
    """Speculative sampling: lossless with respect to target_probs.

    target_probs [k + 1, V] must come from ``process_logits`` with the same
    SamplingParams as proposal.probs. Every call draws k uniforms and then V
    exponentials from ``generator`` (which must live on target_probs' device),
    whatever the outcome, so the generator advances in a fixed pattern.
    """
    check_target(proposal, target_probs, "target_probs")
    k = proposal.num_tokens
    device = target_probs.device
    p = target_probs.to(torch.float32)  # [k + 1, V]
    draft = proposal.tokens.to(device=device, dtype=torch.long)  # [k]
    q = _draft_probs_padded(proposal, draft, p)  # [k + 1, V]

    index = draft.view(k, 1)
    # Division keeps p >= q a certain accept (ratio >= 1 > u). q(x) == 0 gives
    # inf (accept) or, if p(x) is also 0, NaN (reject).
    ratio = (p[:k].gather(1, index) / q[:k].gather(1, index)).view(k)  # [k]
    uniform = torch.rand(k, generator=generator, device=device)  # [k]
    num_accepted = _count_accepted(uniform < ratio)  # []

    # Final token: recovered from the residual at the first rejection, or the
    # bonus from p_{k+1} (whose padded q row is zero) when all were accepted.
    row = num_accepted.view(1)
    p_row = p.index_select(0, row)  # [1, V]
    residual = (p_row - q.index_select(0, row)).clamp_min(0)  # [1, V]
    # An all-zero residual means p <= q everywhere, i.e. p == q up to rounding,
    # where a rejection is a rounding artefact; sampling p keeps it lossless.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_row)
    final = sample(residual, generator)  # [1]
    return _commit(draft, final, num_accepted, k)
