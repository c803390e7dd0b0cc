"""One rank's part of generation: the round loop.

Every rank runs the same loop; rank 0 drives. After each base-model step it
decides what is committed (verification, EOS, length, stop strings,
cancellation) and broadcasts that decision, so all ranks agree on every token
and on when to stop. A round has one of three shapes, each a method below that
returns the round's Decision:
    plain (nothing drafts): one base step, one token;
    chain: propose -> score (one base forward over the last token and the draft)
        -> verify (rank 0) -> broadcast decision -> observe (all ranks);
    tree (--tree-width > 1, easyspec.verify.tree): the same with a tree, scored
        in one forward with a tree mask, after which every rank moves the
        accepted path's base KV into place.
Everything about drafting (which ranks draft, the draft model, the request's
Drafter, sharing proposals with ranks that do not draft) is easyspec.draft.setup's;
the decision and its broadcast are easyspec.engine.decision's.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from easyspec.draft.base import Drafter
from easyspec.draft.setup import Drafting
from easyspec.engine.decision import Decision, RequestFailed, seed_box, settle, share
from easyspec.engine.stop import StopText
from easyspec.model import kernels
from easyspec.model.checkpoint import parse_dtype
from easyspec.model.loader import eos_ids, load_config, load_tokenizer
from easyspec.options import EngineOptions, OptionsError, SamplingParams
from easyspec.parallel import comm
from easyspec.parallel.state import ParallelState
from easyspec.parallel.tp import load_sharded
from easyspec.runtime.runner import ModelRunner
from easyspec.runtime.stats import SpecStats, StageTimer
from easyspec.verify.logprobs import TokenLogprob, token_logprobs
from easyspec.verify.penalties import TokenHistory, chain_precedes
from easyspec.verify.rejection import verify_greedy, verify_stochastic
from easyspec.verify.sampling import process_scores, sample
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


@dataclass
class Chunk:
    """Tokens committed by one step of generation, as they are yielded."""

    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length", "cancelled", "error"
    # What ended the request with "stop", as vLLM's stop_reason: the stop string, or the token of
    # stop_token_ids; None for EOS and every other reason.
    stop_reason: str | int | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when SamplingParams.logprobs is set


@dataclass
class Request:
    """What the rounds of one request share."""

    params: SamplingParams
    generator: torch.Generator | None  # rank 0's, for the tokens it samples from the base
    stats: SpecStats
    timer: StageTimer
    text: StopText | None  # rank 0's stop-string watcher and detokenizer
    history: TokenHistory  # the committed tokens, as penalties and min_tokens read them
    drafter: Drafter | None = None  # None: plain decoding
    logprobs: list[TokenLogprob] | None = None  # rank 0: the candidates' of the last step, when asked for


class Worker:
    def __init__(self, options: EngineOptions, state: ParallelState) -> None:
        self.options, self.state = options, state
        dtype = parse_dtype(options.dtype)
        kernels.use_fused(options.fused_kernels and state.device.type == "cuda")
        self.tokenizer = load_tokenizer(options.model)
        self.base_config = load_config(options.model)
        # A verification step is up to draft_room tokens long; the runners' scratch slots must hold it.
        scratch = max(64, options.draft_room)
        label = "base" if options.progress and state.is_driver else None  # progress bars and lines on rank 0
        self.base = ModelRunner(load_sharded(options.model, dtype, state, tp=state.world_size > 1, progress=label),
                                options.max_context, options.cuda_graphs, scratch=scratch, label=label)
        self.eos = set(eos_ids(self.base_config, self.tokenizer))
        if options.p2p_collectives and state.device.type == "cuda":
            comm.enable_p2p(state.group, state.device, (dtype,))  # collective: every rank takes part
        self.drafting = Drafting(options, state, dtype, scratch)
        self.num_draft = options.initial_num_draft  # draft tokens along one path this round
        # Tree order: the root then W nodes per depth; positions are root + depth, slots root + index.
        self.tree_depths = tree_depths(options.tree_width, options.initial_num_draft, state.device)  # [1 + N]
        self.tree_order = torch.arange(self.tree_depths.shape[0], device=state.device)  # [1 + N]
        self._cancel = False
        self._failure: Exception | None = None  # what a step of rank 0's raised in this request

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

    def _agree_seed(self, seed: int | None) -> int | None:
        """The request's seed on every rank (drawn by rank 0 when not given), or None on every rank
        when rank 0 could not settle it: the request then ends before its first step."""
        box = self._on_driver(seed_box, seed)  # [2]: seed, settled; None on the other ranks
        if box is None:
            box = torch.zeros(2, dtype=torch.long)
        if self.state.distributed:
            box = comm.broadcast(box.to(self.state.device), 0, self.state.group)
        return int(box[0]) if box[1] else None

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Chunk]:
        """Yield a Chunk per step; closing the iterator early cancels the request
        (the ranks finish the round in progress, then stop together)."""
        self.check_request(prompt_ids, params)
        self._cancel, self._failure = False, None
        rounds = self._rounds(prompt_ids, params)
        try:
            # A plain loop, not `yield from`: closing would close `rounds` before we could drain it.
            for chunk in rounds:  # noqa: UP028
                yield chunk
        except GeneratorExit:
            if self.state.distributed:
                self._cancel = True
                for _ in rounds:  # run to the next decision, which now says "stop"
                    pass
            raise

    @torch.inference_mode()
    def _rounds(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Chunk]:
        device = self.state.device
        stats = SpecStats()
        seed = self._agree_seed(params.seed)
        if seed is None:
            if self.state.is_driver:
                raise self._request_failed()
            return
        text = None
        if self.tokenizer and self.state.is_driver:
            text = StopText(self.tokenizer, params.stop, params.min_tokens, params.skip_special_tokens)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos)
        req = Request(
            params,
            torch.Generator(device).manual_seed(seed) if self.state.is_driver else None,
            stats,
            StageTimer(stats, device, self.options.profile_stages),
            text,
            TokenHistory(params, prompt_ids, self.base_config.vocab_size, device, ends),
        )
        self.num_draft = self.options.initial_num_draft
        begin = time.perf_counter()

        with req.timer.stage("prefill"):
            logits = self.base.prefill(torch.tensor(prompt_ids, dtype=torch.long, device=device))
            first = self._on_driver(self._pick, logits[None], req) or []
        decision = self._decide(first, 0, req)
        chunk = self._chunk(decision, req, begin)
        yield chunk
        # The drafter starts after the first token is out: its prefill does not delay it.
        req.drafter = self.drafting.drafter(params, seed, req.history)
        if req.drafter is not None and not chunk.finished:
            req.drafter.start(prompt_ids, decision.tokens[0], req.timer)
        run_round: Callable[[Request, Tensor, int], Decision] = (
            self._plain_round if req.drafter is None else self._tree_round if self.options.tree else self._chain_round
        )
        position = len(prompt_ids)  # where the newest committed token sits
        while not chunk.finished:
            last = torch.tensor([decision.tokens[-1]], device=device)  # [1]
            decision = run_round(req, last, position)
            position += len(decision.tokens)
            chunk = self._chunk(decision, req, begin)
            yield chunk

    def _plain_round(self, req: Request, last: Tensor, position: int) -> Decision:
        """One base step after `last` [1] (at `position`): one token."""
        with req.timer.stage("verify"):
            logits = self.base.forward(last, position)  # [1, V]
            picked = self._on_driver(self._pick, logits, req) or []
        decision = self._decide(picked, 0, req)
        req.stats.rounds += 1
        return decision

    def _chain_round(self, req: Request, last: Tensor, position: int) -> Decision:
        """Draft a chain, score it in one base forward after `last` [1] (at `position`), decide, observe."""
        proposal = req.drafter.propose(self.num_draft, req.timer)
        with req.timer.stage("verify"):
            logits = self.base.forward(torch.cat((last, proposal.tokens)), position)  # [n + 1, V]
            verdict = self._on_driver(self._verify, proposal, logits, req)
        decision = self._decide(verdict.tokens if verdict else [], verdict.accepted if verdict else 0, req)
        drafted = proposal.num_tokens
        req.stats.record_round(drafted, decision.accepted)
        if not decision.finished:
            # Only rank 0 verified: every rank rebuilds the verdict from the broadcast decision.
            verdict = Verdict(decision.accepted, decision.tokens, drafted)
            req.drafter.observe(verdict)
            self._adapt(verdict)
        return decision

    def _tree_round(self, req: Request, last: Tensor, position: int) -> Decision:
        """Draft a tree, score it in one base forward after `last` [1] (at `position`), decide, move
        the accepted path's base KV to consecutive slots after the root, observe."""
        depth = self.num_draft  # a tree's shape is fixed: no adapting
        tree = req.drafter.propose(depth, req.timer)
        with req.timer.stage("verify"):
            end = position + 1 + tree.num_tokens
            anc = tree.ancestors if tree.ancestors is not None else ancestors(tree.parents, tree.width)
            mask = tree_mask(anc, position, self.base.kv_len_for(end))
            logits = self.base.forward_masked(torch.cat((last, tree.tokens)), position + self.tree_depths,
                                              position + self.tree_order, mask)  # [1 + N, V]
            verdict = self._on_driver(self._verify, tree, logits, req)
        decision = self._decide(verdict.tokens if verdict else [], verdict.accepted if verdict else 0,
                                req, verdict.nodes if verdict else ())
        req.stats.record_round(depth, decision.accepted)
        if not decision.finished:
            moves = torch.tensor(path_moves(decision.nodes, position, depth), device=last.device)  # [2, n]: src, dst
            self.base.move_kv(moves[0], moves[1])
            # Only rank 0 verified: every rank rebuilds the verdict from the broadcast decision.
            req.drafter.observe(Verdict(decision.accepted, decision.tokens, depth))
        return decision

    def _on_driver(self, step: Callable[..., T], *args: object) -> T | None:
        """Run a step only rank 0 takes (sampling, verification, settling). If it raises, the error is kept
        and the next decision stops the request on every rank, rather than raised here, which would leave
        the other ranks waiting in a collective for good. None on the other ranks and after a failure."""
        if not self.state.is_driver or self._failure is not None:
            return None
        try:
            return step(*args)
        except Exception as err:
            self._failure = err
            return None

    def _request_failed(self) -> RequestFailed:
        failed = RequestFailed(f"{type(self._failure).__name__}: {self._failure}")
        failed.__cause__ = self._failure
        return failed

    @staticmethod
    def _pick(logits: Tensor, req: Request) -> list[int]:
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
    def _verify(proposal: Proposal | TreeProposal, logits: Tensor, req: Request) -> Verdict:
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

    def _adapt(self, verdict: Verdict) -> None:
        """Adaptive draft length: one longer after full acceptance, one shorter after a rejection.
        Every rank sees the same verdicts, so every rank picks the same num_draft."""
        if not self.drafting.adaptive:
            return
        if verdict.all_accepted:
            self.num_draft = min(self.num_draft + 1, self.options.max_num_draft)
        else:
            self.num_draft = max(self.num_draft - 1, 1)

    def _decide(self, candidates: list[int], accepted: int, req: Request, nodes: tuple[int, ...] = ()) -> Decision:
        """Rank 0 settles the candidate tokens (EOS / length / stop strings / cancellation) and broadcasts
        the result; every rank returns the same Decision. `nodes` (trees only) are the accepted tree nodes,
        shared so every rank can move their KV. After a failure on rank 0 the decision says "error" and
        rank 0 raises RequestFailed, once every rank has it.

        The decision is the only verification result the other ranks see: the rounds rebuild
        the Verdict their drafters observe from it (accepted count and committed tokens)."""
        decision = None
        if self.state.is_driver:
            decision = self._on_driver(settle, candidates, accepted, nodes, req.params, req.stats.generated,
                                       self.eos, req.text, self._cancel) or Decision([], 0, "error")
        decision = share(decision, self.state, self.options.max_num_draft, self.options.tree)
        req.stats.generated += len(decision.tokens)
        req.history.commit(decision.tokens)
        if decision.reason == "error" and self.state.is_driver:
            raise self._request_failed()
        return decision

    def _chunk(self, decision: Decision, req: Request, begin: float) -> Chunk:
        req.stats.total_s = time.perf_counter() - begin
        piece = req.text.take(decision.finished) if req.text is not None else ""
        # The last step's log-probabilities (rank 0), cut where the decision cut its tokens.
        logprobs = req.logprobs[: len(decision.tokens)] if req.logprobs is not None else None
        return Chunk(decision.tokens, piece, decision.finished, decision.reason, decision.stop_reason, req.stats,
                     logprobs)
