"""`easyspec bench --concurrency 1,2,4,8,16`: each method's engine serving several requests at once.

At level C the bench keeps C requests in flight on the method's one Engine (closed loop, as a
client pool of C would: the first C prompts are added at once, then a new prompt is added right
after the step that finished one, until the level's prompts are done) and measures

- tokens/s: every token the level's requests generated, over the wall time from the first
  add_request to the step that returned the last request's final output;
- TTFT: from a request's add_request to the step that returned its first token (the wait for a
  slot and the prefill's chunks included);
- inter-token latency (ITL), per token: the time between two outputs of a request that carry
  tokens, divided by the tokens the later one carries, counted once for each of them (an output
  of 4 tokens 20 ms after the previous one gives four samples of 5 ms), so that a speculative
  round's tokens are not counted as free, nor its wait as the wait of every token;
- mean accepted length (mean over requests, as in the main table), and how many outputs equal
  the method's outputs served alone (the main table's run of the same prompts).

Speedup: tokens/s over vanilla's at the same level; "x level 1": over the same method's level 1.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from easyspec.bench.core import MethodResult, first_divergence
from easyspec.engine.engine import Engine
from easyspec.engine.request import Chunk
from easyspec.options import SamplingParams

ITL_NOTE = ("per token: the time between two outputs of a request that carry tokens, divided by the tokens "
            "of the later one, counted once per token")


def parse_levels(text: str) -> list[int]:
    """'1,2,4,8,16' -> [1, 2, 4, 8, 16]: whole numbers >= 1, each once, in increasing order."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or levels != sorted(set(levels)):
        raise ValueError(f"--concurrency takes increasing whole numbers >= 1, comma-separated, e.g. 1,2,4,8,16; "
                         f"got {text!r}")
    return levels


@dataclass
class LevelResult:
    """One method at one concurrency level; per-request lists are in prompt order."""

    level: int
    label: str
    requests: int
    generated: int  # tokens in every output the level's requests got
    wall_s: float
    tokens_per_s: float
    ttft_ms: list[float]
    ttft_p50_ms: float
    itl_p50_ms: float | None  # None: no request got a second output
    itl_p99_ms: float | None
    mean_accepted_length: float
    finish_reasons: list[str | None]
    outputs: list[list[int]]
    stats: list[dict]
    speedup: float | None = None  # over vanilla at the same level (summarise_levels)
    scaling: float | None = None  # over the same method's level 1, when level 1 was run
    divergence: list[int | None] = field(default_factory=list)  # first position differing from alone; None: equal


@dataclass
class Trace:
    """What one request's outputs said, and when the step that returned each ended."""

    added: float
    first: float | None = None  # the first output that carried tokens
    last: float = 0.0  # the latest output that carried tokens
    tokens: list[int] = field(default_factory=list)
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the previous, tokens) per output
    finish_reason: str | None = None
    stats: dict = field(default_factory=dict)

    def record(self, chunk: Chunk, now: float) -> None:
        if chunk.token_ids:
            if self.first is None:
                self.first = now
            else:
                self.gaps.append((now - self.last, len(chunk.token_ids)))
            self.last = now
            self.tokens += chunk.token_ids
        if chunk.finished:
            self.finish_reason = chunk.finish_reason
            self.stats = chunk.stats.to_dict()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linear between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def serve_level(engine: Engine, prompts: list[list[int]], params: SamplingParams, level: int,
                label: str = "") -> LevelResult:
    """Run every prompt with at most `level` requests in flight; a failed request or one the engine
    drops without a final output raises RuntimeError."""
    traces: list[Trace] = []
    running: dict[int, int] = {}  # request id -> prompt index
    start = time.perf_counter()

    def admit() -> None:
        if len(traces) < len(prompts):
            traces.append(Trace(time.perf_counter()))
            running[engine.add_request(prompts[len(traces) - 1], params)] = len(traces) - 1

    for _ in range(level):
        admit()
    while running:
        if not engine.has_unfinished():
            raise RuntimeError(f"concurrency {level}: the engine has nothing left to run, yet {len(running)} "
                               "request(s) got no final output")
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            index = running[out.request_id]
            if out.error is not None:
                raise RuntimeError(f"concurrency {level}: prompt {index + 1} failed: {out.error}")
            traces[index].record(out.chunk, now)
            if out.chunk.finished:
                del running[out.request_id]
                admit()
    return level_result(level, label, traces, time.perf_counter() - start)


