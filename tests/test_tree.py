"""Tree drafting and verification (easyspec.verify.tree, easyspec.draft.tree).

Structure: ancestor matrices and attention masks against a brute-force walk;
child choice against a brute-force ranking. Verification: greedy on crafted
logits; a seeded chi-square test that recursive rejection sampling over a
tree reproduces the target distribution of the first token and of the first
two tokens, for children drawn with and without replacement, and fails for
two wrong rules. Engine: greedy tree decoding equals plain greedy decoding
(sd and easyspec, one and two processes) and the committed base KV equals a
fresh prefill.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_ranks
from distribution_checks import chi_square, logits_with_argmax
from engine_cases import PROMPTS, assert_kv_matches_prefill, options, run
from parallel_cases import tree_levels_layer_parallel_vs_reference

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.options import OptionsError
from easyspec.verify.rejection import verify_greedy
from easyspec.verify.sampling import process_logits
from easyspec.verify.tree import (
    ancestors,
    choose_children,
    path_moves,
    tree_depths,
    tree_mask,
    verify_tree_greedy,
    verify_tree_stochastic,
)
from easyspec.verify.types import Proposal, TreeProposal

SHAPES = [(1, 3), (2, 2), (3, 4), (5, 3)]  # (W, D)


def _random_parents(width: int, depth: int, g: torch.Generator) -> torch.Tensor:
    """Tree-order parents [W * D]: each node's parent is a random node of the level above."""
    parents = [0] * width
    for level in range(1, depth):
        parents += (1 + (level - 1) * width + torch.randint(0, width, (width,), generator=g)).tolist()
    return torch.tensor(parents)


def _path(parents: list[int], t: int) -> set[int]:
    """t and its ancestors, in tree order, by walking up."""
    found = {t}
    while t:
        t = parents[t - 1]
        found.add(t)
    return found


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize(("width", "depth"), SHAPES)
def test_ancestors_and_mask_match_brute_force(width: int, depth: int) -> None:
    g = torch.Generator().manual_seed(width * 10 + depth)
    n = width * depth
    for _ in range(5):
        parents = _random_parents(width, depth, g)
        anc = ancestors(parents, width)
        root, kv_len = 7, 7 + n + 5
        mask = tree_mask(anc, root, kv_len)
        for t in range(1 + n):
            path = _path(parents.tolist(), t)
            assert anc[t].tolist() == [s in path for s in range(1 + n)]
            assert mask[t].tolist() == [s < root or (s - root) in path for s in range(kv_len)]


def test_tree_depths_and_path_moves() -> None:
    assert tree_depths(2, 3).tolist() == [0, 1, 1, 2, 2, 3, 3]
    # Root at slot 10, accepted nodes 1 (slot 12) and 2 (slot 13) move to 11 and 12; depth 3 stays put.
    assert path_moves((1, 2), 10, 3) == ([12, 13, 13], [11, 12, 13])
    assert path_moves((), 10, 2) == ([11, 12], [11, 12])


@pytest.mark.parametrize(("width", "vocab"), [(2, 9), (4, 11), (6, 30)])
def test_greedy_children_are_the_best_by_cumulative_log_prob(width: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    for _ in range(20):
        probs = torch.randn(width, vocab, generator=g).mul(2).softmax(-1)
        scores = torch.randn(width, generator=g)
        if width > 2:
            scores[-1] = -math.inf  # a padding frontier node gets no children
        parent, tokens, child = choose_children(scores, probs, "greedy", None)
        every = sorted(((scores[u] + probs[u, x].log()).item(), u, x) for u in range(width) for x in range(vocab))
        expected = {(u, x) for _, u, x in every[-width:]}
        assert set(zip(parent.tolist(), tokens.tolist(), strict=True)) == expected
        torch.testing.assert_close(child, scores[parent] + probs[parent, tokens].log())
        assert parent.tolist() == sorted(parent.tolist())  # grouped by parent


@pytest.mark.parametrize("rule", ["without-replacement", "with-replacement"])
def test_drawn_children_follow_the_greedy_allocation(rule: str) -> None:
    g = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=1.0, top_k=2)  # a support of 2 tokens per node
    for _ in range(50):
        probs = process_logits(torch.randn(3, 8, generator=g), params)  # [W, V]
        scores = torch.tensor([0.0, -1.0, -math.inf])
        parent, tokens, child = choose_children(scores, probs, rule, g)
        greedy_parent, _, greedy_child = choose_children(scores, probs, "greedy", None)
        # Same number of children per node and same padding as greedy: allocation never looks at the draws.
        assert parent.tolist() == greedy_parent.tolist()
        assert child.isfinite().tolist() == greedy_child.isfinite().tolist()
        valid = child.isfinite()
        assert (probs[parent[valid], tokens[valid]] > 0).all()
        if rule == "without-replacement":
            pairs = list(zip(parent[valid].tolist(), tokens[valid].tolist(), strict=True))
            assert len(set(pairs)) == len(pairs)


