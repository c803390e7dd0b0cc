"""Tree drafting and its verification: the tree's fixed shape, attention masks,
how children are chosen, and greedy and stochastic acceptance.

Shape. Every round drafts a tree of one fixed shape: the root is the last
committed token (it has not been through the base model yet), then D levels
of exactly W nodes. Node n (0-based, level by level) sits at depth 1 + n // W.
"Tree order" numbers the root 0 and node n as n + 1. A level may hold padding
nodes (fewer real children than W exist); they are computed like the others
but never accepted, so shapes never change and every step can be replayed as
a captured CUDA graph.

Cache layout. With the root at slot P (P is also its position) the tree takes
slots P .. P + N in tree order: node n at slot P + 1 + n, at position
P + depth(n). A tree query attends to every slot before P and, inside the
tree, to its ancestors and itself (`ancestors`, `tree_mask`). The draft writes
its tree the same way, one level per forward.

Choosing children (`choose_children`), one level at a time from the W nodes
of the level above (the frontier), in two steps:
  1. Allocation. Candidate (u, j) is the j-th most likely token of q_u, scored
     s_u + log q_u,(j), where s_u is the cumulative log q of u's path. The W
     best candidates fix how many children k_u each frontier node gets. This
     reads only the frontier's scores and distributions, never a child.
  2. Tokens. Greedy: u's k_u most likely tokens, so the tree is the top-W
     children per node, keeping the W best by cumulative log-probability.
     Sampling without replacement: k_u tokens drawn one after another from
     q_u, each draw with the earlier ones removed (exponential race, the
     Gumbel-top-k trick). With replacement: k_u independent draws from q_u.
  Children are stored grouped by parent, in draw order, and k_u never exceeds
  the size of q_u's support (those candidates score -inf: padding).

Verification, greedy: accept the deepest node whose path tokens all equal the
base argmax at their parent, then commit the argmax after it. The committed
tokens are exactly those of plain greedy decoding.

Verification, sampling (recursive rejection sampling, as in SpecInfer and
Recursive Speculative Decoding). Start at the root with r = p_root. At node u
with children c_1..c_k in draw order, for i = 1..k:
    q_i = q_u                                   (drawn with replacement)
    q_i = q_u without c_1..c_{i-1}, renormalised (drawn without replacement)
    accept c_i with probability min(1, r(c_i) / q_i(c_i)):
        move to c_i, set r = p_{c_i} and repeat one level down;
    else r = norm(max(r - q_i, 0)).
If no child is accepted (or u has none), commit one token sampled from r.

Why this is lossless. One sibling step emits x with probability
min(r(x), q_i(x)) + (1 - sum min(r, q_i)) * norm(max(r - q_i, 0))(x) = r(x),
provided c_i, given c_1..c_{i-1}, is distributed as q_i: true for both ways
of drawing, each with its own q_i. By induction over the siblings (the last
step samples r itself) the token committed after u is distributed as p_u, and
an accepted child restarts the argument one level down with fresh draws. The
hypothesis needs k_u to be fixed before u's children are drawn, which the
allocation guarantees; a rule that samples many children and keeps the best
would condition them on being kept and break it. Using the with-replacement
rule on children drawn without replacement breaks it too (tests show both
fail the statistical check while the rules above pass).

Committing the accepted path's KV. Base: the accepted nodes' entries are
copied to consecutive slots P + 1 .. P + a (`path_moves`, one fixed-shape
copy of D entries per layer). Re-running them instead would cost another base
forward, which at batch 1 reads every weight once: for a 70B model about
140 GB against a copy of 2 * layers * D * Hkv * hd values (~1.6 MB at D = 5);
BENCHMARKS.md section 7 has the two timed on the demo base.
Draft: the accepted tokens are re-run, because every round opens with one
exact draft forward of a fixed D + 1 tokens anyway (easyspec.draft.model);
feeding the accepted path through it costs nothing extra, and under EasySpec
it is the calibration that makes the layer-parallel KV exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from easyspec.verify.rejection import check_target
from easyspec.verify.sampling import sample
from easyspec.verify.types import TreeProposal, TreeVerdict

__all__ = [
    "CHILD_RULES",
    "ancestors",
    "choose_children",
    "extend_ancestors",
    "path_moves",
    "tree_depths",
    "tree_mask",
    "verify_tree_greedy",
    "verify_tree_stochastic",
]

CHILD_RULES = ("greedy", "without-replacement", "with-replacement")


def tree_depths(width: int, depth: int, device: torch.device | str | None = None) -> Tensor:
    """Depth of every tree-order node, long [1 + W * D]: 0 for the root, then W nodes per depth."""
    return torch.cat((torch.zeros(1, dtype=torch.long, device=device),
                      torch.arange(1, depth + 1, device=device).repeat_interleave(width)))


def extend_ancestors(anc: Tensor, parents: Tensor, first: int) -> None:
    """Fill one level's rows of an ancestor matrix from its parents' rows, which must be complete.

    anc: bool [1 + N, 1 + N] in tree order, modified in place; parents: long [W],
    the tree-order parents of nodes first .. first + W - 1.
    """
    rows = slice(1 + first, 1 + first + parents.shape[0])
    anc[rows] |= anc[parents]


def ancestors(parents: Tensor, width: int) -> Tensor:
    """Ancestor-or-self matrix bool [1 + N, 1 + N] in tree order: row t marks t, its parent, ..., the root.

    parents: long [N], the tree-order parent of each node (always on the level above).
    """
    n = parents.shape[0]
    anc = torch.eye(1 + n, dtype=torch.bool, device=parents.device)
    for first in range(0, n, width):
        extend_ancestors(anc, parents[first : first + width], first)
    return anc


def tree_mask(anc_rows: Tensor, root_slot: int, kv_len: int) -> Tensor:
    """Attention mask bool [R, kv_len] for R tree queries given their ancestor rows anc_rows [R, 1 + N]:
    every slot before the root's (the committed tokens), then the tree (root at root_slot) as the rows say."""
    rows, size = anc_rows.shape
    if root_slot + size > kv_len:
        raise ValueError(f"the tree's slots {root_slot}..{root_slot + size - 1} are past kv_len {kv_len}")
    mask = torch.zeros(rows, kv_len, dtype=torch.bool, device=anc_rows.device)
    mask[:, :root_slot] = True
    mask[:, root_slot : root_slot + size] = anc_rows
    return mask


