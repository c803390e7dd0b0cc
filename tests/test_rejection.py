"""Tests for easyspec.verify.rejection: greedy and stochastic verification."""

from __future__ import annotations

import pytest
import torch
from distribution_checks import chi_square, logits_with_argmax

from easyspec.options import SamplingParams
from easyspec.verify.rejection import verify_greedy, verify_stochastic
from easyspec.verify.sampling import process_logits, sample
from easyspec.verify.types import Proposal, Verdict


def _tokens(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------- types


def test_verdict_properties_and_validation() -> None:
    verdict = Verdict(accepted=2, tokens=[5, 6, 7], num_drafted=2)
    assert verdict.all_accepted and verdict.num_committed == 3 and verdict.rejected == 0
    partial = Verdict(accepted=1, tokens=[5, 9], num_drafted=3)
    assert not partial.all_accepted and partial.rejected == 2
    with pytest.raises(ValueError, match="accepted \\+ 1"):
        Verdict(accepted=1, tokens=[5], num_drafted=3)
    with pytest.raises(ValueError, match="accepted must be in"):
        Verdict(accepted=4, tokens=[1, 2, 3, 4, 5], num_drafted=3)


def test_proposal_shape_validation() -> None:
    with pytest.raises(ValueError, match="1-D"):
        Proposal(tokens=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="\\[k, V\\]"):
        Proposal(tokens=_tokens([1, 2]), probs=torch.rand(3, 5))
    with pytest.raises(ValueError, match="k \\+ 1"):
        verify_greedy(Proposal(tokens=_tokens([1, 2])), torch.randn(2, 5))
    with pytest.raises(ValueError, match="vocab"):
        verify_stochastic(Proposal(_tokens([1]), torch.rand(1, 5)), torch.rand(2, 6), None)


# ---------------------------------------------------------------- verify_greedy


@pytest.mark.parametrize(
    ("draft", "argmaxes", "accepted", "committed"),
    [
        ([2, 5, 1], [2, 5, 1, 7], 3, [2, 5, 1, 7]),  # all accepted, 7 is the bonus
        ([2, 5, 1], [4, 5, 1, 7], 0, [4]),  # first rejected, 4 recovered
        ([2, 5, 1], [2, 5, 3, 7], 2, [2, 5, 3]),  # last rejected
        ([2, 5, 1], [2, 0, 1, 7], 1, [2, 0]),  # later matches do not count
        ([], [6], 0, [6]),  # empty draft: plain greedy decoding
    ],
)
def test_verify_greedy(draft: list[int], argmaxes: list[int], accepted: int, committed: list[int]) -> None:
    verdict = verify_greedy(Proposal(_tokens(draft)), logits_with_argmax(argmaxes, vocab=8))
    assert verdict == Verdict(accepted=accepted, tokens=committed, num_drafted=len(draft))


# ---------------------------------------------------------------- verify_stochastic


def test_identical_distributions_accept_everything() -> None:
    g = torch.Generator().manual_seed(0)
    p = process_logits(torch.randn(4, 10, generator=g), SamplingParams(temperature=1.0))  # [4, V]
    for _ in range(200):
        draft = sample(p[:3], g)  # [3]
        verdict = verify_stochastic(Proposal(draft, p[:3].clone()), p, g)
        assert verdict.all_accepted
        assert verdict.tokens[:3] == draft.tolist()
        assert p[3, verdict.tokens[3]] > 0


def test_disjoint_supports_reject_first_and_recover_from_target() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.zeros(3, 6)
    p[:, :3] = torch.tensor([0.5, 0.3, 0.2])  # target lives on tokens 0..2
    q = torch.zeros(2, 6)
    q[:, 3:] = torch.tensor([0.2, 0.3, 0.5])  # draft lives on tokens 3..5
    counts = torch.zeros(6)
    for _ in range(3000):
        verdict = verify_stochastic(Proposal(sample(q, g), q), p, g)
        assert verdict.accepted == 0
        counts[verdict.tokens[0]] += 1
    stat, critical = chi_square(counts, p[0])
    assert stat < critical


def test_point_mass_draft() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],  # target certain of the draft: always accepted
            [0.0, 0.0, 0.6, 0.4],  # draft token 1 impossible: always rejected
            [0.25, 0.25, 0.25, 0.25],
        ]
    )
    for _ in range(200):
        verdict = verify_stochastic(Proposal(_tokens([1, 1])), p, g)
        assert verdict.accepted == 1
        assert verdict.tokens[0] == 1 and verdict.tokens[1] in (2, 3)


