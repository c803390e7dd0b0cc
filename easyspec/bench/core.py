"""Every method side by side on the same prompts, Spec-Bench style.

Speedup = mean over prompts of (tokens/s of the method / tokens/s of vanilla).
Mean accepted length counts the bonus token (1.00 for vanilla). Warm-up runs
are excluded; the engine synchronises the device at stage boundaries, so the
per-stage times are real device time. Every method's greedy output is compared
with vanilla's: exact match, or the first position where it diverges.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp

from easyspec.bench.efficiency import weight_mb_per_token
from easyspec.engine.engine import Engine
from easyspec.model.checkpoint import parse_dtype, save_checkpoint
from easyspec.model.config import PRESETS
from easyspec.model.loader import load_config, load_tokenizer
from easyspec.model.transformer import Transformer
from easyspec.options import EngineOptions, SamplingParams
from easyspec.runtime.stats import STAGES

if TYPE_CHECKING:
    from easyspec.bench.concurrency import LevelResult


@dataclass
class MethodSpec:
    """One bench row: a label and the engine options that differ from the base ones."""

    label: str
    changes: dict


@dataclass
class MethodResult:
    label: str
    options: dict
    tokens_per_s: list[float] = field(default_factory=list)  # per prompt (mean over repeats)
    spread: list[float | None] = field(default_factory=list)  # per prompt: (max - min) / mean; None: one run
    outputs: list[list[int]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    speedup: float = 0.0
    divergence: list[int | None] = field(default_factory=list)  # first differing position, None if equal
    ideal_speedup: float | None = None  # easyspec.bench.efficiency; None without stage timers
    weight_mb_per_token: float | None = None

    def mean(self, key: str) -> float:
        return statistics.fmean(s[key] for s in self.stats) if self.stats else 0.0

    def add_prompt(self, category: str, rates: list[float], output: list[int], stats: dict) -> None:
        """One prompt's timed runs (tokens/s each), its last output and stats."""
        mean_rate = statistics.fmean(rates)
        self.tokens_per_s.append(mean_rate)
        self.spread.append((max(rates) - min(rates)) / mean_rate if len(rates) > 1 and mean_rate else None)
        self.outputs.append(output)
        self.stats.append(stats)
        self.categories.append(category)

    def ms_per_token(self, part: str) -> float | None:
        """Milliseconds per generated token of a stage ("prefill", "calibrate", "draft", "verify"),
        of "host" (what no stage timed: the loop, stop checks, broadcasts) or of "other"
        (prefill and host); None for a row without stage timers (the HF baseline)."""
        if not self.stats or not {"prefill_s", "verify_s", "total_s"} <= self.stats[0].keys():
            return None
        parts = {"host": (), "other": ("prefill",)}.get(part, (part,))
        seconds = sum(s[f"{k}_s"] for s in self.stats for k in parts)
        if part in ("host", "other"):
            seconds += sum(s["total_s"] - sum(s[f"{k}_s"] for k in STAGES) for s in self.stats)
        return 1000 * seconds / (sum(s["generated"] for s in self.stats) or 1)

    def decode_ms_per_token(self) -> float | None:
        """Draft + calibrate + verify milliseconds per generated token (prefill and host time left out)."""
        parts = [self.ms_per_token(p) for p in ("draft", "calibrate", "verify")]
        return None if None in parts else sum(parts)

    def spread_text(self) -> str:
        """The largest per-prompt spread as a percentage; '-' when no prompt was run twice."""
        measured = [x for x in self.spread if x is not None]
        return f"{100 * max(measured):.1f}%" if measured else "-"


def split_tree_suffix(item: str) -> tuple[str, dict]:
    """'sd-tp1:tree=4x5' -> ('sd-tp1', {'tree_width': 4, 'tree_depth': 5}); without the suffix, (item, {})."""
    head, sep, shape = item.rpartition(":tree=")
    if not sep:
        return item, {}
    try:
        width, depth = (int(v) for v in shape.split("x"))
    except ValueError:
        raise ValueError(f"bench method {item!r}: write a tree as tree=WxD, e.g. sd-tp1:tree=4x5") from None
    if head not in ("sd-tp1", "sd-tpN") and not head.startswith("easyspec"):
        raise ValueError(f"bench method {item!r}: tree=WxD applies to sd-tp1, sd-tpN and easyspec rows")
    return head, {"tree_width": width, "tree_depth": depth}