def choose_children(scores: Tensor, probs: Tensor, rule: str,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """The next level of the tree from its W frontier nodes (see the module docstring).

    scores: [W] cumulative log q of each frontier node's path, -inf for padding.
    probs: [W, V] each frontier node's next-token distribution (the draft's
    softmax under greedy, the processed q when sampling).
    rule: one of CHILD_RULES.
    Returns (parent [W] frontier index, tokens [W] long, scores [W]) of the new
    level, grouped by parent in draw order; a score of -inf marks padding.
    No host synchronisation.
    """
    if rule not in CHILD_RULES:
        raise ValueError(f"unknown child rule {rule!r}; choose one of {', '.join(CHILD_RULES)}")
    width = scores.shape[0]
    device = scores.device
    logq = probs.log()  # [W, V], -inf outside the support
    top_values, top_tokens = logq.topk(width, dim=-1)  # [W, W] each, descending
    candidates = scores[:, None] + top_values  # [W, W]
    best = candidates.flatten().topk(width).indices  # [W]
    counts = torch.zeros(width, dtype=torch.long, device=device)
    counts.scatter_add_(0, best // width, torch.ones_like(best))  # [W]: children per frontier node
    # Take each node's first counts[u] draws, a prefix of its draw order even where
    # candidate scores tie, grouped by parent: a fixed-shape sort, no host sync.
    rank = torch.arange(width, device=device)
    flat = torch.where(rank[None, :] < counts[:, None], rank[:, None] * width + rank[None, :], width * width)
    order = flat.flatten().sort().values[:width]  # [W]
    parent, j = order // width, order % width
    if rule == "greedy":
        drawn = top_tokens
    elif rule == "without-replacement":
        # Exponential race: sorting q / E with E ~ Exp(1) descending draws without replacement, in order.
        noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
        drawn = (probs / noise).topk(width, dim=-1).indices  # [W, W]
    else:
        drawn = torch.multinomial(probs, width, replacement=True, generator=generator)  # [W, W]
    tokens = drawn[parent, j]  # [W]
    child_scores = scores[parent] + logq[parent, tokens]
    child_scores = torch.where(candidates[parent, j].isfinite(), child_scores, -math.inf)
    return parent, tokens, child_scores


def path_moves(nodes: list[int] | tuple[int, ...], root_slot: int, depth: int) -> tuple[list[int], list[int]]:
    """KV copies (src, dst), D slots each, that put the accepted nodes right after the root.

    Depths past the accepted path copy a slot onto itself, so the move always
    has the same shape.
    """
    dst = [root_slot + d for d in range(1, depth + 1)]
    src = [root_slot + 1 + n for n in nodes] + dst[len(nodes) :]
    return src, dst


def verify_tree_greedy(proposal: TreeProposal, target_logits: Tensor) -> TreeVerdict:
    """The deepest path whose tokens all equal the base argmax, plus the argmax after it.

    target_logits: [1 + N, V] in tree order (row 0 at the root). One host transfer.
    """
    check_target(proposal, target_logits, "target_logits")
    width, depth = proposal.width, proposal.depth
    device = target_logits.device
    tokens = proposal.tokens.to(device)  # [N]
    parents = proposal.parents.to(device)  # [N]
    best = target_logits.argmax(dim=-1)  # [1 + N]
    match = proposal.valid.to(device) & (tokens == best[parents])  # [N]
    ok = torch.ones(1 + tokens.shape[0], dtype=torch.bool, device=device)  # [1 + N]: whole path matches
    for first in range(0, tokens.shape[0], width):
        level = slice(first, first + width)
        ok[1 + first : 1 + first + width] = match[level] & ok[parents[level]]
    depths = tree_depths(width, depth, device)
    leaf = torch.where(ok, depths, -1).argmax()  # the root when nothing matched
    # Walk up from the leaf: D tree-order indices, leaf first, the root repeated past the top.
    parents_full = torch.cat((torch.zeros(1, dtype=torch.long, device=device), parents))  # [1 + N]
    walk = [leaf]
    for _ in range(depth - 1):
        walk.append(parents_full[walk[-1]])
    up = torch.stack(walk)  # [D]
    tokens_full = torch.cat((torch.zeros(1, dtype=torch.long, device=device), tokens))  # [1 + N]
    packed = torch.cat((up, tokens_full[up], best[leaf].view(1), depths[leaf].view(1))).tolist()
    accepted = packed[-1]
    path = packed[:accepted][::-1]
    path_tokens = packed[depth : depth + accepted][::-1]
    return TreeVerdict(accepted=accepted, tokens=path_tokens + [packed[2 * depth]], num_drafted=depth,
                       nodes=tuple(t - 1 for t in path))


def _siblings(residual: Tensor, q: Tensor, tokens: list[int], uniforms: list[float],
              replacement: bool) -> tuple[int | None, Tensor]:
    """Recursive rejection over one node's children, in draw order.

    residual: [V] the target (or what rejections left of it); q: [V] the
    distribution the children were drawn from. Returns the index of the
    accepted child, or None and the residual after every child was rejected.
    One host transfer.
    """
    if not tokens:
        return None, residual
    ratios = []
    q_i = q
    for token in tokens:
        # Division keeps r >= q a certain accept (ratio >= 1 > u).
        ratios.append(residual[token] / q_i[token])
        rest = (residual - q_i).clamp_min(0)  # [V]
        total = rest.sum()
        # An all-zero rest means r == q_i up to rounding, where a rejection is a rounding
        # artefact; keeping r is then the lossless choice.
        residual = torch.where(total > 0, rest / total, residual)
        if not replacement:
            q_i = q_i.clone()
            q_i[token] = 0.0
            q_i = q_i / q_i.sum()
    for i, (u, ratio) in enumerate(zip(uniforms, torch.stack(ratios).tolist(), strict=True)):
        if u < ratio:  # a NaN ratio (0 / 0) rejects
            return i, residual
    return None, residual


def verify_tree_stochastic(proposal: TreeProposal, target_probs: Tensor,
                           generator: torch.Generator | None) -> TreeVerdict:
    """Recursive rejection sampling down the tree: lossless with respect to target_probs.

    target_probs: [1 + N, V] in tree order, from ``process_logits`` with the
    same SamplingParams as proposal.probs. The rule for each node's siblings
    follows proposal.replacement. Every call draws N uniforms and then V
    exponentials from ``generator`` (on target_probs' device) whatever the
    outcome, so the generator advances in a fixed pattern.
    """
    check_target(proposal, target_probs, "target_probs")
    if proposal.probs is None:
        raise ValueError("stochastic tree verification needs the draft distributions (TreeProposal.probs)")
    width, depth, n = proposal.width, proposal.depth, proposal.num_tokens
    device = target_probs.device
    p = target_probs.to(torch.float32)  # [1 + N, V]
    q = proposal.probs.to(device=device, dtype=torch.float32)  # [1 + (D - 1) W, V]
    uniforms = torch.rand(n, generator=generator, device=device).tolist()
    tokens, parents, valid = torch.stack((proposal.tokens.long(), proposal.parents.long(),
                                          proposal.valid.long())).tolist()
    current, residual, nodes = 0, p[0], []
    for first in range(0, n, width):
        children = [m for m in range(first, first + width) if valid[m] and parents[m] == current]
        chosen, residual = _siblings(residual, q[current], [tokens[m] for m in children],
                                     [uniforms[m] for m in children], proposal.replacement)
        if chosen is None:
            break
        nodes.append(children[chosen])
        current = 1 + children[chosen]
        residual = p[current]
    final = int(sample(residual[None], generator)[0])
    return TreeVerdict(accepted=len(nodes), tokens=[tokens[m] for m in nodes] + [final], num_drafted=depth,
                       nodes=tuple(nodes))