def test_point_mass_residual_excludes_draft_token() -> None:
    g = torch.Generator().manual_seed(3)
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    accepted = 0
    for _ in range(2000):
        verdict = verify_stochastic(Proposal(_tokens([0])), p, g)
        if verdict.accepted == 0:
            assert verdict.tokens[0] != 0  # recovered from p with the draft zeroed
        accepted += verdict.accepted
    assert abs(accepted / 2000 - 0.5) < 0.05  # acceptance rate is p(x) = 0.5


def test_empty_draft_samples_from_target() -> None:
    p = torch.nn.functional.one_hot(torch.tensor([4]), 9).float()  # [1, V]
    verdict = verify_stochastic(Proposal(torch.empty(0, dtype=torch.long)), p, None)
    assert verdict == Verdict(accepted=0, tokens=[4], num_drafted=0)


def test_greedy_params_make_stochastic_match_greedy() -> None:
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        logits = torch.randn(4, 5, generator=g)  # [k + 1, V], small V so drafts often match
        draft = torch.randint(0, 5, (3,), generator=g)
        one_hot = process_logits(logits, SamplingParams())
        proposal = Proposal(draft)
        assert verify_stochastic(proposal, one_hot, g) == verify_greedy(proposal, logits)


def test_seeded_and_fixed_generator_consumption() -> None:
    g = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=1.0)
    p = process_logits(torch.randn(4, 7, generator=g), params)
    q = process_logits(torch.randn(3, 7, generator=g), params)
    draft = sample(q, g)
    proposal = Proposal(draft, q)
    assert verify_stochastic(proposal, p, torch.Generator().manual_seed(9)) == verify_stochastic(
        proposal, p, torch.Generator().manual_seed(9)
    )
    # Different outcomes (full accept vs immediate reject) must advance the
    # generator identically, so later draws do not depend on earlier verdicts.
    g_accept, g_reject = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert verify_stochastic(Proposal(draft, p[:3].clone()), p, g_accept).all_accepted
    impossible = p.clone()
    impossible[0, draft[0]] = 0.0
    assert verify_stochastic(proposal, impossible, g_reject).accepted == 0
    assert torch.equal(g_accept.get_state(), g_reject.get_state())


# ---------------------------------------------------------------- losslessness

VOCAB = 6
K = 2
TRIALS = 20_000
START = 0  # token preceding the first generated position


