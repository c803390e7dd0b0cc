"""Greedy acceptance of a trained pair, measured without the speculative engine.

Under greedy decoding, speculation commits exactly the base model's greedy
continuation, and the draft's i-th proposal in a round is conditioned on
tokens that all matched the base's. So one greedy run of the base, plus one
teacher-forced forward of the draft over prompt + continuation, tell how every
round of chain drafting with k tokens would go: a round accepts the run of
consecutive positions where the draft's argmax equals the base's token (at
most k), then commits one more token from the base (the bonus or correction).
Mean accepted length = 1 + accepted / rounds, as vLLM defines it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from easyspec.model.loader import load_model, load_tokenizer
from easyspec.model.transformer import Transformer
from easyspec.zoo.prompts import Prompt


@torch.no_grad()
def greedy_continuation(model: Transformer, prompt: list[int], max_new: int, eos: Sequence[int]) -> list[int]:
    """The greedy continuation of `prompt`: at most `max_new` ids, ending at an EOS id if one comes."""
    device = model.embed_tokens.weight.device
    cache = model.allocate_cache(len(prompt) + max_new, device)
    positions = torch.arange(len(prompt), device=device)
    logits = model(torch.tensor(prompt, device=device), positions, cache, kv_len=len(prompt), last_only=True)
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + max_new):
        token = int(logits[-1].argmax())  # logits: [1, V]
        out.append(token)
        if token in eos or pos + 1 == len(prompt) + max_new:
            break
        logits = model(torch.tensor([token], device=device), torch.tensor([pos], device=device), cache,
                       kv_len=pos + 1)
    return out


@torch.no_grad()
def draft_matches(draft: Transformer, prompt: list[int], continuation: list[int]) -> list[bool]:
    """matches[j]: the draft's argmax after prompt + continuation[:j] equals continuation[j]."""
    device = draft.embed_tokens.weight.device
    ids = torch.tensor(prompt + continuation[:-1], device=device)  # [P + C - 1]
    logits = draft(ids, torch.arange(len(ids), device=device))  # [P + C - 1, V]
    predicted = logits[len(prompt) - 1:].argmax(-1)  # [C]
    return (predicted == torch.tensor(continuation, device=device)).tolist()


def simulate_rounds(matches: Sequence[bool], k: int) -> tuple[int, int]:
    """(rounds, accepted draft tokens) of greedy chain speculation with k drafts per round."""
    rounds = accepted = i = 0
    while i < len(matches):
        run = 0
        while run < k and i + run < len(matches) and matches[i + run]:
            run += 1
        rounds += 1
        accepted += run
        i += run + 1  # the accepted tokens plus the base's own next token
    return rounds, accepted


def evaluate_pair(base_dir: str | Path, draft_dir: str | Path, prompts: Sequence[Prompt], k: int = 4,
                  max_new_tokens: int = 128, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Greedy acceptance statistics of the pair over the first turn of every prompt."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    tokenizer = load_tokenizer(base_dir)
    if tokenizer is None:
        raise ValueError(f"{base_dir}: no tokenizer.json")
    base = load_model(base_dir, dtype, device)
    draft = load_model(draft_dir, dtype, device)
    eos = base.config.eos_token_ids
    totals: dict[str, list[int]] = {}  # category -> [rounds, accepted, matched, generated]
    for prompt in prompts:
        ids = tokenizer.encode(prompt.turns[0])
        continuation = greedy_continuation(base, ids, max_new_tokens, eos)
        matches = draft_matches(draft, ids, continuation)
        rounds, accepted = simulate_rounds(matches, k)
        for key in (prompt.category, "all"):
            row = totals.setdefault(key, [0, 0, 0, 0])
            for j, value in enumerate((rounds, accepted, sum(matches), len(matches))):
                row[j] += value

    def summary(row: list[int]) -> dict[str, Any]:
        rounds, accepted, matched, generated = row
        return {"mean_accepted_length": 1 + accepted / rounds, "top1_agreement": matched / generated,
                "rounds": rounds, "accepted": accepted, "generated_tokens": generated}

    result = {"k": k, "max_new_tokens": max_new_tokens, "prompts": len(prompts), **summary(totals.pop("all"))}
    result["by_category"] = {name: summary(row) for name, row in sorted(totals.items())}
    return result