# ---------------------------------------------------------------- greedy verification


def test_verify_tree_greedy_takes_the_deepest_matching_path() -> None:
    # W=2, D=2. Root children: nodes 0 (token 3) and 1 (token 5); node 2 (token 6) under
    # node 1 and node 3 (token 7) under node 0. Base argmax: root -> 5, node 1 -> 6, node 2 -> 2.
    tree = TreeProposal(torch.tensor([3, 5, 6, 7]), torch.tensor([0, 0, 2, 1]), torch.ones(4, dtype=torch.bool), 2)
    verdict = verify_tree_greedy(tree, logits_with_argmax([5, 0, 6, 2, 0], vocab=8))
    assert (verdict.tokens, verdict.nodes, verdict.accepted, verdict.num_drafted) == ([5, 6, 2], (1, 2), 2, 2)
    # A padding node never matches, even with the right token.
    padded = TreeProposal(tree.tokens, tree.parents, torch.tensor([True, False, True, True]), 2)
    verdict = verify_tree_greedy(padded, logits_with_argmax([5, 0, 6, 2, 0], vocab=8))
    assert (verdict.tokens, verdict.nodes) == ([5], ())


def test_verify_tree_greedy_on_a_chain_equals_chain_verification() -> None:
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        logits = torch.randn(4, 5, generator=g)  # small V so drafts often match
        draft = torch.randint(0, 5, (3,), generator=g)
        tree = TreeProposal(draft, torch.arange(3), torch.ones(3, dtype=torch.bool), 1)
        chain = verify_greedy(Proposal(draft), logits)
        verdict = verify_tree_greedy(tree, logits)
        assert (verdict.tokens, verdict.accepted) == (chain.tokens, chain.accepted)
        assert verdict.nodes == tuple(range(chain.accepted))


# ---------------------------------------------------------------- stochastic verification

VOCAB = 6
WIDTH, DEPTH = 3, 2
TRIALS = 12_000
START = 0


