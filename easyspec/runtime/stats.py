"""Speculative-decoding metrics with vLLM's definitions, and per-stage timers.

- rounds: verification steps (plain decoding: one per generated token).
- drafted / accepted: draft tokens proposed / kept by verification and
  committed (a tree counts its depth as drafted: the most one round can
  accept). An accepted token that max_new_tokens, EOS or a stop string cuts
  off is never emitted, so it is not counted, as in vLLM's num_accepted_tokens.
- mean_accepted_length = 1 + accepted / rounds (the bonus or recovered token
  counted; 1.00 for plain decoding).
- acceptance_rate = accepted / drafted.
- accepted_per_position[i]: rounds whose draft token i+1 was accepted.
- accepted_histogram[n]: rounds that accepted exactly n draft tokens.

Stages: `calibrate` is the exact draft forward that opens each round (it feeds
the tokens committed last round; under easyspec it also rewrites the KV written
by layer-parallel steps), `draft` the remaining draft steps, `verify` the base model's
forward plus acceptance, `prefill` the prompt. Stage times are only exact when
the timer synchronises the device, which costs a little; it is optional.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

STAGES = ("prefill", "calibrate", "draft", "verify")


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    accepted_histogram: list[int] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    total_s: float = 0.0

    @classmethod
    def merged(cls, parts: list[SpecStats]) -> SpecStats:
        """The stats of several generations taken together (a request's choices): counts, times and
        per-position counts added."""
        total = cls()
        for part in parts:
            total.rounds += part.rounds
            total.drafted += part.drafted
            total.accepted += part.accepted
            total.generated += part.generated
            total.total_s += part.total_s
            for name, seconds in part.stage_s.items():
                total.stage_s[name] += seconds
            for mine, theirs in ((total.accepted_per_position, part.accepted_per_position),
                                 (total.accepted_histogram, part.accepted_histogram)):
                mine.extend([0] * (len(theirs) - len(mine)))
                for i, count in enumerate(theirs):
                    mine[i] += count
        return total

    def record_round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        for counts, needed in ((self.accepted_per_position, drafted), (self.accepted_histogram, drafted + 1)):
            counts.extend([0] * (needed - len(counts)))
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        self.accepted_histogram[accepted] += 1

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.total_s if self.total_s else 0.0

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "generated": self.generated,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "accepted_per_position": self.accepted_per_position,
            "accepted_histogram": self.accepted_histogram,
            "prefill_s": self.stage_s["prefill"],
            "draft_s": self.stage_s["draft"],
            "verify_s": self.stage_s["verify"],
            "calibrate_s": self.stage_s["calibrate"],
            "total_s": self.total_s,
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


class StageTimer:
    """Adds wall time per stage into a SpecStats (or into each of several: the sequences of a batch
    that shared the stage); synchronises the device if asked."""

    def __init__(self, stats: SpecStats | Sequence[SpecStats], device: torch.device, synchronize: bool) -> None:
        self.stats = [stats] if isinstance(stats, SpecStats) else list(stats)
        self.sync = synchronize and device.type == "cuda"
        self.device = device

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            for stats in self.stats:
                stats.stage_s[name] += seconds
