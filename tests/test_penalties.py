"""History-dependent settings (easyspec.verify.penalties): repetition, presence and frequency
penalties and min_tokens, against transformers' processors and brute-force references; each row
of a chain or tree judged by its own history; and seeded chi-square tests that speculative
sampling over chains (sampled and point-mass drafts) and trees reproduces the penalized (and
min-p filtered) target exactly, with a negative control that judges every row by the committed
history alone and must fail."""

from __future__ import annotations

import math

import pytest
import torch
from distribution_checks import chi_square
from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from easyspec.options import SamplingParams
from easyspec.verify.penalties import TokenHistory, apply_history, chain_precedes, row_counts
from easyspec.verify.rejection import verify_stochastic
from easyspec.verify.sampling import process_logits, sample
from easyspec.verify.tree import ancestors, choose_children, tree_depths, verify_tree_stochastic
from easyspec.verify.types import Proposal, TreeProposal

NO_ENDS = torch.zeros(0, dtype=torch.long)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny tensor ops: on one thread each costs microseconds, not a fork and join."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _history(prompt: list[int], output: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[prompt] = True
    return seen, torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    g = torch.Generator().manual_seed(0)
    vocab, prompt, output = 40, [3, 7, 7, 12], [12, 30, 5, 5]
    logits = torch.randn(1, vocab, generator=g) * 3
    seen, counts = _history(prompt, output, vocab)
    ours = apply_history(logits[None], SamplingParams(repetition_penalty=penalty), seen[None], counts[None, None],
                         torch.zeros(1, 1, dtype=torch.long), NO_ENDS)[0]
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("penalty", [1e-40, 1e-320, 1e38])
def test_a_penalty_past_float32_saturates_instead_of_nan(penalty: float) -> None:
    """Any penalty > 0 is valid, but l / 1e-40 overflows float32 to inf (and 1e-320 rounds to 0, dividing by
    zero); inf - inf is NaN in the temperature's shift. A penalized logit saturates at float32's largest
    magnitude instead: the distribution stays finite and only penalized tokens' logits moved."""
    logits = torch.tensor([[2.0, 3.0, -1.0, 1.0, -4.0, 0.5]])
    seen = torch.tensor([True, True, True, False, True, True])
    params = SamplingParams(temperature=0.7, repetition_penalty=penalty, logprobs=2)
    scores = apply_history(logits[None], params, seen[None], torch.zeros(1, 1, 6), torch.zeros(1, 1, dtype=torch.long),
                           NO_ENDS)[0]
    assert not scores.isnan().any() and not scores.isinf().any()
    assert scores[0, 3] == 1.0  # not in the history: untouched
    probs = process_logits(scores, params)
    assert torch.isfinite(probs).all() and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    greedy = process_logits(scores, SamplingParams(repetition_penalty=penalty))
    assert torch.isfinite(greedy).all() and float(greedy.sum()) == 1.0
    # Every token seen, every logit negative: a penalty of 1e38 must not send them all to -inf.
    everything = apply_history(-logits.abs()[None], params, torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 1, 6),
                               torch.zeros(1, 1, dtype=torch.long), NO_ENDS)[0]
    assert torch.isfinite(process_logits(everything, params)).all()


