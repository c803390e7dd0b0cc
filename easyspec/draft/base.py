"""The drafter interface: what the engine asks of anything that proposes tokens.

The engine calls `start` once per request with the prompt and the first
committed token, then per round `propose_steps(num_draft)` and `observe(verdict)`
(or `skip(tokens)` after a round that drafted nothing). Drafters exist on the
ranks that draft (easyspec.draft.setup builds them and shares their proposals
with the other ranks).

A round's drafting is a generator, so that the engine can run the draft
forwards of every sequence in a batch together: it yields (mode, Feed) for
each draft forward it needs, receives that feed's logits, and returns the
proposal. `run_proposals` drives a batch of them; `Drafter.propose` drives one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager

from torch import Tensor

from easyspec.runtime.runner import Feed, ModelRunner
from easyspec.runtime.stats import StageTimer
from easyspec.verify.types import Proposal, TreeProposal, Verdict

# A round's drafting: yields (runner mode, Feed), receives that feed's logits [T, V], returns the proposal.
ProposeSteps = Generator[tuple[str, Feed], Tensor, Proposal | TreeProposal]
Stage = Callable[[str], AbstractContextManager[None]]


class Drafter(ABC):
    runner: ModelRunner | None = None  # the draft model's runner; None for drafters without a model

    @abstractmethod
    def start(self, prompt_ids: list[int], first_token: int, timer: StageTimer, prefilled: bool = False) -> None:
        """Begin a request: the prompt and the token the base model sampled after it. `prefilled`:
        the engine already ran the prompt through the draft model (in chunks, with other prompts)."""

    @abstractmethod
    def propose_steps(self, num_draft: int) -> ProposeSteps:
        """Up to num_draft draft tokens following everything committed so far (a tree
        drafter returns a tree of its own fixed shape instead), as a generator of draft forwards."""

    @abstractmethod
    def observe(self, verdict: Verdict) -> None:
        """The tokens the verifier committed this round."""

    @abstractmethod
    def skip(self, tokens: list[int]) -> None:
        """The tokens committed by a round that drafted nothing (a plain step, when the batch
        leaves no room for draft tokens)."""

    def propose(self, num_draft: int, timer: StageTimer) -> Proposal | TreeProposal:
        """This drafter's proposal alone (one sequence), its forwards timed by `timer`."""
        return run_proposals([self.propose_steps(num_draft)], self.runner, timer.stage)[0]


def run_proposals(rounds: Sequence[ProposeSteps], runner: ModelRunner | None, stage: Stage) -> list[
        Proposal | TreeProposal]:
    """Drive every drafter's round together: at each tick, the feeds they yielded go through the
    runner as one forward per (mode, causal or masked) group, each drafter gets its logits back.
    The first tick (the opening exact forward) is timed as "calibrate", the rest as "draft".
    Every drafting rank drives the same rounds, so their forwards (and collectives) match.
    Returns the proposals in the order of `rounds`."""
    proposals: list[Proposal | TreeProposal | None] = [None] * len(rounds)
    pending: dict[int, tuple[str, Feed]] = {}
    with stage("draft"):  # what drafters do before their first forward (an n-gram lookup is all of it)
        for i, steps in enumerate(rounds):
            _advance(i, steps, None, pending, proposals)
    tick = 0
    while pending:
        with stage("calibrate" if tick == 0 else "draft"):
            _tick(rounds, runner, pending, proposals)
        tick += 1
    return proposals


def _tick(rounds: Sequence[ProposeSteps], runner: ModelRunner, pending: dict[int, tuple[str, Feed]],
          proposals: list) -> None:
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, (mode, feed) in pending.items():
        groups.setdefault((mode, feed.mask is not None), []).append(i)
    results: dict[int, Tensor] = {}
    for (mode, _), members in sorted(groups.items()):
        outs = runner.forward_rows([pending[i][1] for i in members], mode)
        results.update(zip(members, outs, strict=True))
    pending.clear()
    for i in sorted(results):
        _advance(i, rounds[i], results[i], pending, proposals)


def _advance(i: int, steps: ProposeSteps, logits: Tensor | None, pending: dict[int, tuple[str, Feed]],
             proposals: list) -> None:
    try:
        pending[i] = steps.send(logits) if logits is not None else next(steps)
    except StopIteration as done:
        proposals[i] = done.value
