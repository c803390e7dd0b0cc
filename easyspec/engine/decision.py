"""Rank 0's decision after each base step, and the broadcast that makes it every rank's.

Rank 0 alone samples and verifies. What it decides (the committed tokens, how many
of them are accepted draft tokens, why the request ends, and for trees the accepted
nodes) is the only verification result the other ranks see, so they stay in step
and stop together. A step of rank 0's that raises ends the request with the reason
"error" on every rank (the worker then raises RequestFailed on rank 0): the other
ranks are never left waiting in a collective, and the engine takes the next request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from easyspec.engine.stop import StopText
from easyspec.options import SamplingParams
from easyspec.parallel import comm
from easyspec.parallel.state import ParallelState

FINISH_REASONS = (None, "stop", "length", "cancelled", "error")


class RequestFailed(Exception):
    """A step only rank 0 takes raised; every rank stopped the request at the next decision,
    so the ranks are still in step and the engine can take the next request."""


@dataclass
class Decision:
    tokens: list[int]
    accepted: int  # committed draft tokens (the tokens are these, then the bonus or recovered one)
    reason: str | None  # one of FINISH_REASONS; None: the request goes on
    nodes: tuple[int, ...] = ()  # trees: the accepted nodes, root side first
    stop_reason: str | int | None = None  # rank 0: the stop string or stop token that ended it (Chunk.stop_reason)

    @property
    def finished(self) -> bool:
        return self.reason is not None


def settle(candidates: list[int], accepted: int, nodes: tuple[int, ...], params: SamplingParams, generated: int,
           eos: set[int], text: StopText | None, cancelled: bool) -> Decision:
    """Rank 0: the candidates (accepted draft tokens, then the bonus or recovered one) that are committed
    after EOS / stop tokens / length / stop strings / cancellation, `generated` tokens into the request.
    (min_tokens needs no check here: the tokens that would end the request earlier have probability 0.)"""
    tokens, reason, stop_reason = [], None, None
    budget = params.max_new_tokens - generated
    for token in candidates:
        tokens.append(token)
        if token in eos and not params.ignore_eos:
            reason = "stop"
            break
        if token in params.stop_token_ids:
            reason, stop_reason = "stop", token
            break
        if len(tokens) >= budget:
            reason = "length"
            break
    # The EOS or stop token that ends the request is committed, but its text is not shown (as in vLLM).
    shown = tokens[:-1] if reason == "stop" else tokens
    # Checked even after EOS or length: a stop string completed before them ends it first.
    stop_at = text.push(shown, generated) if text is not None else None
    if stop_at is not None:
        tokens, reason, stop_reason = tokens[:stop_at], "stop", text.watcher.matched
    if reason is None and cancelled:
        reason = "cancelled"
    # Accepted draft tokens cut off by the end of the request were never committed: not counted (vLLM's
    # num_accepted_tokens).
    accepted = min(accepted, len(tokens))
    return Decision(tokens, accepted, reason, nodes[:accepted], stop_reason)


def share(decisions: list[Decision] | None, count: int, state: ParallelState, max_num_draft: int,
          tree: bool) -> list[Decision]:
    """Rank 0's `count` decisions (None on the other ranks) on every rank, in one broadcast of a
    [count, 3 + 2 * max_num_draft + 1] box, a row [tokens, accepted, reason, nodes padded to
    max_num_draft, tokens] per decision; a tree's decision has one accepted node per accepted token."""
    if not state.distributed:
        return decisions
    width = 3 + 2 * max_num_draft + 1
    box = torch.zeros(count, width, dtype=torch.long)  # [count, width]
    if state.is_driver:
        for row, d in zip(box, decisions, strict=True):
            padding = [0] * (max_num_draft - len(d.nodes))
            message = [len(d.tokens), d.accepted, FINISH_REASONS.index(d.reason), *d.nodes, *padding, *d.tokens]
            row[: len(message)] = torch.tensor(message)
    rows = comm.broadcast(box.to(state.device), 0, state.group).tolist()
    if state.is_driver:
        return decisions
    shared = []
    for message in rows:
        size, accepted, reason = message[:3]
        nodes = tuple(message[3 : 3 + accepted]) if tree else ()
        tokens = message[3 + max_num_draft : 3 + max_num_draft + size]
        shared.append(Decision(tokens, accepted, FINISH_REASONS[reason], nodes))
    return shared


def seed_box(seed: int | None) -> Tensor:
    """Rank 0: [seed, 1] as int64, the seed drawn when not given; raises for a seed int64 cannot hold."""
    return torch.tensor([int.from_bytes(os.urandom(6), "little") if seed is None else seed, 1], dtype=torch.long)