def test_presence_and_frequency_penalties_follow_openai() -> None:
    """logit - frequency * count - presence * (count > 0), over the output only (the prompt's tokens untouched)."""
    g = torch.Generator().manual_seed(1)
    vocab, prompt, output = 20, [1, 2, 3], [3, 4, 4, 4, 9]
    logits = torch.randn(vocab, generator=g)
    seen, counts = _history(prompt, output, vocab)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25)
    ours = apply_history(logits[None], params, seen, counts[None], torch.zeros(1, dtype=torch.long), NO_ENDS)[0]
    want = logits.clone()
    for token in set(output):
        want[token] -= 0.5 + (-0.25) * output.count(token)
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_tokens_masks_the_end_tokens_like_transformers(generated: int) -> None:
    g = torch.Generator().manual_seed(2)
    vocab, prompt_len, ends = 16, 4, [2, 11]
    logits = torch.randn(1, vocab, generator=g)
    ours = apply_history(logits, SamplingParams(min_tokens=3, max_new_tokens=8), None, None,
                         torch.tensor([generated]), torch.tensor(ends))
    ids = torch.zeros(1, prompt_len + generated, dtype=torch.long)
    theirs = MinNewTokensLengthLogitsProcessor(prompt_len, 3, ends)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_row_counts_add_each_rows_drafted_tokens() -> None:
    counts = torch.tensor([1.0, 0, 2, 0, 0])
    drafted = torch.tensor([3, 0, 3])
    rows = row_counts(counts, drafted, chain_precedes(4, 3))  # [4, V]
    want = torch.tensor([[1.0, 0, 2, 0, 0], [1, 0, 2, 1, 0], [2, 0, 2, 1, 0], [2, 0, 2, 2, 0]])
    torch.testing.assert_close(rows, want)
    # A tree: W = 2, D = 2; node 2 (token 4) hangs under node 0, node 3 (token 1) under node 1.
    tokens, parents = torch.tensor([3, 0, 4, 1]), torch.tensor([0, 0, 1, 2])
    tree_rows = row_counts(counts, tokens, ancestors(parents, 2)[:, 1:])  # [1 + N, V]
    want = [[1.0, 0, 2, 0, 0], [1, 0, 2, 1, 0], [2, 0, 2, 0, 0], [1, 0, 2, 1, 1], [2, 1, 2, 0, 0]]
    torch.testing.assert_close(tree_rows, torch.tensor(want))


def test_token_history_rows_equal_sequential_histories() -> None:
    """Row j of a verified chain equals what plain decoding sees after committing drafts 0..j-1."""
    g = torch.Generator().manual_seed(3)
    vocab, prompt, output, drafted = 12, [4, 4, 9], [9, 1], [1, 7, 9]
    params = SamplingParams(repetition_penalty=1.7, presence_penalty=0.3, frequency_penalty=0.4, min_tokens=4,
                            max_new_tokens=10)
    logits = torch.randn(len(drafted) + 1, vocab, generator=g)
    history = TokenHistory(params, prompt, vocab, torch.device("cpu"), end_ids={7, 11})
    history.commit(output)
    rows = history.adjust(logits, torch.tensor(drafted), chain_precedes(len(drafted) + 1, len(drafted)))
    for j in range(len(drafted) + 1):
        plain = TokenHistory(params, prompt, vocab, torch.device("cpu"), end_ids={7, 11})
        plain.commit(output + drafted[:j])
        torch.testing.assert_close(rows[j], plain.adjust(logits[j : j + 1])[0])
    assert math.isinf(rows[1, 7]) and not math.isinf(rows[2, 7])  # 2 + 2 tokens out: min_tokens is met


def test_settings_that_read_no_history_leave_logits_alone() -> None:
    logits = torch.randn(3, 8)
    history = TokenHistory(SamplingParams(temperature=0.7, min_p=0.1), [1, 2], 8, torch.device("cpu"), {2})
    assert not history.active and history.adjust(logits) is logits


# ---------------------------------------------------------------- losslessness, chains

VOCAB = 6
K = 2
TRIALS = 8_000  # the negative controls below fail at 3x the critical value
PROMPT = [3, 1, 3]
END = 5  # min_tokens holds it back


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw target and draft logits [K + 2, V, V]: row [pos, prev] follows token prev at position pos.
    The draft is a noisy copy of the target, so rounds mix accepts and rejections."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(K + 2, VOCAB, VOCAB, generator=g) * 1.5
    return target, target + torch.randn(K + 2, VOCAB, VOCAB, generator=g)


def _process(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor, generated: torch.Tensor,
             drafted: torch.Tensor, precedes: torch.Tensor) -> torch.Tensor:
    """Distributions [T, R, V] of logits [T, R, V] after sequences with output counts [T, V] and
    `generated` [T] tokens out, row r also after the drafted [T, n] tokens precedes[r] marks."""
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[PROMPT] = True
    rows = generated[:, None] + precedes.sum(-1)[None]  # [T, R]
    adjusted = apply_history(logits, params, seen.expand(counts.shape[0], VOCAB),
                             row_counts(counts, drafted, precedes), rows, torch.tensor([END]))
    return process_logits(adjusted, params)


