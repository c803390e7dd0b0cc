"""Drafting as the engine sees it: one object, built once per engine, that settles
everything about drafting and hands out each request's Drafter.

Built on every rank, in the same order (it makes process groups, a collective):
- which ranks draft: sd on rank 0 alone (--draft-tp 1) or on every rank, its
  draft sharded like the base (--draft-tp N); easyspec on the first
  --layer-parallel ranks, which form their own process group; ngram on every
  rank (the lookup is cheap and deterministic, so nothing is sent);
- the peer-to-peer path for that group (CUDA);
- the draft model, loaded only where it runs: whole, tensor-parallel, or whole
  with a layer-parallel forward over the drafting group;
- per request, `drafter(params, seed, history, row)`: the method's Drafter on the ranks
  that draft (row: the request's row of the batch);
- per round, `propose`: every sequence's drafting together (easyspec.draft.base.run_proposals),
  the proposals then broadcast from rank 0 to ranks that do not draft, in one message.
"""

from __future__ import annotations

import torch

from easyspec.draft.base import Drafter, Stage, run_proposals
from easyspec.draft.model import ModelDrafter
from easyspec.draft.ngram import NgramDrafter
from easyspec.draft.tree import TreeDrafter
from easyspec.model.config import ModelConfig
from easyspec.options import EngineOptions, Method, OptionsError, SamplingParams
from easyspec.parallel import comm
from easyspec.parallel.layer_parallel import LayerLayout, LayerParallelForward
from easyspec.parallel.state import ParallelState
from easyspec.parallel.tp import check_divisible, load_sharded
from easyspec.runtime.runner import LAYER_PARALLEL, Feed, ModelRunner
from easyspec.verify.penalties import TokenHistory
from easyspec.verify.sampling import seeded_generator
from easyspec.verify.types import Proposal, TreeProposal


def check_draft(base: ModelConfig, draft: ModelConfig, options: EngineOptions) -> None:
    """A draft must speak the base model's vocabulary, reach the same context length and,
    sharded (sd with --draft-tp N), split over the devices as the base does."""
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
    if not options.is_layer_parallel and options.draft_tp > 1:
        check_divisible(draft, options.draft_tp, "draft model")


class Drafting:
    """This rank's part in drafting; `runner` is the draft model's runner where it runs, else None."""

    def __init__(self, options: EngineOptions, state: ParallelState, dtype: torch.dtype, scratch: int,
                 rows: int = 1) -> None:
        """rows: sequences drafted for at once (the engine's batch)."""
        self.options, self.state = options, state
        self.ranks = self._choose_ranks()
        # Adapting the draft length only makes sense for a model's chain (trees have a fixed shape).
        self.adaptive = options.adaptive_draft and options.uses_draft_model
        drafts = state.rank in self.ranks
        if options.is_layer_parallel and drafts and options.p2p_collectives and state.device.type == "cuda":
            comm.enable_p2p(state.subgroup(self.ranks), state.device, (dtype,))  # collective over the group
        self.drafts = drafts  # this rank drafts
        self.runner = self._load(dtype, scratch, rows) if options.uses_draft_model and drafts else None

    @property
    def speculates(self) -> bool:
        return self.options.speculates

    def _choose_ranks(self) -> tuple[int, ...]:
        opts, state = self.options, self.state
        if opts.is_layer_parallel:
            ranks = tuple(range(opts.layer_parallel))
            state.make_subgroups([ranks])  # collective: every rank takes part
            return ranks
        if opts.uses_draft_model:
            return tuple(range(opts.draft_tp))
        return tuple(range(state.world_size))

    def _load(self, dtype: torch.dtype, scratch: int, rows: int) -> ModelRunner:
        opts, state = self.options, self.state
        label = "draft" if opts.progress and state.is_driver else None  # progress bars and lines on rank 0
        if not opts.is_layer_parallel:
            model = load_sharded(opts.draft, dtype, state, tp=opts.draft_tp > 1, progress=label)
            return ModelRunner(model, opts.max_context, opts.cuda_graphs, scratch=scratch, label=label, rows=rows)
        model = load_sharded(opts.draft, dtype, state, tp=False, progress=label)
        size = len(self.ranks)
        layout = LayerLayout.choose(opts.groups, model.config.num_layers, size, opts.keep_first, opts.keep_last)
        forward = LayerParallelForward(model, layout, state.rank, size, state.subgroup(self.ranks),
                                       opts.parallel_policy)
        return ModelRunner(model, opts.max_context, opts.cuda_graphs, steps={LAYER_PARALLEL: forward},
                           scratch=scratch, label=label, rows=rows)

    def drafter(self, params: SamplingParams, seed: int, history: TokenHistory, row: int) -> Drafter | None:
        """The request's Drafter on this rank, or None when the method drafts nothing (vanilla) or
        this rank does not draft; history: the request's committed tokens, as the penalties read
        them; row: the request's row of the batch."""
        opts = self.options
        if not opts.speculates or not self.drafts:
            return None
        if Method(opts.method) is Method.NGRAM:
            return NgramDrafter(self.state.device, opts.ngram_min, opts.ngram_max)
        gen = seeded_generator(self.state.device, seed + 1)
        if opts.tree:
            return TreeDrafter(self.runner, params, gen, opts.tree_width, opts.initial_num_draft, history,
                               layer_parallel=opts.is_layer_parallel, sampling=opts.tree_sampling, row=row)
        return ModelDrafter(self.runner, params, gen, opts.max_num_draft, history,
                            layer_parallel=opts.is_layer_parallel, calibrate=opts.calibrate, row=row)

    def prefill(self, feeds: list[Feed]) -> None:
        """Prompt pieces (causal feeds, one per sequence) through the draft model, where it runs."""
        if self.runner is not None and feeds:
            self.runner.forward_rows(feeds, last_only=True)

    def propose(self, drafters: list[Drafter | None], num_drafts: list[int], stage: Stage) -> list[
            Proposal | TreeProposal]:
        """Every sequence's proposal on every rank: the drafting ranks draft them together; when
        some ranks do not draft, rank 0 sends them all in one broadcast. A chain sends its tokens
        (num_drafts[i] of them), a tree its tokens and parents (the ancestor matrix and validity
        stay on the drafting ranks: only the driver verifies, and the base rebuilds the matrix
        from the parents)."""
        proposals = None
        if self.drafts:
            proposals = run_proposals([d.propose_steps(n) for d, n in zip(drafters, num_drafts, strict=True)],
                                      self.runner, stage)
        if len(self.ranks) == self.state.world_size:
            return proposals
        device, width = self.state.device, self.options.tree_width
        sizes = [width * n for n in num_drafts] if width > 1 else list(num_drafts)
        parts = (2 if width > 1 else 1) * sum(sizes)
        with stage("draft"):
            if proposals is not None:
                pieces = [p.tokens for p in proposals] + ([p.parents for p in proposals] if width > 1 else [])
                packed = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
            else:
                packed = torch.empty(parts, dtype=torch.long, device=device)  # tokens, then parents for trees
            comm.broadcast(packed, 0, self.state.group)
        if proposals is not None:
            return proposals
        tokens = packed[: sum(sizes)].split(sizes)
        if width == 1:
            return [Proposal(t) for t in tokens]
        parents = packed[sum(sizes) :].split(sizes)
        return [TreeProposal(t, p, torch.ones(t.shape[0], dtype=torch.bool, device=device), width)
                for t, p in zip(tokens, parents, strict=True)]