def level_result(level: int, label: str, traces: list[Trace], wall_s: float) -> LevelResult:
    """The level's figures from its requests' traces (in prompt order) and its wall time."""
    ttft = [1000 * (t.first - t.added) for t in traces if t.first is not None]
    itl = [1000 * gap / n for t in traces for gap, n in t.gaps for _ in range(n)]
    generated = sum(len(t.tokens) for t in traces)
    return LevelResult(
        level=level, label=label, requests=len(traces), generated=generated, wall_s=wall_s,
        tokens_per_s=generated / wall_s if wall_s > 0 else 0.0, ttft_ms=ttft,
        ttft_p50_ms=percentile(ttft, 50) or 0.0, itl_p50_ms=percentile(itl, 50), itl_p99_ms=percentile(itl, 99),
        mean_accepted_length=statistics.fmean(t.stats.get("mean_accepted_length", 0.0) for t in traces),
        finish_reasons=[t.finish_reason for t in traces], outputs=[t.tokens for t in traces],
        stats=[t.stats for t in traces])


def run_levels(engine: Engine, label: str, prompts: list[list[int]], params: SamplingParams, levels: list[int],
               warm: bool, report: Callable[[str], None]) -> list[LevelResult]:
    """Every level in turn on the same engine (its CUDA graphs captured once for all). When `warm`,
    each level is timed after an untimed wave of as many prompts as it keeps in flight: the batch
    sizes and contexts the level meets are captured before it is timed, at the cost of about one
    request's time per level."""
    if engine.options.max_num_seqs < max(levels):
        raise RuntimeError(f"the engine decodes at most {engine.options.max_num_seqs} sequences together, fewer "
                           f"than --concurrency {max(levels)}")
    results = []
    for level in levels:
        if warm:
            serve_level(engine, prompts[:level], params, level)
        results.append(serve_level(engine, prompts, params, level, label))
        report(f"concurrency {level}: {results[-1].tokens_per_s:.1f} tok/s")
    return results


def summarise_levels(rows: list[LevelResult], alone: list[MethodResult]) -> None:
    """Speedup over vanilla (the first method) at the same level, scaling over the method's level 1,
    and each output against the method's output served alone."""
    by_key = {(r.label, r.level): r for r in rows}
    vanilla = alone[0].label
    outputs = {m.label: m.outputs for m in alone}
    for r in rows:
        base = by_key.get((vanilla, r.level))
        r.speedup = r.tokens_per_s / base.tokens_per_s if base and base.tokens_per_s else None
        single = by_key.get((r.label, 1))
        r.scaling = r.tokens_per_s / single.tokens_per_s if single and single.tokens_per_s else None
        r.divergence = [first_divergence(o, a) for o, a in zip(r.outputs, outputs[r.label], strict=True)]


def levels_table(rows: list[LevelResult]) -> str:
    """One row per level and method, levels in increasing order, methods in the bench's order."""
    head = ("| concurrency | method | tok/s | speedup | x level 1 | TTFT p50 ms | ITL p50 ms | ITL p99 ms "
            "| mean accepted length | equal to alone |")
    lines = [head, "|" + "---|" * 10]

    def cell(value: float | None, text: str) -> str:
        return "-" if value is None else text.format(value)

    for r in sorted(rows, key=lambda row: row.level):  # stable: the methods keep their order
        equal = f"{sum(d is None for d in r.divergence)}/{len(r.divergence)}"
        diverged = [d for d in r.divergence if d is not None]
        if diverged:
            equal += f" (first at token {min(diverged)})"
        lines.append(f"| {r.level} | {r.label} | {r.tokens_per_s:.1f} | {cell(r.speedup, '{:.2f}x')} "
                     f"| {cell(r.scaling, '{:.2f}x')} | {r.ttft_p50_ms:.1f} | {cell(r.itl_p50_ms, '{:.2f}')} "
                     f"| {cell(r.itl_p99_ms, '{:.2f}')} | {r.mean_accepted_length:.2f} | {equal} |")
    return "\n".join(lines)


def levels_section(rows: list[LevelResult], levels: list[int], requests: int, not_run: list[str]) -> dict:
    """The "concurrency" section of bench.json."""
    return {"levels": levels, "requests_per_level": requests, "itl": ITL_NOTE, "not_run": not_run,
            "rows": [dataclasses.asdict(r) for r in sorted(rows, key=lambda row: row.level)]}
