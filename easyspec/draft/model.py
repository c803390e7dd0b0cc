"""Drafting with a small model of the base model's family.

Two flavours share this class: sequential drafting (standard speculative
decoding, the draft at TP=1 or sharded like the base) and EasySpec's
layer-parallel drafting, where every step after the first runs the draft's
layers in parallel groups (easyspec.parallel.layer_parallel) and so writes
approximate KV.

Each round opens with one exact forward over the tokens whose draft KV is
missing or not exact (in pieces of at most max_num_draft + 1 tokens):
in standard SD that is last round's bonus (and the last draft token when all
were accepted); under EasySpec calibration it is every token committed last
round, which rewrites the KV that layer-parallel steps wrote. Its last logits give the
first draft token, so calibration costs no extra step.

Bookkeeping, as positions in the committed sequence:
  written_upto: positions below hold draft KV of committed tokens (exact or approximate)
  exact_upto:   positions below hold exact draft KV
"""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.draft.base import Drafter, ProposeSteps
from easyspec.options import Calibration, SamplingParams
from easyspec.runtime.runner import EXACT, LAYER_PARALLEL, Feed, ModelRunner
from easyspec.runtime.stats import StageTimer
from easyspec.verify.penalties import TokenHistory
from easyspec.verify.sampling import process_logits, sample
from easyspec.verify.types import Proposal, Verdict


class ModelDrafter(Drafter):
    def __init__(
        self,
        runner: ModelRunner,
        params: SamplingParams,
        generator: torch.Generator | None,
        max_num_draft: int,
        history: TokenHistory,
        layer_parallel: bool = False,
        calibrate: str = Calibration.EVERY_ROUND,
        row: int = 0,
    ) -> None:
        """history: the request's committed tokens (the engine commits each decision to it), which
        the penalties and min_tokens read, as they do for the base; layer_parallel: draft steps after
        a round's first run the runner's LAYER_PARALLEL step; row: the sequence's row of the runner."""
        self.runner = runner
        self.row = row
        self.params = params
        self.history = history
        self.generator = generator
        self.layer_parallel = layer_parallel
        self.calibrate = calibrate
        self.opening_len = max_num_draft + 1  # the longest piece of the opening exact forward
        self.tokens: list[int] = []
        self.written_upto = self.exact_upto = 0
        self.calibrate_next = False
        self.last_num_draft = 0

    def start(self, prompt_ids: list[int], first_token: int, timer: StageTimer, prefilled: bool = False) -> None:
        if not prefilled:
            with timer.stage("prefill"):
                tokens = torch.tensor(prompt_ids, dtype=torch.long, device=self.runner.device)
                self.runner.forward_rows([Feed(self.row, tokens, 0)], last_only=True)
        self.tokens = [*prompt_ids, first_token]
        self.written_upto = self.exact_upto = len(prompt_ids)
        self.calibrate_next = False

    def _sample(self, logits: Tensor, drafted: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """logits [V] after the `drafted` tokens [] of this round -> (token [], q [V] or None under greedy)."""
        if self.history.active:
            device = logits.device
            before = torch.stack(drafted) if drafted else torch.zeros(0, dtype=torch.long, device=device)  # [i]
            precedes = torch.ones(1, len(drafted), dtype=torch.bool, device=device)  # [1, i]
            logits = self.history.adjust(logits[None], before, precedes)[0]
        if self.params.greedy:
            return logits.argmax(-1), None
        probs = process_logits(logits[None], self.params)[0]
        return sample(probs[None], self.generator)[0], probs

    def _feed_exact(self, start: int) -> ProposeSteps:
        """Run committed tokens [start, end) exactly, in pieces of at most opening_len tokens.
        Returns the logits [V] after the last of them."""
        device = self.runner.device
        pending = self.tokens[start:]
        logits = None
        for begin in range(0, len(pending), self.opening_len):
            piece = torch.tensor(pending[begin : begin + self.opening_len], dtype=torch.long)
            logits = yield EXACT, Feed(self.row, piece.to(device, non_blocking=True), start + begin)
        return logits[-1]

    def propose_steps(self, num_draft: int) -> ProposeSteps:
        last_pos = len(self.tokens) - 1
        start = self.exact_upto if self.calibrate_next else self.written_upto
        token, probs = self._sample((yield from self._feed_exact(start)), [])
        self.written_upto = self.exact_upto = last_pos + 1
        drafted, dists = [token], [probs]
        mode = LAYER_PARALLEL if self.layer_parallel else EXACT
        for i in range(1, num_draft):
            logits = yield mode, Feed(self.row, drafted[-1].view(1), last_pos + i)
            token, probs = self._sample(logits[0], drafted)
            drafted.append(token)
            dists.append(probs)
        self.last_num_draft = num_draft
        q = None if self.params.greedy else torch.stack(dists)
        return Proposal(torch.stack(drafted), q)

    def skip(self, tokens: list[int]) -> None:
        # Their draft KV is missing: the next opening forward feeds them from written_upto on.
        self.tokens.extend(tokens)

    def observe(self, verdict: Verdict) -> None:
        last_pos = len(self.tokens) - 1
        self.tokens.extend(verdict.tokens)
        # Draft tokens 1..n-1 (n = last_num_draft) were fed at positions last_pos+1 .. last_pos+n-1;
        # those that were accepted keep their KV, the rest will be overwritten.
        self.written_upto = last_pos + 1 + min(verdict.accepted, self.last_num_draft - 1)
        if not self.layer_parallel:
            self.exact_upto = self.written_upto
        self.calibrate_next = self.calibrate == Calibration.EVERY_ROUND or (
            self.calibrate == Calibration.ON_MISMATCH and not verdict.all_accepted
        )
