"""Tree drafting with a small model: sequential (sd) or layer-parallel (easyspec).

Each round opens, as for chains (easyspec.draft.model), with one exact draft
forward of a fixed D + 1 tokens over everything committed since the root of
the last tree: the accepted path and the bonus token. That rewrites their
draft KV exactly (the calibration, under EasySpec) and gives the root's
distribution. The tree then grows one level per draft forward: the W nodes of
a level go through the draft together, at their depth's position, each in
its own slot past the root and each attending only to its ancestors, and
their distributions choose the next level (easyspec.verify.tree has the
layout and the rules). D levels cost D - 1 forwards of W tokens, with no host
synchronisation, all of one shape per kv bucket, so CUDA graphs replay them.

After verification nothing of the tree's draft KV is kept: the next round's
opening forward rewrites the accepted path at its final slots.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from easyspec.draft.base import ProposeSteps
from easyspec.draft.model import ModelDrafter
from easyspec.options import SamplingParams, TreeSampling
from easyspec.runtime.runner import EXACT, LAYER_PARALLEL, Feed, ModelRunner
from easyspec.verify.penalties import TokenHistory
from easyspec.verify.sampling import process_logits
from easyspec.verify.tree import choose_children, extend_ancestors, tree_depths, tree_mask
from easyspec.verify.types import TreeProposal, Verdict


class TreeDrafter(ModelDrafter):
    def __init__(
        self,
        runner: ModelRunner,
        params: SamplingParams,
        generator: torch.Generator | None,
        width: int,
        depth: int,
        history: TokenHistory,
        layer_parallel: bool = False,
        sampling: str = TreeSampling.WITHOUT_REPLACEMENT,
        row: int = 0,
    ) -> None:
        """depth: the tree's num_draft; sampling: how a node's children are drawn from q when not
        greedy (easyspec.verify.tree); row: the sequence's row of the runner."""
        super().__init__(runner, params, generator, depth, history, layer_parallel=layer_parallel, row=row)
        self.width, self.depth = width, depth
        self.rule = "greedy" if params.greedy else sampling
        device = runner.device
        self.depths = tree_depths(width, depth, device)  # [1 + N]
        self.order = torch.arange(1 + width * depth, device=device)  # [1 + N] tree order

    def _dist(self, logits: Tensor, tokens: Tensor | None = None, precedes: Tensor | None = None) -> Tensor:
        """logits [R, V] -> each row's next-token distribution, float32 [R, V]; tokens [n]: the
        tree's nodes so far, precedes: bool [R, n], those on each row's path (root side included).

        Greedy ranks children by the draft's own probabilities; sampling draws
        them from q, processed exactly as the base's p will be. Both see the
        history-dependent settings with each row's own path.
        """
        logits = self.history.adjust(logits, tokens, precedes)
        if self.params.greedy:
            return logits.float().softmax(dim=-1)
        return process_logits(logits, self.params)

    def propose_steps(self, num_draft: int) -> ProposeSteps:
        """A tree of the drafter's fixed width and depth (num_draft is not used: the shape never changes)."""
        width, depth = self.width, self.depth
        n = width * depth
        device = self.runner.device
        root = len(self.tokens) - 1  # slot and position of the root
        root_logits = yield from self._feed_exact(self.written_upto)  # [V]
        self.written_upto = self.exact_upto = root + 1
        kv_len = self.runner.kv_len_for(root + 1 + n)
        mode = LAYER_PARALLEL if self.layer_parallel else EXACT

        tokens = torch.empty(n, dtype=torch.long, device=device)
        parents = torch.empty(n, dtype=torch.long, device=device)
        valid = torch.empty(n, dtype=torch.bool, device=device)
        anc = torch.eye(1 + n, dtype=torch.bool, device=device)  # [1 + N, 1 + N] ancestor-or-self
        # The first frontier is the root alone: W rows of its distribution, all but one scored -inf.
        root_dist = self._dist(root_logits[None])  # [1, V]
        probs = root_dist.repeat(width, 1)  # [W, V]
        scores = torch.full((width,), -math.inf, device=device)
        scores[0] = 0.0
        frontier = torch.zeros(width, dtype=torch.long, device=device)  # tree-order ids
        dists = [root_dist]
        for level in range(depth):
            first = level * width
            nodes = slice(first, first + width)
            parent, tokens[nodes], scores = choose_children(scores, probs, self.rule, self.generator)
            parents[nodes] = frontier[parent]
            valid[nodes] = scores.isfinite()
            extend_ancestors(anc, parents[nodes], first)
            if level == depth - 1:
                break
            rows = slice(1 + first, 1 + first + width)  # this level in tree order
            logits = yield mode, Feed(self.row, tokens[nodes], positions=root + self.depths[rows],
                                      slots=root + self.order[rows], mask=tree_mask(anc[rows], root, kv_len))  # [W, V]
            filled = first + width  # nodes drawn so far
            probs = self._dist(logits, tokens[:filled], anc[rows, 1 : 1 + filled])
            dists.append(probs)
            frontier = self.order[rows]
        q = None if self.params.greedy else torch.cat(dists)  # [1 + (D - 1) W, V]
        return TreeProposal(tokens, parents, valid, width, q, self.rule == "with-replacement", anc)

    def observe(self, verdict: Verdict) -> None:
        # The draft KV past the root is tree scratch: the next opening forward re-feeds what was committed.
        self.tokens.extend(verdict.tokens)
