"""The training loop: optimiser, schedule, time budget, progress, checkpoints and resuming.

A step draws its rows from `Batches` (a function of the step number), computes
the base's log-probabilities on them once, runs the draft's exact pass and one
layer-parallel pass per layout (easyspec.distill.forward) and averages their
losses. Runs are sized in steps; a time budget becomes a step count after a few
timed steps (the learning-rate warm-up does not depend on it), and the count is
stored with the checkpoint, so a resumed run keeps its schedule.

A checkpoint holds the draft's weights, the optimiser state, the step, the
step count and the RNG states; the data position is the step itself. A run
stopped by Ctrl-C or SIGTERM writes one before it exits, and the same command
continues from it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyspec.distill.data import Batches
from easyspec.distill.forward import DraftForward, distill_loss, teacher_log_probs
from easyspec.distill.settings import TrainSettings
from easyspec.model.transformer import Transformer
from easyspec.parallel.layer_parallel import LayerLayout

_PROBE_STEPS = 5  # timed steps (after two untimed ones) that turn --minutes into a step count
_EXPORT_RESERVE_S = 5.0


def lr_at(step: int, total: int | None, s: TrainSettings) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to lr * min_lr_ratio at `total`
    (None: not known yet, the warm-up's last value is held)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if total is None:
        return s.lr
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Stopped(Exception):
    """The run was interrupted; a checkpoint was written at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step = step


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from `timeout`) stops a run the way Ctrl-C does, so it saves a checkpoint first."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StatusLine:
    """One progress line on stderr: redrawn in place on a terminal, printed every few seconds in a log."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every_s = 0.5 if self.tty else every_s
        self.last = 0.0
        self.width = 0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def show(self, text: str) -> None:
        self.last = time.monotonic()
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.width:
            sys.stderr.write("\n")
            self.width = 0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class Trainer:
    """The draft, its optimiser and its data order, stepped one batch at a time."""

    def __init__(self, draft: Transformer, base: Transformer | None, batches: Batches, settings: TrainSettings,
                 passes: list[tuple[str, LayerLayout]], policy: str, checkpoint: Path,
                 log: Callable[[str], None]) -> None:
        self.draft, self.base, self.batches, self.settings = draft.train(), base, batches, settings
        self.device = draft.embed_tokens.weight.device
        self.forward = DraftForward(draft, [layout for _, layout in passes], policy)
        self.pass_names = ["exact"] + [name for name, _ in passes]  # one layer-parallel pass per (name, layout)
        params = list({id(p): p for p in draft.parameters()}.values())  # tied weights once
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # norms, biases
        self.opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8,
                                     fused=self.device.type == "cuda")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.checkpoint, self.log = checkpoint, log
        self.step, self.total = 0, settings.steps
        # The step count is final once known from --steps alone, or measured against --minutes.
        self.planned = settings.minutes is None or (settings.steps is not None and settings.steps <= 2 + _PROBE_STEPS)
        self.tokens_seen = 0
        self.recent: list[dict[str, torch.Tensor]] = []

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> None:
        s = self.settings
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.total, s)
        inputs, targets, select = self.batches.batch(self.step)
        self.tokens_seen += int(select.sum())
        inputs, targets, select = (t.to(self.device, non_blocking=True) for t in (inputs, targets, select))
        with self.autocast:
            teacher = teacher_log_probs(self.base, inputs, select) if self.base is not None else None
            wanted = targets[select]  # [N]
            losses, parts = [], {}
            for name, hidden in zip(self.pass_names, self.forward(inputs), strict=True):
                loss, pass_parts = distill_loss(self.draft, hidden[select], wanted, teacher, s.kl_weight,
                                                s.ntp_weight)
                losses.append(loss)
                parts.update({f"{name} {key}": value.detach() for key, value in pass_parts.items()})
            loss = torch.stack(losses).mean()
        loss.backward()
        nn.utils.clip_grad_norm_(self.draft.parameters(), s.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.recent.append(parts)
        self.step += 1

    def mean_losses(self) -> dict[str, float]:
        """Mean of each loss part since the last call (one device sync)."""
        if not self.recent:
            return {}
        keys = list(self.recent[0])
        stacked = torch.stack([torch.stack([r[k] for r in self.recent]) for k in keys]).mean(1).tolist()
        self.recent = []
        return dict(zip(keys, stacked, strict=True))

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save(self) -> None:
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        state = {"draft": self.draft.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "total": self.total, "planned": self.planned, "tokens_seen": self.tokens_seen,
                 "cpu_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        tmp = self.checkpoint / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.checkpoint / "state.pt")

    def load(self) -> bool:
        """Continue from the checkpoint if there is one; True when it was there."""
        path = self.checkpoint / "state.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.draft.load_state_dict(state["draft"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.total, self.tokens_seen = state["step"], state["total"], state["tokens_seen"]
        self.planned = state["planned"]
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

    # -- the loop ----------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _plan(self, deadline: float, on_step: Callable[[int], None] | None) -> int:
        """Fix the step count from a few timed steps (after two untimed ones), none started past the
        deadline; returns their tokens."""
        tokens, begin, timed_from, t0 = 0, self.step, None, 0.0
        while (self.step - begin < 2 + _PROBE_STEPS and time.monotonic() < deadline
               and (self.total is None or self.step < self.total)):
            if self.step - begin == 2:
                self._sync()
                timed_from, t0 = self.step, time.monotonic()
            tokens += self._counted_step(on_step)
        self._sync()
        if timed_from is not None and self.step > timed_from:
            per_step = (time.monotonic() - t0) / (self.step - timed_from)
            fit = self.step + max(0, int((deadline - time.monotonic() - _EXPORT_RESERVE_S) / per_step))
            self.log(f"{per_step * 1e3:.0f} ms per step: {fit} steps fit the time budget")
        else:
            fit = self.step
            self.log(f"the time budget ended after {fit} steps, before a step could be timed")
        self.total = fit if self.total is None else min(self.total, fit)
        self.planned = True
        return tokens

    def run(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train to the step count or the end of the time budget; returns the record of the run.

        `on_step(step)` is called after every step (an exception it raises stops the run as
        Ctrl-C does, after a checkpoint). Raises Stopped when interrupted."""
        s = self.settings
        start = time.monotonic()
        deadline = start + s.minutes * 60 if s.minutes is not None else None
        status = StatusLine()
        last_save, start_step, tokens = start, self.step, 0
        losses: dict[str, float] = {}
        try:
            with _sigterm_as_interrupt():
                if not self.planned:
                    tokens += self._plan(deadline, on_step)
                while self.step < self.total and (deadline is None or time.monotonic() < deadline):
                    tokens += self._counted_step(on_step)
                    if status.due():
                        losses = self.mean_losses() or losses
                        status.show(self._status(losses, tokens, time.monotonic() - start, start_step))
                    if time.monotonic() - last_save > s.checkpoint_minutes * 60:
                        self.save()
                        last_save = time.monotonic()
        except KeyboardInterrupt:
            status.close()
            self.save()
            raise Stopped(self.step) from None
        losses = self.mean_losses() or losses
        status.show(self._status(losses, tokens, time.monotonic() - start, start_step))  # the final state
        status.close()
        if self.step < self.total:
            self.save()  # the time budget ended first: the same command with more time continues
        return {"steps": self.step, "planned_steps": self.total, "loss_tokens": self.tokens_seen,
                "final_losses": {k: round(v, 4) for k, v in losses.items()},
                "minutes": round((time.monotonic() - start) / 60, 3), "settings": asdict(s)}

    def _counted_step(self, on_step: Callable[[int], None] | None) -> int:
        before = self.tokens_seen
        self.train_step()
        if on_step is not None:
            on_step(self.step)
        return self.tokens_seen - before

    def _status(self, losses: dict[str, float], tokens: int, elapsed: float, start_step: int) -> str:
        done = self.step - start_step
        rate = tokens / elapsed if elapsed > 0 else 0.0
        left = elapsed / done * (self.total - self.step) if done else 0.0
        shown = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
        return (f"step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%) | "
                f"{rate:,.0f} tok/s | {shown} | {_clock(elapsed)} elapsed, ~{_clock(left)} left")