def _speculate(tables, params: SamplingParams, pos: int, prev: torch.Tensor, counts: torch.Tensor,
               generated: torch.Tensor, drafter: str, own_rows: bool, g: torch.Generator) -> list[list[int]]:
    """One round for T sequences after tokens prev [T] at position pos; returns the committed tokens.
    own_rows False judges every row by the committed history alone (the negative control)."""
    target, draft = tables
    trials = prev.shape[0]
    drafted, q_rows, last = torch.zeros(trials, 0, dtype=torch.long), [], prev
    for i in range(K):
        q_i = _process(draft[pos + i, last][:, None], params, counts, generated, drafted,
                       torch.ones(1, i, dtype=torch.bool))[:, 0]  # [T, V]
        last = sample(q_i, g) if drafter == "sampled" else q_i.argmax(dim=-1)
        drafted = torch.cat((drafted, last[:, None]), dim=1)
        q_rows.append(q_i)
    before = torch.cat((prev[:, None], drafted), dim=1)  # [T, K + 1]: the token each row follows
    logits = target[pos + torch.arange(K + 1), before]  # [T, K + 1, V]
    precedes = chain_precedes(K + 1, K) if own_rows else torch.zeros(K + 1, K, dtype=torch.bool)
    p = _process(logits, params, counts, generated, drafted, precedes)
    q = torch.stack(q_rows, dim=1)  # [T, K, V]
    return [verify_stochastic(Proposal(d, None if drafter == "point_mass" else q_j), p_j, g).tokens
            for d, q_j, p_j in zip(drafted, q, p, strict=True)]


def _first_two(params: SamplingParams, drafter: str = "sampled", own_rows: bool = True, seed: int = 10):
    """Counts and exact targets of the first token [V] and of the first two tokens [V * V]."""
    tables = _tables(seed)
    g = torch.Generator().manual_seed(seed + 1)
    start = torch.full((TRIALS,), PROMPT[-1])
    committed = _speculate(tables, params, 0, start, torch.zeros(TRIALS, VOCAB), torch.zeros(TRIALS, dtype=torch.long),
                           drafter, own_rows, g)
    first = torch.tensor([tokens[0] for tokens in committed])
    second = torch.tensor([tokens[1] if len(tokens) > 1 else -1 for tokens in committed])
    short = (second < 0).nonzero().flatten()
    if short.numel():  # a round that committed one token: the next round follows it
        after = first[short]
        follow = _speculate(tables, params, 1, after, torch.nn.functional.one_hot(after, VOCAB).float(),
                            torch.ones(short.numel(), dtype=torch.long), drafter, own_rows, g)
        second[short] = torch.tensor([tokens[0] for tokens in follow])
    target_first, target_joint = _targets(tables[0], params)
    return (torch.bincount(first, minlength=VOCAB), target_first,
            torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB), target_joint)


