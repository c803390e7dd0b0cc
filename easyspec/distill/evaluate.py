"""Greedy acceptance of drafts on one device, layer-parallel drafting included.

Under greedy decoding speculation commits exactly the base's greedy
continuation, so the base's side of every round is known in advance: one
batched greedy run of the base per prompt gives it. Each round then asks the
drafter for k tokens and accepts the leading ones that equal the continuation,
plus one token from it (the bonus or the correction) - what greedy
verification decides. The drafters are the engine's own (ModelDrafter with its
calibration, NgramDrafter), run by the engine's ModelRunner; rounds, EOS and
the token budget are counted as the engine counts them, so the statistics are
the ones `easyspec generate` reports for the same prompt (a test checks this
against the engine, with 2 processes for layer-parallel drafting).

Layer-parallel drafting with N ranks runs here as LocalLayerParallelForward:
every group member on this one device, the function N ranks compute together.
Its acceptance is that of N devices; its speed is not measured.

Every row measures the prompts in the same order, one prompt at a time, so a
time limit leaves rows that compare (the CLI takes the categories in turn, so
that a cut-short run still covers each one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from easyspec.distill.generate import generate
from easyspec.draft.base import Drafter
from easyspec.draft.model import ModelDrafter
from easyspec.draft.ngram import NgramDrafter
from easyspec.engine.decision import settle
from easyspec.model import kernels
from easyspec.model.loader import eos_ids, load_config, load_model, load_tokenizer
from easyspec.model.transformer import Transformer
from easyspec.options import Calibration, ParallelPolicy, SamplingParams
from easyspec.parallel.layer_parallel import LayerLayout, LocalLayerParallelForward
from easyspec.runtime.runner import LAYER_PARALLEL, ModelRunner
from easyspec.runtime.stats import SpecStats, StageTimer
from easyspec.verify.penalties import TokenHistory
from easyspec.verify.types import Verdict
from easyspec.zoo.prompts import Prompt

GREEDY = SamplingParams()


@dataclass
class Case:
    """One prompt with the base's greedy continuation, k tokens past the budget (EOS not stopping it)."""

    prompt: Prompt
    ids: list[int]
    continuation: list[int]


@dataclass
class Row:
    label: str
    draft: str | None
    method: str  # "sd", "easyspec" or "ngram"
    layer_parallel: int = 1
    layout: str = ""
    stats: SpecStats = field(default_factory=SpecStats)
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    by_category: dict[str, SpecStats] = field(default_factory=dict)

    def add(self, case: Case, stats: SpecStats) -> None:
        for total in (self.stats, self.by_category.setdefault(case.prompt.category, SpecStats())):
            total.rounds += stats.rounds
            total.drafted += stats.drafted
            total.accepted += stats.accepted
            total.generated += stats.generated
            for name in ("accepted_per_position", "accepted_histogram"):
                mine, theirs = getattr(total, name), getattr(stats, name)
                mine.extend([0] * (len(theirs) - len(mine)))
                for i, count in enumerate(theirs):
                    mine[i] += count
        self.per_prompt.append({"question_id": case.prompt.question_id, "category": case.prompt.category,
                                "rounds": stats.rounds, "accepted": stats.accepted, "generated": stats.generated})

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats.to_dict()
        keep = ("rounds", "drafted", "accepted", "generated", "mean_accepted_length", "acceptance_rate",
                "accepted_per_position", "accepted_histogram")
        return {"label": self.label, "draft": self.draft, "method": self.method,
                "layer_parallel": self.layer_parallel, "layout": self.layout,
                "emulated": self.layer_parallel > 1, **{k: stats[k] for k in keep},
                "by_category": {c: {"mean_accepted_length": round(s.mean_accepted_length, 4),
                                    "acceptance_rate": round(s.acceptance_rate, 4), "rounds": s.rounds}
                                for c, s in sorted(self.by_category.items())},
                "per_prompt": self.per_prompt}


def continue_prompts(base: Transformer, prompts: Sequence[Prompt], ids: Sequence[list[int]], k: int, max_new: int,
                     batch_size: int) -> list[Case]:
    """Each prompt with the base's greedy continuation: max_new + k tokens, EOS not stopping it, since
    the last round may draft k tokens past the budget and the base verifies them all."""
    continuations = generate(base, ids, max_new + k, GREEDY, batch_size)
    return [Case(p, list(i), c) for p, i, c in zip(prompts, ids, continuations, strict=True)]


def base_cases(base_path: str, prompts: Sequence[Prompt], k: int, max_new: int, device: str, dtype: torch.dtype,
               batch_size: int) -> tuple[list[Case], list[int]]:
    """Every prompt (first turn, through the chat template) with the base's greedy continuation,
    and the ids that end a reply."""
    tokenizer = load_tokenizer(base_path)
    if tokenizer is None:
        raise ValueError(f"{base_path}: no tokenizer.json; acceptance is measured on text prompts")
    base = load_model(base_path, dtype, device)
    ids = [tokenizer.encode_prompt(p.turns[0]) for p in prompts]
    return continue_prompts(base, prompts, ids, k, max_new, batch_size), eos_ids(base.config, tokenizer)


# A drafter for one prompt, given the request's history of committed tokens (as the engine's).
DrafterFor = Callable[[TokenHistory], Drafter]