def _markov_tables(params: SamplingParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft tables P, Q [K + 2, V, V]: row [pos, prev] is the
    distribution of the token at pos given the previous token, so each position
    depends on what was committed before it. The draft is a noisy copy of the
    target, which gives a mix of accepts and rejections."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(K + 2, VOCAB, VOCAB, generator=g) * 1.5
    draft_logits = target_logits + torch.randn(K + 2, VOCAB, VOCAB, generator=g)
    return process_logits(target_logits, params), process_logits(draft_logits, params)


def _speculate(
    p_table: torch.Tensor,
    q_table: torch.Tensor,
    pos: int,
    prev: torch.Tensor,
    drafter: str,
    g: torch.Generator,
) -> list[list[int]]:
    """One draft-then-verify round at position pos for a batch of sequences whose
    previous token is prev [n]; returns each sequence's committed tokens."""
    drafts, q_rows, p_rows = [], [], [p_table[pos, prev]]
    last = prev
    for i in range(K):
        q_i = q_table[pos + i, last]  # [n, V]
        last = sample(q_i, g) if drafter == "sampled" else q_i.argmax(dim=-1)  # [n]
        drafts.append(last)
        q_rows.append(q_i)
        p_rows.append(p_table[pos + i + 1, last])
    draft = torch.stack(drafts, dim=1)  # [n, K]
    q = torch.stack(q_rows, dim=1)  # [n, K, V]
    p = torch.stack(p_rows, dim=1)  # [n, K + 1, V]
    # "point_mass" declares its deterministic drafts honestly (probs=None);
    # "argmax_shortcut" drafts the argmax but claims it was sampled from q.
    q_each = [None] * len(prev) if drafter == "point_mass" else q.unbind(0)
    return [
        verify_stochastic(Proposal(d, q_j), p_j, g).tokens
        for d, q_j, p_j in zip(draft.unbind(0), q_each, p.unbind(0), strict=True)
    ]


def _first_two_tokens(params: SamplingParams, drafter: str, seed: int):
    """Run TRIALS generations of two tokens with speculation and return
    (first-token counts [V], target [V], joint counts [V*V], joint target [V*V])."""
    p_table, q_table = _markov_tables(params, seed)
    g = torch.Generator().manual_seed(seed + 1)
    committed = _speculate(p_table, q_table, 0, torch.full((TRIALS,), START), drafter, g)
    first = torch.tensor([tokens[0] for tokens in committed])  # [TRIALS]
    second = torch.full((TRIALS,), -1)
    short = [j for j, tokens in enumerate(committed) if len(tokens) < 2]
    for j, tokens in enumerate(committed):
        if len(tokens) >= 2:
            second[j] = tokens[1]
    if short:
        # A round that committed one token is followed by a new round at the
        # next position, conditioned on that token.
        idx = torch.tensor(short)
        follow = _speculate(p_table, q_table, 1, first[idx], drafter, g)
        second[idx] = torch.tensor([tokens[0] for tokens in follow])
    target_first = p_table[0, START]  # [V]
    target_joint = target_first[:, None] * p_table[1]  # [V, V]: P(a) * P(b | a)
    return (
        torch.bincount(first, minlength=VOCAB),
        target_first,
        torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB),
        target_joint.flatten(),
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, min_p=0.2),
    ],
    ids=["t1", "t0.7-p0.9", "k3", "min-p0.2"],
)
def test_speculative_sampling_reproduces_target(params: SamplingParams) -> None:
    first, target_first, joint, target_joint = _first_two_tokens(params, "sampled", seed=10)
    stat, critical = chi_square(first, target_first)
    assert stat < critical, f"first token: chi2={stat:.1f} >= {critical:.1f}"
    stat, critical = chi_square(joint, target_joint)
    assert stat < critical, f"first two tokens: chi2={stat:.1f} >= {critical:.1f}"


def test_point_mass_drafts_are_lossless() -> None:
    params = SamplingParams(temperature=1.0)
    first, target_first, joint, target_joint = _first_two_tokens(params, "point_mass", seed=20)
    stat, critical = chi_square(first, target_first)
    assert stat < critical, f"first token: chi2={stat:.1f} >= {critical:.1f}"
    stat, critical = chi_square(joint, target_joint)
    assert stat < critical, f"first two tokens: chi2={stat:.1f} >= {critical:.1f}"


def test_argmax_draft_shortcut_is_detected() -> None:
    """Negative control: the statistical check above must be able to fail."""
    params = SamplingParams(temperature=1.0)
    first, target_first, joint, target_joint = _first_two_tokens(params, "argmax_shortcut", seed=10)
    stat, critical = chi_square(first, target_first)
    assert stat > critical, f"first token: chi2={stat:.1f} <= {critical:.1f}"
    stat, critical = chi_square(joint, target_joint)
    assert stat > critical, f"first two tokens: chi2={stat:.1f} <= {critical:.1f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verifiers_run_on_cuda_tensors() -> None:
    params = SamplingParams(temperature=1.0)
    g_cpu = torch.Generator().manual_seed(30)
    logits = torch.randn(4, 9, generator=g_cpu)  # [k + 1, V]
    p = process_logits(logits, params).cuda()
    q = process_logits(torch.randn(3, 9, generator=g_cpu), params).cuda()
    g = torch.Generator(device="cuda").manual_seed(31)
    draft = sample(q, g)  # [3], on the GPU
    proposal = Proposal(draft, q)

    cpu_proposal = Proposal(draft.cpu())
    assert verify_greedy(Proposal(draft), logits.cuda()) == verify_greedy(cpu_proposal, logits)
    assert verify_stochastic(Proposal(draft, p[:3].clone()), p, g).all_accepted
    state = g.get_state()
    verdict = verify_stochastic(proposal, p, g)
    after = g.get_state()
    g.set_state(state)
    assert verify_stochastic(proposal, p, g) == verdict
    assert torch.equal(g.get_state(), after)
    assert all(p[i, token] > 0 for i, token in enumerate(verdict.tokens))