def parse_methods(text: str, devices: int) -> list[MethodSpec]:
    """Comma list: vanilla, sd-tp1, sd-tpN, ngram, easyspec[:policy[:calibration[:N]]], hf;
    sd and easyspec rows take a `:tree=WxD` suffix (tree drafting, W nodes per level, depth D)
    or an `:adaptive` one (adaptive draft length)."""
    specs = []
    for written in (t.strip() for t in text.split(",") if t.strip()):
        item, adaptive = written.removesuffix(":adaptive"), written.endswith(":adaptive")
        item, tree = split_tree_suffix(item)
        if adaptive and (tree or not item.startswith(("sd-tp", "easyspec"))):
            raise ValueError(f"bench method {written!r}: adaptive k applies to sd-tp1, sd-tpN and easyspec "
                             "chains, not to trees")
        if item == "vanilla":
            specs.append(MethodSpec("vanilla", {"method": "vanilla"}))
        elif item == "ngram":
            specs.append(MethodSpec("ngram", {"method": "ngram"}))
        elif item == "hf":
            from easyspec.bench.hf import LABEL

            specs.append(MethodSpec(LABEL, {"method": "hf"}))
        elif item == "sd-tp1":
            specs.append(MethodSpec("sd draft TP=1", {"method": "sd", "draft_tp": 1}))
        elif item == "sd-tpN":
            specs.append(MethodSpec(f"sd draft TP={devices}", {"method": "sd", "draft_tp": devices}))
        elif item.startswith("easyspec"):
            parts = item.split(":")
            policy = parts[1] if len(parts) > 1 else "attention"
            calibrate = parts[2] if len(parts) > 2 else "every-round"
            size = int(parts[3]) if len(parts) > 3 else devices
            specs.append(MethodSpec(f"easyspec N={size} {policy} {calibrate}",
                                    {"method": "easyspec", "parallel_policy": policy, "calibrate": calibrate,
                                     "layer_parallel": size}))
        else:
            raise ValueError(f"unknown bench method {item!r}; use vanilla, sd-tp1, sd-tpN, ngram, "
                             "easyspec[:policy[:calibration[:N]]], hf")
        if tree:
            spec = specs[-1]
            specs[-1] = MethodSpec(f"{spec.label} tree {tree['tree_width']}x{tree['tree_depth']}",
                                   {**spec.changes, **tree})
        if adaptive:
            specs[-1] = MethodSpec(f"{specs[-1].label} adaptive k", {**specs[-1].changes, "adaptive_draft": True})
    return specs