def run_rounds(drafter_for: DrafterFor, case: Case, k: int, params: SamplingParams, eos: set[int], vocab: int,
               device: torch.device) -> SpecStats:
    """The engine's greedy loop for one prompt, with the base's tokens read from the continuation,
    each round settled by the engine's own rule (EOS, the token budget) and committed to the
    request's history as the engine commits it."""
    stats = SpecStats()
    timer = StageTimer(stats, device, synchronize=False)
    history = TokenHistory(params, case.ids, vocab, device, set() if params.ignore_eos else eos)
    cont = case.continuation
    decision = settle(cont[:1], 0, (), params, 0, eos, None, False)  # the prefill's token
    stats.generated = len(decision.tokens)
    history.commit(decision.tokens)
    if decision.finished:
        return stats
    drafter = drafter_for(history)
    drafter.start(case.ids, cont[0], timer)
    while True:
        drafted = drafter.propose(k, timer).tokens.tolist()
        done, accepted = stats.generated, 0
        while accepted < len(drafted) and drafted[accepted] == cont[done + accepted]:
            accepted += 1
        decision = settle(cont[done:done + accepted + 1], accepted, (), params, done, eos, None, False)
        stats.record_round(len(drafted), decision.accepted)
        stats.generated += len(decision.tokens)
        history.commit(decision.tokens)
        if decision.finished:
            return stats
        drafter.observe(Verdict(decision.accepted, decision.tokens, len(drafted)))


def measure(base_path: str, drafts: Sequence[tuple[str, str]], prompts: Sequence[Prompt], k: int = 4,
            max_new: int = 128, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 64,
            log: Callable[[str], None] = lambda _: None, **drafting: Any) -> list[Row]:
    """Rows for text prompts: the base's continuations first, then `measure_cases`."""
    cases, stops = base_cases(base_path, prompts, k, max_new, device, dtype, batch_size)
    log(f"base: greedy continuations of {len(cases)} prompts")
    return measure_cases(cases, stops, load_config(base_path).vocab_size, drafts, k=k, max_new=max_new,
                         device=device, dtype=dtype, log=log, **drafting)


def measure_cases(cases: Sequence[Case], stops: Sequence[int], vocab: int, drafts: Sequence[tuple[str, str]],
                  k: int = 4, sizes: Sequence[int] = (), keep_first: int = 1, keep_last: int = 1,
                  groups: str | None = None, policy: str = ParallelPolicy.ATTENTION,
                  calibrate: str = Calibration.EVERY_ROUND, ngram: bool = False, max_new: int = 128,
                  ignore_eos: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  fused: bool = True, deadline: float | None = None, log: Callable[[str], None] = lambda _: None,
                  on_prompt: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Per draft (name, folder) a row drafting sequentially (sd), then one drafting layer-parallel at each
    size in `sizes` (emulated on this device); then the ngram drafter's if asked.

    Prompts are the outer loop, and `on_prompt(rows)` sees the rows after each one. Past `deadline`
    (time.monotonic()) the measurement ends, the prompt in progress dropped, so that every row has
    measured the same prompts."""
    dev = torch.device(device)
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
    eos = set(stops)
    max_len = max(len(c.ids) for c in cases) + max_new + k + 1
    graphs = dev.type == "cuda"
    kernels.use_fused(fused and graphs)  # on a GPU, as the engine runs drafts unless told otherwise
    try:
        rows: list[tuple[Row, DrafterFor]] = []  # each row with a new drafter per prompt
        for name, folder in drafts:
            model = load_model(folder, dtype, device)
            if model.config.vocab_size != vocab:
                raise ValueError(f"{folder}: the draft's vocabulary ({model.config.vocab_size}) differs from "
                                 f"the base's ({vocab}); use a draft of the base's tokenizer")
            runner = ModelRunner(model, max_len, graphs)
            rows.append((Row(f"{name} sd", name, "sd"), partial(ModelDrafter, runner, params, None, k)))
            for size in sizes:
                layout = LayerLayout.choose(groups, model.config.num_layers, size, keep_first, keep_last)
                runner = ModelRunner(model, max_len, graphs,
                                     steps={LAYER_PARALLEL: LocalLayerParallelForward(model, layout, policy)})
                rows.append((Row(f"{name} easyspec N={size} (emulated)", name, "easyspec", size, str(layout)),
                             partial(ModelDrafter, runner, params, None, k, layer_parallel=True,
                                     calibrate=calibrate)))
        if ngram:
            rows.append((Row("ngram", None, "ngram"), lambda _: NgramDrafter(dev)))
        for done, case in enumerate(cases):
            # A prompt counts once every row has measured it; one the time limit cuts short is dropped.
            results = []
            for _, drafter in rows:
                if deadline is not None and time.monotonic() > deadline:
                    break
                results.append(run_rounds(drafter, case, k, params, eos, vocab, dev))
            if len(results) < len(rows):
                log(f"time limit: stopped after {done} of {len(cases)} prompts")
                break
            for (row, _), stats in zip(rows, results, strict=True):
                row.add(case, stats)
            if on_prompt is not None:
                on_prompt([row for row, _ in rows])
            if (done + 1) % 10 == 0 or done + 1 == len(cases):
                log(f"{done + 1}/{len(cases)} prompts: mean accepted length "
                    + ", ".join(f"{row.label} {row.stats.mean_accepted_length:.3f}" for row, _ in rows))
    finally:
        kernels.use_fused(False)
    return [row for row, _ in rows]


def table(rows: Sequence[Row]) -> str:
    """Markdown: each row's acceptance, and its change against the same draft drafting sequentially."""
    sequential = {r.draft: r.stats.mean_accepted_length for r in rows if r.method == "sd"}
    lines = ["| drafting | mean accepted length | acceptance rate | vs sequential | rounds | tokens |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ref = sequential.get(r.draft) if r.method == "easyspec" else None
        change = f"{100 * (r.stats.mean_accepted_length / ref - 1):+.1f}%" if ref else "-"
        lines.append(f"| {r.label} | {r.stats.mean_accepted_length:.3f} | {r.stats.acceptance_rate:.3f} | "
                     f"{change} | {r.stats.rounds} | {r.stats.generated} |")
    return "\n".join(lines)
