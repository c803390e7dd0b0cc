"""One rank's part of generation: a batch of sequences advanced in rounds.

Every rank runs the same steps on the same batch; rank 0 drives. Sequences join
between steps (the engine admits them in the same order on every rank) and leave
when their decision ends them. A step is:
    prefill: the next pieces of the prompts still being read (at most PREFILL_CHUNK
        tokens in all, so that running sequences wait at most that long), through
        the base and the draft together; a prompt read to its end gives its first
        token, decided like any other;
    one round for every running sequence, in one of three shapes:
    plain (nothing drafts, or the batch leaves no room for draft tokens): one base
        forward over every sequence's last token, one token each;
    chain: propose (every sequence's drafting together) -> score (one base forward
        over each sequence's last token and draft) -> verify (rank 0, per sequence)
        -> broadcast the decisions -> observe;
    tree (--tree-width > 1, easyspec.verify.tree): the same with a tree per sequence,
        scored with tree masks, after which every rank moves the accepted paths' base
        KV into place.
Each sequence has its own row of the KV caches, position, draft length, acceptance
and stop state; a round commits a different number of tokens to each. Everything
about drafting is easyspec.draft.setup's; the decisions and their broadcast are
easyspec.engine.decision's.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from easyspec.draft.setup import Drafting
from easyspec.engine.decision import Decision, settle, share
from easyspec.engine.request import Chunk, Join, RequestOutput, Running
from easyspec.engine.stop import StopText
from easyspec.model import kernels
from easyspec.model.checkpoint import parse_dtype
from easyspec.model.loader import eos_ids, load_config, load_tokenizer
from easyspec.options import EngineOptions, OptionsError, SamplingParams
from easyspec.parallel import comm
from easyspec.parallel.state import ParallelState
from easyspec.parallel.tp import load_sharded
from easyspec.runtime.runner import PREFILL_PIECE, Feed, ModelRunner
from easyspec.runtime.stats import SpecStats, StageTimer
from easyspec.verify.logprobs import token_logprobs
from easyspec.verify.penalties import TokenHistory, chain_precedes
from easyspec.verify.rejection import verify_greedy, verify_stochastic
from easyspec.verify.sampling import process_scores, sample, seeded_generator
from easyspec.verify.tree import (
    ancestors,
    path_moves,
    tree_depths,
    tree_mask,
    verify_tree_greedy,
    verify_tree_stochastic,
)
from easyspec.verify.types import Proposal, TreeProposal, Verdict

T = TypeVar("T")

PREFILL_CHUNK = PREFILL_PIECE  # prompt tokens read per step, over all the prompts being read


class Worker:
    def __init__(self, options: EngineOptions, state: ParallelState) -> None:
        self.options, self.state = options, state
        dtype = parse_dtype(options.dtype)
        kernels.use_fused(options.fused_kernels and state.device.type == "cuda")
        self.tokenizer = load_tokenizer(options.model)
        self.base_config = load_config(options.model)
        # A verification step is up to draft_room tokens long; the runners' scratch slots must hold it.
        scratch = max(64, options.draft_room)
        rows = options.max_num_seqs or 1
        label = "base" if options.progress and state.is_driver else None  # progress bars and lines on rank 0
        self.base = ModelRunner(load_sharded(options.model, dtype, state, tp=state.world_size > 1, progress=label),
                                options.max_context, options.cuda_graphs, scratch=scratch, label=label, rows=rows)
        self.eos = set(eos_ids(self.base_config, self.tokenizer))
        if options.p2p_collectives and state.device.type == "cuda":
            comm.enable_p2p(state.group, state.device, (dtype,))  # collective: every rank takes part
        self.drafting = Drafting(options, state, dtype, scratch, rows)
        # Tree order: the root then W nodes per depth; positions are root + depth, slots root + index.
        self.tree_depths = tree_depths(options.tree_width, options.initial_num_draft, state.device)  # [1 + N]
        self.tree_order = torch.arange(self.tree_depths.shape[0], device=state.device)  # [1 + N]
        self.free_rows = list(range(rows))
        self.running: list[Running] = []

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise OptionsError("the prompt is empty; give at least one token")
        odd = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
        if odd is not None:
            raise OptionsError(f"prompt token ids must be integers, got {odd!r}")
        vocab = self.base_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise OptionsError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise OptionsError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})")
        needed = len(prompt_ids) + params.max_new_tokens + self.options.draft_room
        if needed > self.options.max_context:
            raise OptionsError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) + draft room "
                f"({self.options.draft_room}) exceeds --max-context {self.options.max_context}; "
                "shorten the prompt, lower max_new_tokens or raise --max-context"
            )

    @property
    def room(self) -> int:
        """Sequences that can still join."""
        return len(self.free_rows)

    def admit(self, joins: Sequence[Join]) -> None:
        """Requests that enter the batch (every rank, the same ones in the same order, each
        request already checked by check_request on rank 0)."""
        device = self.state.device
        for join in joins:
            params = join.params
            text = None
            if self.tokenizer and self.state.is_driver:
                text = StopText(self.tokenizer, params.stop, params.min_tokens, params.skip_special_tokens)
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos)
            history = TokenHistory(params, join.prompt_ids, self.base_config.vocab_size, device, ends)
            # The lowest free row: a batched step reads the cache up to its highest row in use.
            row = min(self.free_rows)
            self.free_rows.remove(row)
            self.running.append(Running(
                join.request_id, row, join.prompt_ids, params,
                seeded_generator(device, join.seed) if self.state.is_driver else None,
                SpecStats(), text, history, self.drafting.drafter(params, join.seed, history, row),
                self.options.initial_num_draft, time.perf_counter()))

    def holds(self, request_id: int) -> bool:
        """Whether the request is in the batch (reading its prompt or decoding)."""
        return any(seq.request_id == request_id for seq in self.running)

    def cancel(self, request_id: int) -> None:
        """End the request: one still reading its prompt at the next step, before its next piece
        (every rank is told, at the same step); one decoding at its next decision (rank 0's)."""
        for seq in self.running:
            if seq.request_id == request_id:
                seq.cancel = True

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """The next pieces of the prompts being read, then one round for every running sequence.
        Returns what each request committed (rank 0; the other ranks get the same list, texts aside)."""
        outputs = []
        for seq in self.running:
            if seq.cancel and not seq.started:  # the rest of its prompt would hold up the others' for nothing
                seq.finished = True
                outputs.append(self._output(seq, Decision([], 0, "cancelled")))
        reading = [seq for seq in self.running if not seq.started and not seq.finished]
        decoding = [seq for seq in self.running if seq.started]
        if reading:
            outputs += self._prefill(reading)
        if decoding:
            outputs += self._round(decoding)
        for seq in self.running:
            if seq.finished:
                self.free_rows.append(seq.row)
        self.running = [seq for seq in self.running if not seq.finished]
        return outputs

    def _timer(self, seqs: Sequence[Running]) -> StageTimer:
        return StageTimer([seq.stats for seq in seqs], self.state.device, self.options.profile_stages)

    def _prefill(self, seqs: list[Running]) -> list[RequestOutput]:
        """The next pieces of the prompts being read, first come first served, PREFILL_CHUNK tokens in all;
        the prompts read to their end this step get their first token."""
        device = self.state.device
        feeds, done, budget = [], [], PREFILL_CHUNK
        for seq in seqs:
            if budget == 0:
                break
            piece = seq.prompt_ids[seq.prefilled : seq.prefilled + budget]
            feeds.append(Feed(seq.row, torch.tensor(piece, dtype=torch.long).to(device, non_blocking=True),
                              seq.prefilled))
            seq.prefilled += len(piece)
            budget -= len(piece)
            done.append(seq.prefilled == len(seq.prompt_ids))
        members = seqs[: len(feeds)]
        with self._timer(members).stage("prefill"):
            logits = self.base.forward_rows(feeds, last_only=True)  # each [1, V]
            self.drafting.prefill(feeds)
        finishing = [(seq, out) for seq, out, end in zip(members, logits, done, strict=True) if end]
        if not finishing:
            return []
        firsts = [self._on_driver(seq, self._pick, out, seq) or [] for seq, out in finishing]
        seqs = [seq for seq, _ in finishing]
        decisions = self._decide(seqs, firsts, [0] * len(seqs))
        for seq, decision in zip(seqs, decisions, strict=True):
            seq.started = True
            seq.position = len(seq.prompt_ids)
            if not decision.finished:
                seq.last = decision.tokens[-1]
                if seq.drafter is not None:
                    seq.drafter.start(seq.prompt_ids, seq.last, self._timer([seq]), prefilled=True)
        return [self._output(seq, d) for seq, d in zip(seqs, decisions, strict=True)]

    def _round(self, seqs: list[Running]) -> list[RequestOutput]:
        opts = self.options
        tree_size = opts.tree_width * opts.initial_num_draft
        # The budget never stops a request alone from drafting in full: past that, each gets its share.
        budget = max(opts.draft_token_budget, tree_size if opts.tree else opts.max_num_draft)
        room = budget // len(seqs)  # draft tokens each sequence may have this round
        if not self.drafting.speculates or room == 0 or (opts.tree and room < tree_size):
            decisions = self._plain_round(seqs)
        elif opts.tree:
            decisions = self._tree_round(seqs)
        else:
            decisions = self._chain_round(seqs, [min(seq.num_draft, room) for seq in seqs])
        outputs = []
        for seq, decision in zip(seqs, decisions, strict=True):
            seq.position += len(decision.tokens)
            if decision.tokens:
                seq.last = decision.tokens[-1]
            outputs.append(self._output(seq, decision))
        return outputs

    def _lasts(self, seqs: Sequence[Running]) -> Tensor:
        return torch.tensor([seq.last for seq in seqs], dtype=torch.long).to(self.state.device, non_blocking=True)

    def _plain_round(self, seqs: list[Running]) -> list[Decision]:
        """One base step after each sequence's last token: one token each."""
        lasts = self._lasts(seqs)  # [B]
        with self._timer(seqs).stage("verify"):
            logits = self.base.forward_rows([Feed(seq.row, lasts[i : i + 1], seq.position)
                                             for i, seq in enumerate(seqs)])  # each [1, V]
            picked = [self._on_driver(seq, self._pick, out, seq) or [] for seq, out in zip(seqs, logits, strict=True)]
        decisions = self._decide(seqs, picked, [0] * len(seqs))
        for seq, decision in zip(seqs, decisions, strict=True):
            seq.stats.rounds += 1
            if not decision.finished and seq.drafter is not None:
                seq.drafter.skip(decision.tokens)
        return decisions

    def _chain_round(self, seqs: list[Running], num_drafts: list[int]) -> list[Decision]:
        """Draft a chain per sequence, score them in one base forward, decide, observe."""
        proposals = self.drafting.propose([seq.drafter for seq in seqs], num_drafts, self._timer(seqs).stage)
        lasts = self._lasts(seqs)  # [B]
        with self._timer(seqs).stage("verify"):
            feeds = [Feed(seq.row, torch.cat((lasts[i : i + 1], p.tokens)), seq.position)
                     for i, (seq, p) in enumerate(zip(seqs, proposals, strict=True))]
            logits = self.base.forward_rows(feeds)  # each [n_i + 1, V]
            verdicts = [self._on_driver(seq, self._verify, p, out, seq)
                        for seq, p, out in zip(seqs, proposals, logits, strict=True)]
        decisions = self._decide(seqs, [v.tokens if v else [] for v in verdicts],
                                 [v.accepted if v else 0 for v in verdicts])
        for seq, proposal, decision in zip(seqs, proposals, decisions, strict=True):
            drafted = proposal.num_tokens
            seq.stats.record_round(drafted, decision.accepted)
            if not decision.finished:
                # Only rank 0 verified: every rank rebuilds the verdict from the broadcast decision.
                verdict = Verdict(decision.accepted, decision.tokens, drafted)
                if seq.drafter is not None:
                    seq.drafter.observe(verdict)
                self._adapt(seq, verdict)
        return decisions

    def _tree_round(self, seqs: list[Running]) -> list[Decision]:
        """Draft a tree per sequence, score them in one base forward with tree masks, decide, move
        the accepted paths' base KV to consecutive slots after their roots, observe."""
        depth = self.options.initial_num_draft  # a tree's shape is fixed: no adapting
        trees = self.drafting.propose([seq.drafter for seq in seqs], [depth] * len(seqs), self._timer(seqs).stage)
        lasts = self._lasts(seqs)  # [B]
        with self._timer(seqs).stage("verify"):
            feeds = []
            for i, (seq, tree) in enumerate(zip(seqs, trees, strict=True)):
                end = seq.position + 1 + tree.num_tokens
                anc = tree.ancestors if tree.ancestors is not None else ancestors(tree.parents, tree.width)
                feeds.append(Feed(seq.row, torch.cat((lasts[i : i + 1], tree.tokens)),
                                  positions=seq.position + self.tree_depths, slots=seq.position + self.tree_order,
                                  mask=tree_mask(anc, seq.position, self.base.kv_len_for(end))))
            logits = self.base.forward_rows(feeds)  # each [1 + N, V]
            verdicts = [self._on_driver(seq, self._verify, tree, out, seq)
                        for seq, tree, out in zip(seqs, trees, logits, strict=True)]
        decisions = self._decide(seqs, [v.tokens if v else [] for v in verdicts],
                                 [v.accepted if v else 0 for v in verdicts], [v.nodes if v else () for v in verdicts])
        moves = []
        for seq, decision in zip(seqs, decisions, strict=True):
            seq.stats.record_round(depth, decision.accepted)
            if not decision.finished:
                base = self.base.row_base(seq.row)
                moves.append(torch.tensor(path_moves(decision.nodes, seq.position, depth)) + base)  # [2, n]
                if seq.drafter is not None:
                    # Only rank 0 verified: every rank rebuilds the verdict from the broadcast decision.
                    seq.drafter.observe(Verdict(decision.accepted, decision.tokens, depth))
        if moves:
            src_dst = torch.cat(moves, dim=1).to(self.state.device)  # [2, n]: sources, destinations
            self.base.move_kv(src_dst[0], src_dst[1])
        return decisions

    def _on_driver(self, seq: Running, step: Callable[..., T], *args: object) -> T | None:
        """Run a step only rank 0 takes for `seq` (sampling, verification, settling). If it raises, the
        error is kept and the next decision ends that request alone on every rank, rather than raised
        here, which would leave the other ranks waiting in a collective for good. None on the other
        ranks and after a failure."""
        if not self.state.is_driver or seq.failure is not None:
            return None
        try:
            return step(*args)
        except Exception as err:
            seq.failure = err
            return None

    @staticmethod
    def _pick(logits: Tensor, req: Running) -> list[int]:
        """Rank 0 (through _on_driver) chooses the next token from the base logits [1, V]."""
        params = req.params
        scores = req.history.adjust(logits[-1:])  # [1, V]
        if not params.greedy:
            scores = process_scores(scores, params)
            token = int(sample(scores.softmax(dim=-1), req.generator)[0])
        else:
            token = int(scores[0].argmax())
        if params.logprobs is not None:
            req.logprobs = token_logprobs(scores, [0], [token], params.logprobs)
        return [token]

    @staticmethod
    def _verify(proposal: Proposal | TreeProposal, logits: Tensor, req: Running) -> Verdict:
        """Rank 0's verdict (through _on_driver) from the base logits (chain [n + 1, V], tree [1 + N, V]),
        each row changed by its own history (the drafted tokens before it: a chain's earlier ones, a
        tree node's ancestors) before it is judged."""
        params = req.params
        tree = isinstance(proposal, TreeProposal)
        if tree:
            anc = proposal.ancestors if proposal.ancestors is not None else ancestors(proposal.parents, proposal.width)
            precedes = anc[:, 1:]  # [1 + N, N]
        else:
            precedes = chain_precedes(logits.shape[0], proposal.num_tokens, logits.device)  # [k + 1, k]
        scores = req.history.adjust(logits, proposal.tokens, precedes)
        if params.greedy:
            verdict = (verify_tree_greedy if tree else verify_greedy)(proposal, scores)
        else:
            scores = process_scores(scores, params)
            verdict = (verify_tree_stochastic if tree else verify_stochastic)(proposal, scores.softmax(dim=-1),
                                                                              req.generator)
        if params.logprobs is not None:
            # Committed token j was judged at the row after its predecessor: the root's, then the accepted nodes'.
            rows = [0, *(1 + n for n in verdict.nodes)] if tree else list(range(verdict.num_committed))
            req.logprobs = token_logprobs(scores, rows, verdict.tokens, params.logprobs)
        return verdict

    def _adapt(self, seq: Running, verdict: Verdict) -> None:
        """Adaptive draft length: one longer after full acceptance, one shorter after a rejection.
        Every rank sees the same verdicts, so every rank picks the same num_draft."""
        if not self.drafting.adaptive:
            return
        if verdict.all_accepted:
            seq.num_draft = min(seq.num_draft + 1, self.options.max_num_draft)
        else:
            seq.num_draft = max(seq.num_draft - 1, 1)

    def _decide(self, seqs: list[Running], candidates: list[list[int]], accepted: list[int],
                nodes: list[tuple[int, ...]] | None = None) -> list[Decision]:
        """Rank 0 settles each sequence's candidate tokens (EOS / length / stop strings / cancellation)
        and broadcasts the results; every rank returns the same Decisions. `nodes` (trees only) are the
        accepted tree nodes, shared so every rank can move their KV. After a failure on rank 0 a
        sequence's decision says "error".

        The decisions are the only verification results the other ranks see: the rounds rebuild
        the Verdicts their drafters observe from them (accepted count and committed tokens)."""
        decisions = None
        if self.state.is_driver:
            nodes = nodes or [()] * len(seqs)
            decisions = [self._on_driver(seq, settle, cands, acc, node, seq.params, seq.stats.generated, self.eos,
                                         seq.text, seq.cancel) or Decision([], 0, "error")
                         for seq, cands, acc, node in zip(seqs, candidates, accepted, nodes, strict=True)]
        decisions = share(decisions, len(seqs), self.state, self.options.max_num_draft, self.options.tree)
        for seq, decision in zip(seqs, decisions, strict=True):
            seq.stats.generated += len(decision.tokens)
            seq.history.commit(decision.tokens)
            seq.finished = decision.finished
        return decisions

    def _output(self, seq: Running, decision: Decision) -> RequestOutput:
        seq.stats.total_s = time.perf_counter() - seq.begin
        piece = seq.text.take(decision.finished) if seq.text is not None else ""
        # The last step's log-probabilities (rank 0), cut where the decision cut its tokens.
        logprobs = seq.logprobs[: len(decision.tokens)] if seq.logprobs is not None else None
        chunk = Chunk(decision.tokens, piece, decision.finished, decision.reason, decision.stop_reason, seq.stats,
                      logprobs)
        error = None
        if decision.reason == "error":
            failure = seq.failure
            error = f"{type(failure).__name__}: {failure}" if failure is not None else "the request failed"
        return RequestOutput(seq.request_id, chunk, error)