@torch.no_grad()
def fill_random_weights(model: Transformer, generator: torch.Generator) -> None:
    """Weights of a real model's scale: norms 1, everything else N(0, 0.02). Timing only."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=generator)


def random_checkpoint(preset: str, folder: Path, dtype: str, device: str, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of a real model shape (timing only: its outputs mean nothing)."""
    if (folder / "config.json").exists():
        return folder
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    with torch.device(device):
        model = Transformer(PRESETS[preset]).to(parse_dtype(dtype))
    fill_random_weights(model, torch.Generator(device).manual_seed(seed))
    save_checkpoint(model, folder, max_shard_bytes=4 << 30)
    del model
    return folder


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_method(spec: MethodSpec, base: EngineOptions, prompts: list[tuple[str, list[int]]],
               params: SamplingParams, repeats: int, warmup: int | None,
               progress: Callable[[str], None] | None = None,
               levels: list[int] | None = None) -> tuple[MethodResult, list[LevelResult]]:
    """Measure one method in a fresh process: every method starts from a clean device and
    process group, and a method that fails or hangs cannot take the others down.
    `progress` is called with a short line after every timed run. With `levels`, the same engine
    then serves the prompts at each concurrency level (easyspec.bench.concurrency; the HF
    baseline has none)."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_method_process, args=(send, spec, base, prompts, params, repeats, warmup, levels))
    proc.start()
    send.close()
    kind, payload = "progress", ""
    while kind == "progress":
        try:
            kind, payload = receive.recv()
        except EOFError:
            kind, payload = "error", f"the benchmark process died (exit code {proc.exitcode})"
        if kind == "progress" and progress is not None:
            progress(payload)
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    if kind == "error":
        raise RuntimeError(f"{spec.label}: {payload}")
    return payload


def _method_process(send, spec, base, prompts, params, repeats, warmup, levels) -> None:
    try:
        def report(line: str) -> None:
            send.send(("progress", line))

        send.send(("ok", _measure(spec, base, prompts, params, repeats, warmup, report, levels)))
    except Exception as err:  # reported by the parent as one line
        send.send(("error", f"{type(err).__name__}: {err}"))
    send.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, which CUDA graphs holding NCCL work can block


def _measure(spec: MethodSpec, base: EngineOptions, prompts: list[tuple[str, list[int]]],
             params: SamplingParams, repeats: int, warmup: int | None, report: Callable[[str], None],
             levels: list[int] | None) -> tuple[MethodResult, list[LevelResult]]:
    if spec.changes["method"] == "hf":
        from easyspec.bench.hf import hf_generate

        result = MethodResult(spec.label, {"method": "hf", "model": base.model, "device": base.device,
                                           "dtype": base.dtype, "devices": 1})
        time_prompts(result, prompts, repeats, warmup, hf_generate(base, params), report)
        return result, []
    options = base.replace(**spec.changes)
    if not options.uses_draft_model:
        options = options.replace(draft=None)
    result = MethodResult(spec.label, dataclasses.asdict(options))
    with Engine(options) as engine:

        def run(ids: list[int]) -> tuple[list[int], float, dict]:
            output, chunk = [], None
            start = time.perf_counter()
            for chunk in engine.generate(ids, params):
                output += chunk.token_ids
            return output, time.perf_counter() - start, chunk.stats.to_dict()

        time_prompts(result, prompts, repeats, warmup, run, report)
        served = []
        if levels:
            from easyspec.bench.concurrency import run_levels  # it imports this module

            served = run_levels(engine, spec.label, [ids for _, ids in prompts], params, levels, warmup != 0,
                                report)
    return result, served


def time_prompts(result: MethodResult, prompts: list[tuple[str, list[int]]], repeats: int, warmup: int | None,
                 run: Callable[[list[int]], tuple[list[int], float, dict]], report: Callable[[str], None]) -> None:
    """Untimed runs of the first `warmup` prompts (all when None), then `repeats` timed runs of each
    prompt into `result`; run(ids) -> (output ids, seconds, stats)."""
    for _, ids in prompts[:warmup]:
        run(ids)
    for i, (category, ids) in enumerate(prompts, start=1):
        rates, output, stats = [], [], {}
        for j in range(1, repeats + 1):
            output, elapsed, stats = run(ids)
            rates.append(len(output) / elapsed)
            report(f"prompt {i}/{len(prompts)} repeat {j}/{repeats} ({category}) {rates[-1]:.1f} tok/s")
        result.add_prompt(category, rates, output, stats)


def summarise(results: list[MethodResult]) -> None:
    """Speedups, ideal speedups and output equality against the vanilla row (which must come first),
    and each row's weight bytes per token."""
    vanilla = results[0]
    vanilla_ms = vanilla.decode_ms_per_token()
    for r in results:
        r.speedup = statistics.fmean(m / v for m, v in zip(r.tokens_per_s, vanilla.tokens_per_s, strict=True))
        r.divergence = [first_divergence(o, v) for o, v in zip(r.outputs, vanilla.outputs, strict=True)]
        ms = r.decode_ms_per_token()
        r.ideal_speedup = vanilla_ms / ms if ms and vanilla_ms else None
        r.weight_mb_per_token = weight_mb_per_token(r.options, r.stats)


