"""The engine's step kinds on one model, for the inflation tests (module level so spawn can import them)."""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.model.transformer import Transformer
from easyspec.parallel.tp import load_sharded
from easyspec.runtime.runner import ModelRunner

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 100, 17]
# A verification tree after the committed tokens: the root, two children, one grandchild under each.
TREE_TOKENS = [7, 11, 2, 40, 21]
TREE_DEPTHS = [0, 1, 1, 2, 2]
TREE_PARENTS = [-1, 0, 0, 1, 2]


def runner_steps(model: Transformer) -> dict[str, Tensor]:
    """Logits [T, V] of each step the engine runs, through its ModelRunner: the prompt's prefill, one
    decoding step, a verification of 4 tokens (forward) and a tree (forward_masked)."""
    runner = ModelRunner(model, max_len=64, use_graphs=False, scratch=16)
    out = {"prefill": runner.prefill(torch.tensor(PROMPT))[None]}
    start = len(PROMPT)
    out["decode"] = runner.forward(torch.tensor([5]), start).clone()
    out["verify"] = runner.forward(torch.tensor([3, 5, 8, 9]), start + 1).clone()
    root = start + 5  # the tree hangs after everything committed so far
    nodes = len(TREE_TOKENS)
    mask = torch.zeros(nodes, runner.kv_len_for(root + nodes), dtype=torch.bool)  # [T, L]
    mask[:, :root] = True
    for node in range(nodes):
        ancestor = node
        while ancestor >= 0:
            mask[node, root + ancestor] = True
            ancestor = TREE_PARENTS[ancestor]
    out["tree"] = runner.forward_masked(torch.tensor(TREE_TOKENS), root + torch.tensor(TREE_DEPTHS),
                                        root + torch.arange(nodes), mask).clone()
    return out


def runner_steps_tp(state, folders: list[str]) -> list[dict[str, Tensor]]:
    """runner_steps of each folder's model, tensor-parallel over every rank."""
    return [runner_steps(load_sharded(folder, torch.float32, state, tp=True)) for folder in folders]