def _targets(target: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact distributions of the first token [V] and of the first two [V * V], as plain decoding
    draws them: the second after the first was committed (one output token)."""
    none, nothing = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool)
    first = _process(target[0, PROMPT[-1]][None, None], params, torch.zeros(1, VOCAB),
                     torch.zeros(1, dtype=torch.long), none, nothing)[0, 0]
    every = torch.arange(VOCAB)
    second = _process(target[1, every][:, None], params, torch.eye(VOCAB), torch.ones(VOCAB, dtype=torch.long),
                      none.expand(VOCAB, 0), nothing)[:, 0]  # [V, V]: row a follows first token a
    return first, (first[:, None] * second).flatten()


LOSSLESS = [
    (SamplingParams(temperature=1.0, repetition_penalty=2.0), "sampled"),
    (SamplingParams(temperature=0.8, presence_penalty=1.0, frequency_penalty=0.7), "sampled"),
    (SamplingParams(temperature=1.0, min_p=0.15, repetition_penalty=1.5), "sampled"),
    (SamplingParams(temperature=1.0, top_k=4, min_p=0.05, repetition_penalty=0.6), "sampled"),
    (SamplingParams(temperature=1.0, min_tokens=1), "sampled"),
    (SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.5), "point_mass"),
]


@pytest.mark.parametrize(("params", "drafter"), LOSSLESS,
                         ids=["rep2", "presence-frequency", "min-p-rep", "top-k-min-p-rep0.6", "min-tokens",
                              "point-mass-rep-frequency"])
def test_speculative_sampling_reproduces_penalized_target(params: SamplingParams, drafter: str) -> None:
    first, target_first, joint, target_joint = _first_two(params, drafter)
    stat, critical = chi_square(first, target_first)
    assert stat < critical, f"first token: chi2={stat:.1f} >= {critical:.1f}"
    stat, critical = chi_square(joint, target_joint)
    assert stat < critical, f"first two tokens: chi2={stat:.1f} >= {critical:.1f}"
    if params.min_tokens:
        assert target_first[END] == 0 and first[END] == 0 and target_joint.view(VOCAB, VOCAB)[:, END].sum() > 0.01


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, repetition_penalty=3.0),
                                    SamplingParams(temperature=1.0, min_tokens=1)], ids=["rep3", "min-tokens"])
def test_rows_judged_by_the_committed_history_alone_are_detected(params: SamplingParams) -> None:
    """Negative control: a verifier that forgets the draft tokens before each row fails the same check."""
    _, _, joint, target_joint = _first_two(params, own_rows=False)
    stat, critical = chi_square(joint, target_joint)
    assert stat > critical, f"first two tokens: chi2={stat:.1f} <= {critical:.1f}"


# ---------------------------------------------------------------- losslessness, trees

WIDTH, DEPTH = 3, 2
TREE_TRIALS = 5_000


def _tree_round(tables, params: SamplingParams, pos: int, prev: int, output: list[int], g) -> list[int]:
    """Draft a tree (children without replacement) after `prev` at `pos`, every node's q and p processed
    with its own path, and verify it; returns the committed tokens."""
    target, draft = tables
    n = WIDTH * DEPTH
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=VOCAB).float()[None]  # [1, V]
    generated = torch.tensor([len(output)])
    tokens = torch.zeros(n, dtype=torch.long)
    parents = torch.zeros(n, dtype=torch.long)
    nothing = torch.zeros(1, 0, dtype=torch.bool)
    root_q = _process(draft[pos, prev][None, None], params, counts, generated, tokens[None, :0], nothing)[0]  # [1, V]
    probs, q_rows = root_q.repeat(WIDTH, 1), [root_q]
    scores = torch.full((WIDTH,), -math.inf)
    scores[0] = 0.0
    frontier = torch.zeros(WIDTH, dtype=torch.long)
    valid = []
    for level in range(DEPTH):
        nodes = slice(level * WIDTH, (level + 1) * WIDTH)
        parent, tokens[nodes], scores = choose_children(scores, probs, "without-replacement", g)
        parents[nodes] = frontier[parent]
        valid.append(scores.isfinite())
        if level == DEPTH - 1:
            break
        filled = (level + 1) * WIDTH
        anc = ancestors(parents[:filled], WIDTH)  # [1 + filled, 1 + filled]
        rows = slice(1 + level * WIDTH, 1 + filled)
        probs = _process(draft[pos + level + 1, tokens[nodes]][None], params, counts, generated,
                         tokens[None, :filled], anc[rows, 1:])[0]  # [W, V]
        q_rows.append(probs)
        frontier = torch.arange(1 + level * WIDTH, 1 + filled)
    anc = ancestors(parents, WIDTH)
    depths = tree_depths(WIDTH, DEPTH)
    logits = target[pos + depths, torch.cat((torch.tensor([prev]), tokens))]  # [1 + N, V]
    p = _process(logits[None], params, counts, generated, tokens[None], anc[:, 1:])[0]
    tree = TreeProposal(tokens, parents, torch.cat(valid), WIDTH, torch.cat(q_rows))
    return verify_tree_stochastic(tree, p, g).tokens


def test_tree_sampling_reproduces_penalized_target() -> None:
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, presence_penalty=0.5, min_p=0.05)
    tables = _tables(seed=20)
    g = torch.Generator().manual_seed(21)
    first, joint = torch.zeros(VOCAB), torch.zeros(VOCAB * VOCAB)
    for _ in range(TREE_TRIALS):
        tokens = _tree_round(tables, params, 0, PROMPT[-1], [], g)
        if len(tokens) < 2:
            tokens = tokens + _tree_round(tables, params, 1, tokens[0], tokens, g)[:1]
        first[tokens[0]] += 1
        joint[tokens[0] * VOCAB + tokens[1]] += 1
    target_first, target_joint = _targets(tables[0], params)
    stat, critical = chi_square(first, target_first)
    assert stat < critical, f"first token: chi2={stat:.1f} >= {critical:.1f}"
    stat, critical = chi_square(joint, target_joint)
    assert stat < critical, f"first two tokens: chi2={stat:.1f} >= {critical:.1f}"