def markdown_table(results: list[MethodResult]) -> str:
    head = ("| method | tok/s | speedup | mean accepted length | acceptance | draft ms/tok | calibrate ms/tok "
            "| verify ms/tok | other ms/tok | ideal | of ideal | weight MB/tok | spread | equal to vanilla |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        # A row without stage timers (the HF baseline) shows '-' rather than a zero that looks measured.
        per_tok = {}
        for part in ("draft", "calibrate", "verify", "other"):
            ms = r.ms_per_token(part)
            per_tok[part] = "-" if ms is None else f"{ms:.2f}"
        equal = f"{sum(d is None for d in r.divergence)}/{len(r.divergence)}"
        diverged = [d for d in r.divergence if d is not None]
        if diverged:
            equal += f" (first at token {min(diverged)})"
        # Rows that draft nothing (vanilla, HF) have no acceptance to show.
        acceptance = f"{r.mean('acceptance_rate'):.2f}" if any(s.get("drafted") for s in r.stats) else "-"
        ideal = of_ideal = weight = "-"
        if r.ideal_speedup:
            ideal, of_ideal = f"{r.ideal_speedup:.2f}x", f"{100 * r.speedup / r.ideal_speedup:.0f}%"
        if r.weight_mb_per_token is not None:
            weight = f"{r.weight_mb_per_token:.1f}"
        lines.append(
            f"| {r.label} | {statistics.fmean(r.tokens_per_s):.1f} | {r.speedup:.2f}x "
            f"| {r.mean('mean_accepted_length'):.2f} | {acceptance} "
            f"| {per_tok['draft']} | {per_tok['calibrate']} | {per_tok['verify']} | {per_tok['other']} "
            f"| {ideal} | {of_ideal} | {weight} | {r.spread_text()} | {equal} |"
        )
    return "\n".join(lines)


def by_category(results: list[MethodResult]) -> str:
    cats = sorted(set(results[0].categories))
    lines = ["| method | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    vanilla = results[0]
    for r in results:
        cells = []
        for c in cats:
            ratios = [m / v for m, v, k in zip(r.tokens_per_s, vanilla.tokens_per_s, r.categories, strict=True)
                      if k == c]
            cells.append(f"{statistics.fmean(ratios):.2f}x")
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(results: list[MethodResult], out: Path, meta: dict, extra: dict | None = None) -> str | None:
    """bench.json (meta, every row, and any `extra` sections such as the sweep or the projection)
    and, when matplotlib is installed, bench.png; returns a line saying so when it is not."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [dataclasses.asdict(r) for r in results], **(extra or {})}
    (out / "bench.json").write_text(json.dumps(payload, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{out / 'bench.png'} not written: matplotlib is not installed (pip install matplotlib)"
    labels = [r.label for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = [0.0] * len(results)
    for part in ("prefill", "calibrate", "draft", "verify", "host"):
        vals = [r.ms_per_token(part) or 0.0 for r in results]
        ax1.barh(labels, vals, left=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax1.set_xlabel("ms per generated token")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, frameon=False)  # below: never over a bar
    ax2.barh(labels, [r.speedup for r in results])
    ax2.set_xlabel("speedup over vanilla")
    fig.suptitle(meta.get("title", "easyspec bench"))
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    return None


def load_prompt_ids(engine_options: EngineOptions, prompts_file: str | None, num_prompts: int,
                    prompt_len: int, raw: bool = False) -> list[tuple[str, list[int]]]:
    """Prompts as token ids: from a Spec-Bench jsonl file (first turn, as a user message through the
    chat template when the model has one, or --chat-template's, unless `raw`), or random ids of a fixed length."""
    if prompts_file is None:
        vocab = load_config(engine_options.model).vocab_size
        gen = torch.Generator().manual_seed(0)
        return [("random", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist())
                for _ in range(num_prompts)]
    from easyspec.zoo.prompts import read_prompts

    tokenizer = load_tokenizer(engine_options.model)
    if tokenizer is None:
        raise ValueError(f"{engine_options.model} has no tokenizer.json; bench with random prompts instead")
    if engine_options.chat_template is not None:
        tokenizer.chat_template = Path(engine_options.chat_template).read_text()
    rows = [(p.category, tokenizer.encode_prompt(p.turns[0], raw)) for p in read_prompts(prompts_file)]
    return spread_over_categories(rows, num_prompts)


def spread_over_categories(rows: list[tuple[str, list[int]]], count: int) -> list[tuple[str, list[int]]]:
    """The first `count` rows taken in turn from each category (file order within one), so that
    a short run of a file sorted by category still covers every category."""
    by_category: dict[str, list[tuple[str, list[int]]]] = {}
    for row in rows:
        by_category.setdefault(row[0], []).append(row)
    interleaved = [row for turn in itertools.zip_longest(*by_category.values()) for row in turn if row is not None]
    return interleaved[:count]
