"""One rank's part of generation: load the models, then run requests in lockstep.

Every rank runs the same loop; rank 0 drives. After each base-model step it
decides what is committed (verification, EOS, length, stop strings,
cancellation) and broadcasts that decision, so all ranks agree on every token
and on when to stop. The loop per round is
    propose (drafting ranks) -> score (base forward, all ranks) -> verify (rank 0)
    -> broadcast decision -> observe (all ranks).
With --tree-width > 1 the proposal is a tree (easyspec.verify.tree): its
tokens and parents go to any rank that does not draft, the base scores it in
one forward with a tree mask, and every rank then moves the accepted path's
base KV into place.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from easyspec.draft.base import Drafter
from easyspec.draft.model import ModelDrafter
from easyspec.draft.ngram import NgramDrafter
from easyspec.draft.tree import TreeDrafter
from easyspec.engine.options import EngineOptions, OptionsError
from easyspec.engine.runner import ModelRunner
from easyspec.engine.stats import SpecStats, StageTimer
from easyspec.engine.stop import StopText
from easyspec.model import kernels
from easyspec.model.checkpoint import load_config, load_weights, parse_dtype
from easyspec.model.tokenizer import Tokenizer
from easyspec.model.transformer import Transformer
from easyspec.parallel import comm
from easyspec.parallel.layer_parallel import LayerLayout, LayerParallelForward
from easyspec.parallel.state import ParallelState
from easyspec.parallel.tp import shard_model
from easyspec.verify.rejection import verify_greedy, verify_stochastic
from easyspec.verify.sampling import SamplingParams, process_logits, sample
from easyspec.verify.tree import (
    ancestors,
    path_moves,
    tree_depths,
    tree_mask,
    verify_tree_greedy,
    verify_tree_stochastic,
)
from easyspec.verify.types import Proposal, TreeProposal, TreeVerdict, Verdict

FINISH_REASONS = (None, "stop", "length", "cancelled", "error")
T = TypeVar("T")


class RequestFailed(Exception):
    """A step only rank 0 takes raised; every rank stopped the request at the next decision,
    so the ranks are still in step and the engine can take the next request."""


@dataclass
class Chunk:
    """Tokens committed by one step of generation, as they are yielded."""

    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled"
    stats: SpecStats = field(default_factory=SpecStats)


def load_sharded(folder: str, dtype: torch.dtype, state: ParallelState, tp: bool) -> Transformer:
    """Load a model whole, or tensor-parallel over every rank when `tp` is set."""
    cfg = load_config(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    slicer = shard_model(model, state.rank, state.world_size, state.group) if tp else None
    return load_weights(model, folder, dtype, state.device, slicer).eval()


class Worker:
    def __init__(self, options: EngineOptions, state: ParallelState) -> None:
        self.options, self.state = options, state
        dtype = parse_dtype(options.dtype)
        kernels.use_fused(options.fused_kernels and state.device.type == "cuda")
        self.tokenizer = Tokenizer.from_folder(options.model)
        self.base_config = load_config(options.model)
        if self.base_config.max_position_embeddings < options.max_context:
            raise OptionsError(
                f"--max-context {options.max_context} exceeds the base model's "
                f"max_position_embeddings ({self.base_config.max_position_embeddings}); lower it"
            )
        if options.tree_width > self.base_config.vocab_size:
            raise OptionsError(f"--tree-width {options.tree_width} exceeds the vocabulary "
                               f"({self.base_config.vocab_size} tokens); lower it")
        tp = state.world_size > 1
        # A verification step is up to draft_room tokens long; the runners' scratch slots must hold it.
        self.scratch = max(64, options.draft_room)
        self.base = ModelRunner(load_sharded(options.model, dtype, state, tp), options.max_context,
                                options.cuda_graphs, scratch=self.scratch)
        self.eos = set(self.base_config.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token:
            eos_id = self.tokenizer.token_id(self.tokenizer.eos_token)
            if eos_id is not None:
                self.eos.add(eos_id)
        self.drafting_ranks = self._drafting_ranks()
        if options.p2p_collectives and state.device.type == "cuda":
            self._enable_p2p(dtype)
        self.draft_runner = self._load_draft(dtype) if state.rank in self.drafting_ranks else None
        self.k = options.depth
        # Tree order: the root then W nodes per depth; positions are root + depth, slots root + index.
        self.tree_depths = tree_depths(options.tree_width, options.depth, state.device)  # [1 + N]
        self.tree_order = torch.arange(self.tree_depths.shape[0], device=state.device)  # [1 + N]

    def _drafting_ranks(self) -> tuple[int, ...]:
        opts, world = self.options, self.state.world_size
        if opts.method == "sd":
            return tuple(range(opts.draft_tp))
        if opts.method == "easyspec":
            ranks = tuple(range(opts.layer_parallel))
            self.state.make_subgroups([ranks])  # collective: every rank takes part
            return ranks
        return tuple(range(world))

    def _enable_p2p(self, dtype: torch.dtype) -> None:
        """Peer-to-peer collectives for the base's group and the drafting group (each a collective call)."""
        state = self.state
        comm.enable_p2p(state.group, state.device, (dtype,))
        ranks = self.drafting_ranks
        if self.options.method == "easyspec" and len(ranks) > 1 and state.rank in ranks:
            comm.enable_p2p(state.subgroup(ranks), state.device, (dtype,))

    def _load_draft(self, dtype: torch.dtype) -> ModelRunner | None:
        opts, state = self.options, self.state
        if opts.method not in ("sd", "easyspec"):
            return None
        draft_cfg = load_config(opts.draft)
        check_pair(self.base_config, draft_cfg, opts)
        if opts.method == "sd":
            model = load_sharded(opts.draft, dtype, state, tp=opts.draft_tp > 1)
            return ModelRunner(model, opts.max_context, opts.cuda_graphs, scratch=self.scratch)
        model = load_sharded(opts.draft, dtype, state, tp=False)
        ranks = self.drafting_ranks
        layout = LayerLayout.choose(opts.groups, draft_cfg.num_layers, len(ranks), opts.keep_first, opts.keep_last)
        fuzzy = LayerParallelForward(model, layout, state.rank, len(ranks), state.subgroup(ranks),
                                     opts.parallel_policy)
        return ModelRunner(model, opts.max_context, opts.cuda_graphs, steps={"fuzzy": fuzzy}, scratch=self.scratch)

    def _make_drafter(self, params: SamplingParams, seed: int) -> Drafter | None:
        opts = self.options
        if opts.method == "ngram":
            return NgramDrafter(self.state.device, opts.ngram_min, opts.ngram_max)
        if self.draft_runner is None:
            return None
        gen = torch.Generator(self.state.device).manual_seed(seed + 1)
        if opts.tree:
            return TreeDrafter(self.draft_runner, params, gen, opts.tree_width, opts.depth,
                               fuzzy=opts.method == "easyspec", sampling=opts.tree_sampling)
        return ModelDrafter(self.draft_runner, params, gen, opts.k_max, fuzzy=opts.method == "easyspec",
                            calibrate=opts.calibrate)

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
        box = self._on_driver(_seed_box, seed)  # [2]: seed, settled; None on the other ranks
        if box is None:
            box = torch.zeros(2, dtype=torch.long)
        if self.state.distributed:
            box = comm.broadcast(box.to(self.state.device), 0, self.state.group)
        return int(box[0]) if box[1] else None

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Chunk]:
        """Yield a Chunk per step; closing the iterator early cancels the request
        (the ranks finish the round in progress, then stop together)."""
        self.check_request(prompt_ids, params)
        self._cancel = False
        self._failure: Exception | None = None
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
        timer = StageTimer(stats, device, self.options.profile_stages)
        seed = self._agree_seed(params.seed)
        if seed is None:
            if self.state.is_driver:
                raise self._request_failed()
            return
        generator = torch.Generator(device).manual_seed(seed) if self.state.is_driver else None
        text = StopText(self.tokenizer, params.stop) if self.tokenizer and self.state.is_driver else None
        self.k = self.options.depth
        begin = time.perf_counter()

        with timer.stage("prefill"):
            logits = self.base.prefill(torch.tensor(prompt_ids, dtype=torch.long, device=device))
            first = self._on_driver(self._pick, logits[None], params, generator) or []
        decision = self._decide(first, 0, params, stats, text)
        chunk = self._chunk(decision, stats, text, begin)
        yield chunk
        drafter = self._make_drafter(params, seed)
        if drafter is not None and not chunk.finished:
            drafter.start(prompt_ids, decision.tokens[0], timer)
        position = len(prompt_ids)  # where the newest committed token sits
        while not chunk.finished:
            last = torch.tensor([decision.tokens[-1]], device=device)
            if self.options.method == "vanilla":
                with timer.stage("verify"):
                    logits = self.base.forward(last, position)
                    picked = self._on_driver(self._pick, logits, params, generator) or []
                decision = self._decide(picked, 0, params, stats, text)
                stats.rounds += 1
                position += 1
            elif self.options.tree:
                decision = self._tree_round(drafter, last, position, params, generator, stats, text, timer)
                position += len(decision.tokens)
            else:
                proposal = self._propose(drafter, timer)
                with timer.stage("verify"):
                    logits = self.base.forward(torch.cat((last, proposal.tokens)), position)  # [k+1, V]
                    verdict = self._on_driver(self._verify, proposal, logits, params, generator)
                drafted = proposal.num_tokens
                decision = self._decide(verdict.tokens if verdict else [], verdict.accepted if verdict else 0,
                                        params, stats, text)
                stats.record_round(drafted, decision.accepted)
                position += len(decision.tokens)
                if not decision.finished:
                    verdict = Verdict(decision.accepted, decision.tokens, drafted)
                    if drafter is not None:
                        drafter.observe(verdict)
                    self._adapt(verdict)
            chunk = self._chunk(decision, stats, text, begin)
            yield chunk

    def _on_driver(self, step: Callable[..., T], *args: object) -> T | None:
        """Run a step only rank 0 takes (sampling, verification). If it raises, the error is kept
        for the next decision, which stops the request on every rank, rather than raised here,
        which would leave the other ranks waiting in a collective for good."""
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
    def _pick(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> list[int]:
        """Rank 0 (through _on_driver) chooses the next token from the base logits [1, V]."""
        if params.greedy:
            return [int(logits[-1].argmax())]
        return [int(sample(process_logits(logits[-1:], params), generator)[0])]

    def _propose(self, drafter: Drafter | None, timer: StageTimer) -> Proposal:
        """Draft tokens on the drafting ranks, shared with the others when some don't draft."""
        if drafter is not None:
            proposal = drafter.propose(self.k, timer)
        else:
            proposal = Proposal(torch.empty(self.k, dtype=torch.long, device=self.state.device))
        if len(self.drafting_ranks) < self.state.world_size:
            comm.broadcast(proposal.tokens, 0, self.state.group)
        return proposal

    def _tree_round(self, drafter: Drafter | None, last: Tensor, position: int, params: SamplingParams,
                    generator: torch.Generator | None, stats: SpecStats, text: StopText | None,
                    timer: StageTimer) -> Decision:
        """Draft a tree, score it in one base forward, decide, and move the accepted path's base KV
        to consecutive slots after the root (`position`, where `last` [1] sits)."""
        depth = self.options.depth
        tree = self._propose_tree(drafter, timer)
        with timer.stage("verify"):
            end = position + 1 + tree.num_tokens
            anc = tree.ancestors if tree.ancestors is not None else ancestors(tree.parents, tree.width)
            mask = tree_mask(anc, position, self.base.kv_len_for(end))
            logits = self.base.forward_masked(torch.cat((last, tree.tokens)), position + self.tree_depths,
                                              position + self.tree_order, mask)  # [1 + N, V]
            verdict = self._on_driver(self._verify_tree, tree, logits, params, generator)
        decision = self._decide(verdict.tokens if verdict else [], verdict.accepted if verdict else 0,
                                params, stats, text, verdict.nodes if verdict else ())
        stats.record_round(depth, decision.accepted)
        if not decision.finished:
            moves = torch.tensor(path_moves(decision.nodes, position, depth), device=last.device)  # [2, n]: src, dst
            self.base.move_kv(moves[0], moves[1])
            if drafter is not None:
                drafter.observe(Verdict(decision.accepted, decision.tokens, depth))
        return decision

    def _propose_tree(self, drafter: Drafter | None, timer: StageTimer) -> TreeProposal:
        """A tree from the drafting ranks; ranks that don't draft get its tokens and parents."""
        n, device = self.options.tree_width * self.options.depth, self.state.device
        tree = drafter.propose(self.k, timer) if drafter is not None else None
        if len(self.drafting_ranks) < self.state.world_size:
            packed = (torch.cat((tree.tokens, tree.parents)) if tree is not None
                      else torch.empty(2 * n, dtype=torch.long, device=device))  # [2N]
            comm.broadcast(packed, 0, self.state.group)
            if tree is None:
                tree = TreeProposal(packed[:n], packed[n:], torch.ones(n, dtype=torch.bool, device=device),
                                    self.options.tree_width)
        return tree

    @staticmethod
    def _verify(proposal: Proposal, logits: Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> Verdict:
        """Rank 0 (through _on_driver) verifies a chain against the base logits [k + 1, V]."""
        if params.greedy:
            return verify_greedy(proposal, logits)
        return verify_stochastic(proposal, process_logits(logits, params), generator)

    @staticmethod
    def _verify_tree(tree: TreeProposal, logits: Tensor, params: SamplingParams,
                     generator: torch.Generator | None) -> TreeVerdict:
        if params.greedy:
            return verify_tree_greedy(tree, logits)
        return verify_tree_stochastic(tree, process_logits(logits, params), generator)

    def _adapt(self, verdict: Verdict) -> None:
        """Adaptive draft length: one longer after full acceptance, one shorter after a rejection.
        Every rank sees the same verdicts, so every rank picks the same k."""
        if not self.options.adaptive_draft or self.options.method == "ngram":
            return
        if verdict.all_accepted:
            self.k = min(self.k + 1, self.options.k_max)
        else:
            self.k = max(self.k - 1, 1)

    def _decide(self, candidates: list[int], accepted: int, params: SamplingParams,
                stats: SpecStats, text: StopText | None, nodes: tuple[int, ...] = ()) -> Decision:
        """Rank 0 applies EOS / length / stop strings / cancellation to the candidate
        tokens and broadcasts the result; every rank returns the same Decision.
        `nodes` (trees only) are the accepted tree nodes, shared so every rank can move their KV."""
        k_max = self.options.k_max
        if self.state.is_driver:
            settled = self._on_driver(self._settle, candidates, accepted, params, stats, text)
            tokens, accepted, reason = settled or ([], 0, FINISH_REASONS.index("error"))
            # [count, accepted, reason, nodes padded to k_max, tokens]
            message = [len(tokens), accepted, reason, *nodes, *[0] * (k_max - len(nodes)), *tokens]
        if self.state.distributed:
            box = torch.zeros(3 + 2 * k_max + 1, dtype=torch.long)
            if self.state.is_driver:
                box[: len(message)] = torch.tensor(message)
            box = comm.broadcast(box.to(self.state.device), 0, self.state.group)
            message = box.tolist()
        count, accepted, reason = message[:3]
        nodes = tuple(message[3 : 3 + accepted]) if self.options.tree else ()
        decision = Decision(message[3 + k_max : 3 + k_max + count], accepted, FINISH_REASONS[reason], nodes)
        stats.generated += count
        if decision.reason == "error" and self.state.is_driver:
            raise self._request_failed()
        return decision

    def _settle(self, candidates: list[int], accepted: int, params: SamplingParams, stats: SpecStats,
                text: StopText | None) -> tuple[list[int], int, int]:
        """Rank 0: the candidates that are committed after EOS / length / stop strings / cancellation,
        how many of them are accepted draft tokens, and the finish reason's index."""
        tokens, reason = [], 0
        budget = params.max_new_tokens - stats.generated
        for token in candidates:
            tokens.append(token)
            if token in self.eos and not params.ignore_eos:
                reason = FINISH_REASONS.index("stop")
                break
            if len(tokens) >= budget:
                reason = FINISH_REASONS.index("length")
                break
        # Checked even after EOS or length: a stop string completed before them ends it first.
        stop_at = text.push(tokens) if text is not None else None
        if stop_at is not None:
            tokens, reason = tokens[:stop_at], FINISH_REASONS.index("stop")
        if reason == 0 and self._cancel:
            reason = FINISH_REASONS.index("cancelled")
        # Accepted draft tokens cut off by the end of the request were never committed: not counted (vLLM's
        # num_accepted_tokens). The candidates are the accepted draft tokens, then the bonus or recovered one.
        return tokens, min(accepted, len(tokens)), reason

    def _chunk(self, decision: Decision, stats: SpecStats, text: StopText | None, begin: float) -> Chunk:
        stats.total_s = time.perf_counter() - begin
        piece = text.take(decision.finished) if text is not None else ""
        return Chunk(decision.tokens, piece, decision.finished, decision.reason, stats)


def _seed_box(seed: int | None) -> Tensor:
    """[seed, 1] as int64, the seed drawn when not given; raises for a seed int64 cannot hold."""
    return torch.tensor([int.from_bytes(os.urandom(6), "little") if seed is None else seed, 1], dtype=torch.long)


@dataclass
class Decision:
    tokens: list[int]
    accepted: int
    reason: str | None
    nodes: tuple[int, ...] = ()  # trees: the accepted nodes, root side first

    @property
    def finished(self) -> bool:
        return self.reason is not None


def check_pair(base, draft, options: EngineOptions) -> None:
    """A draft must speak the base model's vocabulary and reach the same context length."""
    if draft.vocab_size != base.vocab_size:
        raise OptionsError(
            f"the draft's vocab_size ({draft.vocab_size}) differs from the base model's "
            f"({base.vocab_size}); use a draft of the same family and tokenizer"
        )
    if draft.max_position_embeddings < options.max_context:
        raise OptionsError(
            f"the draft's max_position_embeddings ({draft.max_position_embeddings}) is shorter than "
            f"--max-context {options.max_context}; lower --max-context"
        )