def _tables(params: SamplingParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft tables [positions, V, V]: row [pos, prev] is the next-token
    distribution after token prev at position pos. The draft is a poor copy, so later
    siblings are often tried and a wrong sibling rule shows."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(DEPTH + 3, VOCAB, VOCAB, generator=g) * 1.5
    draft = target + torch.randn(DEPTH + 3, VOCAB, VOCAB, generator=g) * 2
    return process_logits(target, params), process_logits(draft, params)


def _round(p_table, q_table, pos: int, prev: int, draw: str, verify_with_replacement: bool, g) -> list[int]:
    """Draft a tree after token prev at position pos with rule `draw`, verify it, return the committed tokens."""
    n = WIDTH * DEPTH
    scores = torch.full((WIDTH,), -math.inf)
    scores[0] = 0.0
    probs = q_table[pos, prev].repeat(WIDTH, 1)
    frontier = torch.zeros(WIDTH, dtype=torch.long)
    tokens, parents, valid, q_rows = [], [], [], [q_table[pos, prev][None]]
    for level in range(DEPTH):
        parent, level_tokens, scores = choose_children(scores, probs, draw, g)
        tokens.append(level_tokens)
        parents.append(frontier[parent])
        valid.append(scores.isfinite())
        probs = q_table[pos + level + 1, level_tokens]  # [W, V]
        if level < DEPTH - 1:
            q_rows.append(probs)
        frontier = torch.arange(1 + level * WIDTH, 1 + (level + 1) * WIDTH)
    tokens = torch.cat(tokens)
    p_rows = torch.cat((p_table[pos, prev][None], p_table[pos + tree_depths(WIDTH, DEPTH)[1:], tokens]))
    tree = TreeProposal(tokens, torch.cat(parents), torch.cat(valid), WIDTH, torch.cat(q_rows),
                        replacement=verify_with_replacement)
    assert p_rows.shape[0] == 1 + n
    return verify_tree_stochastic(tree, p_rows, g).tokens


def _first_two(params: SamplingParams, draw: str, verify_with_replacement: bool, seed: int):
    """Counts and targets of the first token [V] and of the first two tokens [V * V]."""
    p_table, q_table = _tables(params, seed)
    g = torch.Generator().manual_seed(seed + 1)
    first, joint = torch.zeros(VOCAB), torch.zeros(VOCAB * VOCAB)
    for _ in range(TRIALS):
        tokens = _round(p_table, q_table, 0, START, draw, verify_with_replacement, g)
        if len(tokens) < 2:  # the next round starts after the first token, at position 1
            tokens = tokens + _round(p_table, q_table, 1, tokens[0], draw, verify_with_replacement, g)[:1]
        first[tokens[0]] += 1
        joint[tokens[0] * VOCAB + tokens[1]] += 1
    target_first = p_table[0, START]
    return first, target_first, joint, (target_first[:, None] * p_table[1]).flatten()


@pytest.mark.parametrize(
    ("params", "draw"),
    [
        (SamplingParams(temperature=1.0), "without-replacement"),
        (SamplingParams(temperature=1.0), "with-replacement"),
        (SamplingParams(temperature=0.8, top_k=2), "without-replacement"),  # padding nodes
        (SamplingParams(temperature=1.0, min_p=0.2), "without-replacement"),  # padding nodes where q is cut
    ],
    ids=["t1-without", "t1-with", "top-k2-without", "min-p-without"],
)
def test_tree_sampling_reproduces_target(params: SamplingParams, draw: str) -> None:
    first, target_first, joint, target_joint = _first_two(params, draw, draw == "with-replacement", seed=10)
    stat, critical = chi_square(first, target_first)
    assert stat < critical, f"first token: chi2={stat:.1f} >= {critical:.1f}"
    stat, critical = chi_square(joint, target_joint)
    assert stat < critical, f"first two tokens: chi2={stat:.1f} >= {critical:.1f}"


@pytest.mark.parametrize(
    ("draw", "verify_with_replacement"),
    [("without-replacement", True), ("greedy", False)],
    ids=["with-rule-on-distinct-draws", "greedy-children-claimed-sampled"],
)
def test_wrong_tree_rules_are_detected(draw: str, verify_with_replacement: bool) -> None:
    """Negative controls: the same statistical check must fail for a rule that does not
    match how the children were drawn."""
    first, target_first, joint, target_joint = _first_two(SamplingParams(temperature=1.0), draw,
                                                          verify_with_replacement, seed=10)
    (stat_first, critical_first), (stat_joint, critical_joint) = (chi_square(first, target_first),
                                                                  chi_square(joint, target_joint))
    assert stat_first > critical_first or stat_joint > critical_joint, (
        f"chi2 {stat_first:.1f} (first, critical {critical_first:.1f}), "
        f"{stat_joint:.1f} (two tokens, critical {critical_joint:.1f})")


# ---------------------------------------------------------------- layer-parallel tree steps


def test_layer_parallel_tree_levels_match_reference(pair_dir):
    """Layer-parallel tree steps on 2 processes: logits and KV (at the nodes' own slots, on both
    ranks) as the serial formulas give them."""
    results = run_ranks(tree_levels_layer_parallel_vs_reference, 2, str(pair_dir / "deep"), "0,1-2,3-4,5,6-7")
    for r in results:
        torch.testing.assert_close(r["ours"], r["ref"], atol=1e-4, rtol=1e-5)
        for ours, ref in zip(r["ours_keys"], r["ref_keys"], strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0]["ours_keys"], results[1]["ours_keys"], strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- engine



@pytest.fixture(scope="module")
def reference(pair_dir):
    with Engine(options(pair_dir)) as engine:
        return [run(engine, p)[0] for p in PROMPTS]


ONE_PROCESS = [
    dict(method="sd", draft="base", tree_width=4, tree_depth=4),  # every path node matches
    dict(method="sd", draft="near", tree_width=2, tree_depth=3),
    dict(method="sd", draft="far", tree_width=3, tree_depth=2),
    dict(method="sd", draft="near", tree_width=8, tree_depth=5),
    dict(method="sd", draft="near", tree_width=4, tree_depth=1),
    dict(method="easyspec", draft="deep", layer_parallel=1, tree_width=3, tree_depth=3),
]


@pytest.mark.parametrize("config", ONE_PROCESS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_one_process_tree_greedy_equals_plain(pair_dir, reference, config):
    depth = config["tree_depth"]
    with Engine(options(pair_dir, **config)) as engine:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            ids, chunk = run(engine, prompt)
            assert ids == expected
            stats = chunk.stats
            assert stats.rounds > 0 and stats.drafted == depth * stats.rounds
            if config["draft"] == "base":
                assert stats.accepted >= depth * (stats.rounds - 1)  # only the last round may be cut short


TWO_PROCESSES = [
    dict(method="sd", draft="near", draft_tp=2, tree_width=2, tree_depth=3),
    dict(method="sd", draft="near", draft_tp=1, tree_width=3, tree_depth=2),
    dict(method="easyspec", draft="deep", tree_width=2, tree_depth=3),
    dict(method="easyspec", draft="deep", parallel_policy="attention+tp-mlp", tree_width=4, tree_depth=2),
]


@pytest.mark.parametrize("config", TWO_PROCESSES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_two_processes_tree_greedy_equals_plain(pair_dir, reference, config):
    with Engine(options(pair_dir, devices=2, **config)) as engine:
        for prompt, expected in zip(PROMPTS[:2], reference[:2], strict=True):
            assert run(engine, prompt)[0] == expected


@pytest.mark.parametrize("sampling", ["without-replacement", "with-replacement"])
def test_tree_sampling_is_seeded_and_stops(pair_dir, sampling):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_new_tokens=16, ignore_eos=True)
    config = dict(method="sd", draft="near", tree_width=3, tree_depth=3, tree_sampling=sampling)
    with Engine(options(pair_dir, **config)) as engine:
        first, chunk = run(engine, PROMPTS[0], params)
        second, _ = run(engine, PROMPTS[0], params)
    assert first == second and len(first) == 16 and chunk.stats.accepted > 0


def test_two_process_tree_sampling_runs_in_step(pair_dir):
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=12, ignore_eos=True)
    with Engine(options(pair_dir, devices=2, method="easyspec", draft="deep", tree_width=2, tree_depth=2)) as engine:
        first, _ = run(engine, PROMPTS[1], params)
        second, _ = run(engine, PROMPTS[1], params)
    assert first == second and len(first) == 12


def test_tree_kv_commit_equals_fresh_prefill(pair_dir):
    """After rounds that accepted nodes off the first branch, the base KV of every token
    committed before the last round equals a fresh prefill: accepted nodes were moved into place."""
    config = dict(method="sd", draft="near", tree_width=3, tree_depth=3)
    with Engine(options(pair_dir, **config)) as engine:
        prompt = PROMPTS[1]
        ids, chunk = run(engine, prompt)
        assert chunk.stats.accepted > 0
        # The last round ended the request, so its nodes were never moved; everything before was.
        fed = prompt + ids[: len(ids) - len(chunk.token_ids)]
        assert_kv_matches_prefill(engine.worker.base, pair_dir / "base", fed, len(fed))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(method="ngram", tree_width=2), "needs a draft model"),
        (dict(method="sd", draft="x", tree_width=2, adaptive_draft=True), "adaptive-draft"),
        (dict(method="sd", draft="x", tree_width=0), "--tree-width must be"),
        (dict(method="sd", draft="x", tree_width=2, tree_depth=40), "--tree-depth must be"),
        (dict(method="sd", draft="x", tree_width=64, tree_depth=8), "nodes"),
        (dict(method="easyspec", draft="x", tree_width=2, calibrate="never"), "every-round"),
        (dict(method="sd", draft="x", tree_sampling="both"), "--tree-sampling"),
    ],
)
def test_tree_options_are_checked(config, message):
    with pytest.raises(OptionsError, match=message):
        EngineOptions(**config).validate()


def test_tree_flags_reach_the_options():
    from easyspec.cli.args import options_from_args
    from easyspec.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--draft", "d", "--method", "sd",
                                      "--tree-width", "4", "--tree-depth", "5"])
    opts = options_from_args(args)
    assert (opts.tree_width, opts.initial_num_draft, opts.tree, opts.draft_room) == (4, 5, True, 21)
    chain = options_from_args(build_parser().parse_args(["generate", "--prompt", "x", "--num-draft", "3"]))
    assert (chain.tree, chain.initial_num_draft, chain.draft_room) == (False, 3, 4)
