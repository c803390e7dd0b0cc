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
- per request, `drafter(params, seed, history)`: the method's Drafter, wrapped so that
  ranks which do not draft receive rank 0's proposal (`SharedProposal`).
"""

from __future__ import annotations

import torch

from easyspec.draft.base import Drafter
from easyspec.draft.model import ModelDrafter
from easyspec.draft.ngram import NgramDrafter
from easyspec.draft.tree import TreeDrafter
from easyspec.model.config import ModelConfig
from easyspec.options import EngineOptions, Method, OptionsError, SamplingParams
from easyspec.parallel import comm
from easyspec.parallel.layer_parallel import LayerLayout, LayerParallelForward
from easyspec.parallel.state import ParallelState
from easyspec.parallel.tp import check_divisible, load_sharded
from easyspec.runtime.runner import LAYER_PARALLEL, ModelRunner
from easyspec.runtime.stats import StageTimer
from easyspec.verify.penalties import TokenHistory
from easyspec.verify.types import Proposal, TreeProposal, Verdict


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

    def __init__(self, options: EngineOptions, state: ParallelState, dtype: torch.dtype, scratch: int) -> None:
        self.options, self.state = options, state
        self.ranks = self._choose_ranks()
        # Adapting the draft length only makes sense for a model's chain (trees have a fixed shape).
        self.adaptive = options.adaptive_draft and options.uses_draft_model
        drafts = state.rank in self.ranks
        if options.is_layer_parallel and drafts and options.p2p_collectives and state.device.type == "cuda":
            comm.enable_p2p(state.subgroup(self.ranks), state.device, (dtype,))  # collective over the group
        self.runner = self._load(dtype, scratch) if options.uses_draft_model and drafts else None

    def _choose_ranks(self) -> tuple[int, ...]:
        opts, state = self.options, self.state
        if opts.is_layer_parallel:
            ranks = tuple(range(opts.layer_parallel))
            state.make_subgroups([ranks])  # collective: every rank takes part
            return ranks
        if opts.uses_draft_model:
            return tuple(range(opts.draft_tp))
        return tuple(range(state.world_size))

    def _load(self, dtype: torch.dtype, scratch: int) -> ModelRunner:
        opts, state = self.options, self.state
        label = "draft" if opts.progress and state.is_driver else None  # progress bars and lines on rank 0
        if not opts.is_layer_parallel:
            model = load_sharded(opts.draft, dtype, state, tp=opts.draft_tp > 1, progress=label)
            return ModelRunner(model, opts.max_context, opts.cuda_graphs, scratch=scratch, label=label)
        model = load_sharded(opts.draft, dtype, state, tp=False, progress=label)
        size = len(self.ranks)
        layout = LayerLayout.choose(opts.groups, model.config.num_layers, size, opts.keep_first, opts.keep_last)
        forward = LayerParallelForward(model, layout, state.rank, size, state.subgroup(self.ranks),
                                       opts.parallel_policy)
        return ModelRunner(model, opts.max_context, opts.cuda_graphs, steps={LAYER_PARALLEL: forward},
                           scratch=scratch, label=label)

    def drafter(self, params: SamplingParams, seed: int, history: TokenHistory) -> Drafter | None:
        """The request's Drafter on this rank, or None when the method drafts nothing (vanilla);
        history: the request's committed tokens, as the penalties read them."""
        opts = self.options
        if not opts.speculates:
            return None
        own = self._own_drafter(params, seed, history) if self.state.rank in self.ranks else None
        if len(self.ranks) == self.state.world_size:
            return own
        return SharedProposal(own, self.state, opts.tree_width)

    def _own_drafter(self, params: SamplingParams, seed: int, history: TokenHistory) -> Drafter:
        opts = self.options
        if Method(opts.method) is Method.NGRAM:
            return NgramDrafter(self.state.device, opts.ngram_min, opts.ngram_max)
        gen = torch.Generator(self.state.device).manual_seed(seed + 1)
        if opts.tree:
            return TreeDrafter(self.runner, params, gen, opts.tree_width, opts.initial_num_draft, history,
                               layer_parallel=opts.is_layer_parallel, sampling=opts.tree_sampling)
        return ModelDrafter(self.runner, params, gen, opts.max_num_draft, history,
                            layer_parallel=opts.is_layer_parallel, calibrate=opts.calibrate)


class SharedProposal(Drafter):
    """Rank 0's proposal, broadcast to every rank, for setups where some ranks do not draft.

    `own` is this rank's drafter, or None on a rank that only receives. A chain sends its
    tokens; a tree its tokens and parents (the ancestor matrix and validity stay on the
    drafting ranks: only the driver verifies, and the base rebuilds the matrix from the parents).
    """

    def __init__(self, own: Drafter | None, state: ParallelState, tree_width: int) -> None:
        self.own, self.state, self.tree_width = own, state, tree_width

    def start(self, prompt_ids: list[int], first_token: int, timer: StageTimer) -> None:
        if self.own is not None:
            self.own.start(prompt_ids, first_token, timer)

    def propose(self, num_draft: int, timer: StageTimer) -> Proposal | TreeProposal:
        if self.tree_width > 1:
            return self._share_tree(num_draft, timer)
        device = self.state.device
        proposal = (self.own.propose(num_draft, timer) if self.own is not None
                    else Proposal(torch.empty(num_draft, dtype=torch.long, device=device)))
        comm.broadcast(proposal.tokens, 0, self.state.group)
        return proposal

    def _share_tree(self, depth: int, timer: StageTimer) -> TreeProposal:
        width, device = self.tree_width, self.state.device
        n = width * depth
        tree = self.own.propose(depth, timer) if self.own is not None else None
        packed = (torch.cat((tree.tokens, tree.parents)) if tree is not None
                  else torch.empty(2 * n, dtype=torch.long, device=device))  # [2N]: tokens, parents
        comm.broadcast(packed, 0, self.state.group)
        if tree is None:
            tree = TreeProposal(packed[:n], packed[n:], torch.ones(n, dtype=torch.bool, device=device), width)
        return tree

    def observe(self, verdict: Verdict) -> None:
        if self.own is not None:
            self.own.observe(verdict)
